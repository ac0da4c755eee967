//! The command line: `keywarden serve` runs the sidecar ([`serve`]); the
//! admin and crypto commands are clients of a running sidecar, for people
//! trying things and operators ([`admin`], [`tenant`], [`crypto`],
//! [`datakey`]); a few
//! commands check files with no sidecar at all ([`offline`]).
//!
//! On failure a client command exits 1 and prints the gRPC code's canonical
//! name and the message on stderr, e.g. `FAILED_PRECONDITION: tenant acme was
//! shredded at ...` ([`CliError`]). Usage errors exit 2.

mod admin;
mod crypto;
mod datakey;
mod error;
mod offline;
mod serve;
mod shared;
mod tenant;

use std::{future::Future, io::Read, process::ExitCode};

use clap::{Parser, Subcommand};
use keywarden::client::{self, Bearer, Connection};
use tonic::transport::Channel;

pub use error::CliError;

#[derive(Parser)]
#[command(
    name = "keywarden",
    version,
    about = "Per-tenant envelope encryption sidecar with crypto-shredding"
)]
pub struct Cli {
    #[command(flatten)]
    connection: Connection,

    #[command(subcommand)]
    command: Command,
}

/// Every command, grouped by what it needs: the help lists them in this
/// order.
#[derive(Subcommand)]
enum Command {
    /// Run the sidecar (with no options: the embedded default).
    Serve(serve::ServeArgs),
    #[command(flatten)]
    Admin(admin::AdminCommand),
    /// Check the audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    #[command(flatten)]
    Offline(offline::OfflineCommand),
    #[command(flatten)]
    Crypto(crypto::CryptoCommand),
    #[command(flatten)]
    DataKey(datakey::DataKeyCommand),
}

/// One of each kind: verifying needs only the log, the head is the
/// sidecar's.
#[derive(Subcommand)]
enum AuditCommand {
    /// Walk the hash chain of a log file; name the first record that was
    /// edited, deleted, inserted or moved. Prints the latest hash, to anchor
    /// elsewhere. No sidecar needed. Exit 0: intact (and every anchor
    /// found); 1: broken, or an anchor not found; 2: cannot read the log,
    /// or bad arguments; 3: intact but for the remains of a failed write
    /// (a partial record), which the sidecar cuts off at its next start.
    Verify(offline::VerifyAuditArgs),
    /// Ask the sidecar for its log's length and latest hash (audit:read).
    Head,
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let connection = &cli.connection;
    match cli.command {
        Command::Serve(args) => serve::main(args),
        Command::Admin(command) => client_command(admin::run(connection, command)),
        Command::Audit(AuditCommand::Head) => client_command(admin::audit_head(connection)),
        Command::Audit(AuditCommand::Verify(args)) => offline::verify_audit(args),
        Command::Offline(command) => offline::run(command),
        Command::Crypto(command) => client_command(crypto::run(connection, command)),
        Command::DataKey(command) => client_command(datakey::run(connection, command)),
    }
}

/// Runs a client command on a runtime of one thread per CPU; on failure,
/// prints the error and exits 1.
fn client_command(command: impl Future<Output = Result<(), CliError>>) -> ExitCode {
    block_on(0, async {
        match command.await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Runs `future` on a new runtime of `worker_threads` threads (see [`runtime`]).
fn block_on(worker_threads: usize, future: impl Future<Output = ExitCode>) -> ExitCode {
    match runtime(worker_threads) {
        Ok(runtime) => runtime.block_on(future),
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The async runtime, with `worker_threads` threads (0: one per CPU this
/// process may use, or `TOKIO_WORKER_THREADS`).
fn runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if worker_threads > 0 {
        builder.worker_threads(worker_threads);
    }
    builder.enable_all().build()
}

/// A channel to the sidecar the global options name, and the token to send.
async fn connect(connection: &Connection) -> Result<(Channel, Bearer), CliError> {
    let (tls, bearer) = connection.credentials().map_err(CliError::Input)?;
    let channel = client::connect(&connection.addr, tls.as_ref())
        .await
        .map_err(CliError::Unreachable)?;
    Ok((channel, bearer))
}

/// An envelope in the text form (`kw1:` and base64url) from the argument, or
/// from standard input for '-'; `what` names it in the error.
fn text_input(arg: &str, what: &str) -> Result<Vec<u8>, CliError> {
    use keywarden::envelope::text;
    let raw = input(arg).map_err(CliError::Input)?;
    std::str::from_utf8(&raw)
        .ok()
        .and_then(|t| text::decode(t).ok())
        .ok_or_else(|| {
            CliError::Input(format!(
                "{what} is not in the text form {}<base64url>",
                text::PREFIX
            ))
        })
}

/// The argument itself, or standard input for '-'.
fn input(arg: &str) -> Result<Vec<u8>, String> {
    if arg != "-" {
        return Ok(arg.as_bytes().to_vec());
    }
    let mut buf = Vec::new();
    std::io::stdin()
        .read_to_end(&mut buf)
        .map_err(|e| format!("cannot read standard input: {e}"))?;
    Ok(buf)
}
