//! `keywarden serve`: the configuration from a file, the environment and the
//! flags, then the sidecar on a runtime sized by it.

use std::{path::PathBuf, process::ExitCode};

use clap::Args;
use keywarden::{
    config::{Config, ConfigError, ListenAddr},
    observe::{log, trace},
};

#[derive(Args)]
pub struct ServeArgs {
    /// A TOML configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where the root key and keystore live [default: ./keywarden-data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// host:port or unix:/path; repeat for several [default: 127.0.0.1:7400].
    #[arg(long = "listen", value_name = "ADDR")]
    listen: Vec<ListenAddr>,
    /// With the PostgreSQL keystore: only check that its schema is migrated,
    /// never change it (store.migrate = false).
    #[arg(long)]
    check_migrations: bool,
}

pub fn main(args: ServeArgs) -> ExitCode {
    let config = match load_config(args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("keywarden: {e}");
            // EX_CONFIG from sysexits.h, as linkerd2-proxy does.
            return ExitCode::from(78);
        }
    };
    let export = match trace::export_wanted(|name| std::env::var(name).ok()) {
        Ok(export) => export,
        Err(e) => {
            eprintln!("keywarden: {e}");
            return ExitCode::from(78);
        }
    };
    // The runtime is sized by the configuration, read first.
    let runtime = match super::runtime(config.worker_threads) {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("keywarden: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The log's format is configured, so the log starts after the
    // configuration; inside the runtime, whose tasks carry exported spans.
    let telemetry = {
        let _runtime = runtime.enter();
        match log::init(config.log.format, export) {
            Ok(telemetry) => telemetry,
            Err(e) => {
                eprintln!("keywarden: {e}");
                return ExitCode::from(78);
            }
        }
    };
    let result = runtime.block_on(keywarden::server::run(config));
    // Flushes the spans still queued while the runtime still runs.
    telemetry.shutdown();
    // A blocking task still running (a stuck file read, say) must not keep
    // the process alive after the drain.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("keywarden: {e}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(args: ServeArgs) -> Result<Config, ConfigError> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    config.apply_env(|name| std::env::var(name).ok())?;
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    if !args.listen.is_empty() {
        config.listen = args.listen;
    }
    if args.check_migrations {
        config.store.migrate = false;
    }
    config.validate()?;
    Ok(config)
}
