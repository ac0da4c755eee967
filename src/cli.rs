//! The command line: `keywarden serve` runs the sidecar; every other command
//! is a client of a running sidecar, for people trying things and operators.
//!
//! On failure a client command exits 1 and prints the gRPC code's canonical
//! name and the message on stderr, e.g. `FAILED_PRECONDITION: tenant acme was
//! shredded at ...`. Usage errors exit 2.

use std::{
    io::{IsTerminal, Read, Write},
    path::PathBuf,
    process::ExitCode,
};

use clap::{Args, Parser, Subcommand};
use tonic::{Code, Status};

use crate::{
    api::{pb, status::code_name},
    client,
    config::{Config, DEFAULT_LISTEN, ListenAddr},
    envelope::{Context, text},
};

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

/// How client commands reach the sidecar.
#[derive(Args)]
struct Connection {
    /// The sidecar to talk to: host:port or unix:/path (client commands).
    #[arg(long, global = true, env = "KEYWARDEN_ADDR", default_value = DEFAULT_LISTEN)]
    addr: String,

    /// A file holding the bearer token to send. Without it: KEYWARDEN_TOKEN,
    /// else the embedded admin token (admin.token in KEYWARDEN_DATA_DIR or
    /// ./keywarden-data), else no token.
    #[arg(long, global = true, env = "KEYWARDEN_TOKEN_FILE")]
    token_file: Option<PathBuf>,

    /// TLS: the CA certificate (PEM) that signed the sidecar's certificate.
    #[arg(long, global = true, env = "KEYWARDEN_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Mutual TLS: this client's certificate (PEM).
    #[arg(long, global = true, env = "KEYWARDEN_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Mutual TLS: this client's private key (PEM).
    #[arg(long, global = true, env = "KEYWARDEN_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// TLS: the name the sidecar's certificate carries [default: the address's host].
    #[arg(long, global = true, env = "KEYWARDEN_TLS_DOMAIN")]
    tls_domain: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar (with no options: the embedded default).
    Serve(ServeArgs),
    /// Create, inspect, rotate and shred tenants.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Erase one data subject.
    #[command(subcommand)]
    Subject(SubjectCommand),
    /// Operate on root keys.
    #[command(subcommand)]
    Root(RootCommand),
    /// Check the audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Check erasure receipts (no sidecar needed).
    #[command(subcommand)]
    Receipt(ReceiptCommand),
    /// Static API tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Encrypt TEXT (or standard input with '-') and print the ciphertext as
    /// one line: kw1: and base64url.
    Encrypt(EncryptArgs),
    /// Decrypt a kw1: ciphertext (or standard input with '-') and print the
    /// plaintext.
    Decrypt(DecryptArgs),
    /// Load generator: throughput and latency of a running sidecar beside a
    /// bare echo service; start-up time and memory.
    #[command(subcommand)]
    Bench(crate::bench::BenchCommand),
}

#[derive(Args)]
struct ServeArgs {
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

#[derive(Subcommand)]
enum TenantCommand {
    /// Create a tenant with key version 1.
    Create {
        id: String,
        /// "dedicated" for a KMS key of its own, or an existing KMS key id,
        /// ARN or alias; default: the shared root key of its region.
        #[arg(long, default_value = "")]
        root_key: String,
        /// The region whose root keys wrap its keys; default: the default region.
        #[arg(long, default_value = "")]
        region: String,
        #[command(flatten)]
        policy: PolicyArgs,
    },
    /// Replace a tenant's policy (unset flags become "not set").
    Policy {
        id: String,
        #[command(flatten)]
        policy: PolicyArgs,
    },
    /// Show a tenant, its key versions and state.
    Show { id: String },
    /// List every tenant.
    List {
        /// Tenants fetched per request.
        #[arg(long, default_value_t = 100)]
        page_size: u32,
    },
    /// Add a key version and make it primary.
    Rotate { id: String },
    /// Destroy every key of a tenant. Irreversible.
    Shred {
        id: String,
        /// The tenant id again, to confirm.
        #[arg(long)]
        confirm: String,
        /// Write the signed erasure receipt here [default: print it].
        #[arg(long)]
        receipt: Option<PathBuf>,
    },
}

#[derive(Args)]
struct PolicyArgs {
    /// Rotate the tenant key automatically this often (e.g. 90d).
    #[arg(long, value_parser = humantime::parse_duration)]
    rotation_period: Option<std::time::Duration>,
    /// Destroy key versions this old (e.g. 365d): their data becomes unreadable.
    #[arg(long, value_parser = humantime::parse_duration)]
    retention: Option<std::time::Duration>,
    /// Refuse to decrypt data of key versions older than this.
    #[arg(long, default_value_t = 0)]
    min_decrypt_version: u32,
    /// Items per second on each sidecar (0: the sidecar's default).
    #[arg(long, default_value_t = 0)]
    max_items_per_second: u32,
    /// Items at once above the rate (0: one second's worth).
    #[arg(long, default_value_t = 0)]
    burst: u32,
    /// Largest plaintext per item, in bytes (0: the sidecar's limit).
    #[arg(long, default_value_t = 0)]
    max_plaintext_bytes: u64,
    /// How subject ids are told apart: exact, nfc or nfc-casefold. Chosen at
    /// creation, fixed after (omitted on `tenant policy`: kept).
    #[arg(long, default_value = "")]
    subject_ids: String,
    /// Most subject keys the tenant may hold at once (0: no quota).
    #[arg(long, default_value_t = 0)]
    max_subjects: u64,
}

impl PolicyArgs {
    fn message(&self) -> pb::TenantPolicy {
        pb::TenantPolicy {
            rotation_period_seconds: self.rotation_period.map_or(0, |d| d.as_secs()),
            retention_seconds: self.retention.map_or(0, |d| d.as_secs()),
            min_decrypt_version: self.min_decrypt_version,
            max_items_per_second: self.max_items_per_second,
            burst: self.burst,
            max_plaintext_bytes: self.max_plaintext_bytes,
            subject_ids: self.subject_ids.clone(),
            max_subjects: self.max_subjects,
        }
    }
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Walk the hash chain of a log file; name the first record that was
    /// edited, deleted, inserted or moved. Prints the latest hash, to anchor
    /// elsewhere. No sidecar needed. Exit 0: intact (and every anchor
    /// found); 1: broken, or an anchor not found; 2: cannot read the log,
    /// or bad arguments; 3: intact but for the remains of a failed write
    /// (a partial record), which the sidecar cuts off at its next start.
    Verify {
        #[arg(default_value = "./keywarden-data/audit.log")]
        file: PathBuf,
        /// Check the PostgreSQL audit log (audit.sink = "postgres") instead,
        /// at KEYWARDEN_DATABASE_URL, and that audit_head names its last
        /// record.
        #[arg(long, conflicts_with = "file")]
        postgres: bool,
        /// A record that must be in the log, SEQ:HASH, as `audit head` and
        /// earlier runs of `audit verify` print them (kept somewhere the
        /// log's writer cannot change). Repeat for several.
        #[arg(long = "anchor", value_name = "SEQ:HASH")]
        anchors: Vec<crate::audit::Anchor>,
    },
    /// Ask the sidecar for its log's length and latest hash (audit:read).
    Head,
}

#[derive(Subcommand)]
enum ReceiptCommand {
    /// Check a receipt's signature against the sidecar's public key and
    /// print what it says.
    Verify {
        /// The receipt file, or '-' for standard input.
        file: String,
        /// The public key ("ed25519:..."), or a file holding it.
        #[arg(long, default_value = "./keywarden-data/receipt.pub")]
        public_key: String,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Make a new random API token: prints the token (give it to the caller)
    /// and the entry to add to the tokens file (only its hash).
    New {
        /// The caller's name: its identity becomes token:NAME.
        name: String,
    },
}

#[derive(Subcommand)]
enum RootCommand {
    /// Move every key of the shared-tier tenants of a region onto the shared
    /// root key configured now (set kms.key_id on every sidecar first).
    /// Resumable: run it again after an interruption.
    Rotate {
        /// The key to rotate to, as a safeguard: must be the configured one.
        #[arg(long, default_value = "")]
        to: String,
        /// The region; default: the default region.
        #[arg(long, default_value = "")]
        region: String,
        /// Keys per page.
        #[arg(long, default_value_t = 100)]
        page_size: u32,
    },
}

#[derive(Subcommand)]
enum SubjectCommand {
    /// Destroy one data subject's key. Irreversible.
    Shred {
        #[arg(long)]
        tenant: String,
        subject: String,
        /// Write the signed erasure receipt here [default: print it].
        #[arg(long)]
        receipt: Option<PathBuf>,
    },
}

#[derive(Args)]
struct EncryptArgs {
    #[arg(long)]
    tenant: String,
    /// Encrypt under this data subject's key instead of the tenant key.
    #[arg(long)]
    subject: Option<String>,
    /// key=value bound into the ciphertext; repeat for several.
    #[arg(long = "context", value_name = "KEY=VALUE", value_parser = parse_pair)]
    context: Vec<(String, String)>,
    /// The plaintext, or '-' to read standard input.
    #[arg(default_value = "-")]
    text: String,
}

#[derive(Args)]
struct DecryptArgs {
    #[arg(long)]
    tenant: String,
    /// The same key=value pairs given to encrypt.
    #[arg(long = "context", value_name = "KEY=VALUE", value_parser = parse_pair)]
    context: Vec<(String, String)>,
    /// The kw1: ciphertext, or '-' to read standard input.
    #[arg(default_value = "-")]
    ciphertext: String,
}

fn parse_pair(raw: &str) -> Result<(String, String), String> {
    raw.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| "expected KEY=VALUE".to_owned())
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // `serve` sizes its runtime by its configuration, read first.
    let command = match cli.command {
        Command::Serve(args) => return serve(args),
        command => command,
    };
    let worker_threads = match &command {
        Command::Bench(crate::bench::BenchCommand::Echo(args)) => args.worker_threads,
        // Client commands and the load generator: one thread per CPU.
        _ => 0,
    };
    let runtime = match runtime(worker_threads) {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match command {
        Command::Serve(_) => unreachable!("handled above"),
        Command::Audit(AuditCommand::Verify {
            postgres: true,
            anchors,
            ..
        }) => runtime.block_on(verify_postgres_audit(&anchors)),
        Command::Audit(AuditCommand::Verify { file, anchors, .. }) => verify_audit(&file, &anchors),
        Command::Receipt(ReceiptCommand::Verify { file, public_key }) => {
            verify_receipt(&file, &public_key)
        }
        Command::Token(TokenCommand::New { name }) => new_token(&name),
        Command::Bench(command) => runtime.block_on(crate::bench::main(command, || {
            let (tls, bearer) = credentials(&cli.connection)?;
            Ok(crate::bench::SidecarAddr {
                addr: cli.connection.addr.clone(),
                tls,
                bearer,
            })
        })),
        command => match runtime.block_on(client_command(&cli.connection, command)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(status) => {
                eprintln!("{}: {}", code_name(status.code()), status.message());
                ExitCode::FAILURE
            }
        },
    }
}

fn verify_receipt(file: &str, public_key: &str) -> ExitCode {
    let bytes = if file == "-" {
        input(file).map_err(|status| status.message().to_owned())
    } else {
        std::fs::read(file).map_err(|e| format!("cannot read {file}: {e}"))
    };
    let text = match bytes {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    let key = if public_key.starts_with("ed25519:") {
        public_key.to_owned()
    } else {
        match std::fs::read_to_string(public_key) {
            Ok(key) => key,
            Err(e) => {
                eprintln!("cannot read the public key {public_key}: {e}");
                return ExitCode::from(2);
            }
        }
    };
    match crate::receipt::verify(&text, &key) {
        Ok(receipt) => {
            println!(
                "ok: signed by {}\n{}",
                receipt.signer,
                serde_json::to_string_pretty(&receipt).expect("a receipt serializes")
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("the receipt does not verify: {e}");
            ExitCode::FAILURE
        }
    }
}

fn new_token(name: &str) -> ExitCode {
    use secrecy::ExposeSecret;
    if name.is_empty() || name.len() > 128 || name.contains(char::is_whitespace) {
        eprintln!("the name must be 1 to 128 characters without spaces");
        return ExitCode::from(2);
    }
    let token = crate::auth::tokens::generate();
    let hash = hex::encode(crate::auth::tokens::hash(token.expose_secret()));
    println!("{}", token.expose_secret());
    eprintln!(
        "give the line above to the caller (it is shown once), and add this to the tokens file:\n\n\
         [[token]]\nname = \"{name}\"\nsha256 = \"{hash}\"\n"
    );
    ExitCode::SUCCESS
}

/// Writes a receipt to `file`, or prints it.
fn save_receipt(receipt: &str, file: Option<PathBuf>) -> Result<(), Status> {
    match file {
        Some(path) => std::fs::write(&path, receipt).map_err(|e| {
            Status::new(
                Code::Unknown,
                format!("the shred is done but its receipt could not be written to {}: {e}; the receipt:\n{receipt}", path.display()),
            )
        }),
        None => {
            print!("{receipt}");
            Ok(())
        }
    }
}

async fn verify_postgres_audit(anchors: &[crate::audit::Anchor]) -> ExitCode {
    // The URL holds a password: from the environment, never a flag (which
    // any local user could read in the process list).
    let Ok(url) = std::env::var("KEYWARDEN_DATABASE_URL") else {
        eprintln!("set KEYWARDEN_DATABASE_URL to the keystore's database");
        return ExitCode::from(2);
    };
    let pool = match sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
    {
        Ok(pool) => pool,
        Err(e) => {
            eprintln!("cannot connect to the database at KEYWARDEN_DATABASE_URL: {e}");
            return ExitCode::from(2);
        }
    };
    match crate::audit::PostgresLog::read(&pool).await {
        Ok(log) => report_audit("the PostgreSQL audit log", log.verify(anchors)),
        Err(e) => {
            eprintln!("cannot read the audit log: {e}");
            ExitCode::from(2)
        }
    }
}

fn verify_audit(file: &std::path::Path, anchors: &[crate::audit::Anchor]) -> ExitCode {
    match std::fs::File::open(file) {
        Ok(f) => report_audit(
            &file.display().to_string(),
            crate::audit::verify_anchored(std::io::BufReader::new(f), anchors),
        ),
        Err(e) => {
            eprintln!("cannot read {}: {e}", file.display());
            ExitCode::from(2)
        }
    }
}

/// Prints what `audit verify` found; exit 0, 1 or 3 (see `AuditCommand`).
fn report_audit(
    name: &str,
    verified: Result<crate::audit::Verified, crate::audit::Broken>,
) -> ExitCode {
    match verified {
        Ok(verified) if verified.partial.is_empty() => {
            println!(
                "ok: {} records, chain intact; latest hash {}",
                verified.records, verified.head
            );
            ExitCode::SUCCESS
        }
        Ok(verified) => {
            for partial in &verified.partial {
                eprintln!("{name}: {partial}");
            }
            println!(
                "partial: {} records, chain intact but for the partial records above; latest hash {}",
                verified.records, verified.head
            );
            ExitCode::from(3)
        }
        Err(broken) => {
            eprintln!("{name} is broken {broken}");
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

fn serve(args: ServeArgs) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = match load_config(args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("keywarden: {e}");
            // EX_CONFIG from sysexits.h, as linkerd2-proxy does.
            return ExitCode::from(78);
        }
    };
    let runtime = match runtime(config.worker_threads) {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("keywarden: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(crate::server::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("keywarden: {e}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(args: ServeArgs) -> Result<Config, crate::config::ConfigError> {
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

/// TLS settings from the command line, reading the files they name.
fn client_tls(cli: &Connection) -> Result<Option<client::ClientTls>, Status> {
    let read = |path: &PathBuf| {
        std::fs::read(path)
            .map_err(|e| Status::invalid_argument(format!("cannot read {}: {e}", path.display())))
    };
    let Some(ca) = &cli.tls_ca else {
        return Ok(None);
    };
    let identity = match (&cli.tls_cert, &cli.tls_key) {
        (Some(cert), Some(key)) => Some((
            read(cert)?,
            secrecy::SecretString::from(String::from_utf8_lossy(&read(key)?).into_owned()),
        )),
        _ => None,
    };
    Ok(Some(client::ClientTls {
        ca: read(ca)?,
        identity,
        domain: cli.tls_domain.clone(),
    }))
}

/// The TLS settings and the token to send, as the options and the
/// environment say; refuses to send a token in clear beyond loopback.
fn credentials(cli: &Connection) -> Result<(Option<client::ClientTls>, client::Bearer), Status> {
    let tls = client_tls(cli)?;
    let token = client::find_token(&cli.addr, cli.token_file.as_deref(), |name| {
        std::env::var(name).ok()
    })
    .map_err(Status::invalid_argument)?;
    if token.is_some()
        && tls.is_none()
        && matches!(cli.addr.parse::<ListenAddr>(), Ok(ListenAddr::Tcp(tcp)) if !tcp.ip().is_loopback())
    {
        return Err(Status::invalid_argument(format!(
            "refusing to send a token to {} without TLS: set --tls-ca",
            cli.addr
        )));
    }
    let bearer = client::Bearer::new(token.as_ref()).map_err(Status::invalid_argument)?;
    Ok((tls, bearer))
}

async fn client_command(cli: &Connection, command: Command) -> Result<(), Status> {
    let (tls, bearer) = credentials(cli)?;
    let channel = client::connect(&cli.addr, tls.as_ref())
        .await
        .map_err(Status::unavailable)?;
    match command {
        Command::Serve(_)
        | Command::Audit(AuditCommand::Verify { .. })
        | Command::Receipt(_)
        | Command::Token(_)
        | Command::Bench(_) => unreachable!("handled before connecting"),
        Command::Audit(AuditCommand::Head) => {
            let head = client::admin(channel, bearer)
                .get_audit_head(pb::GetAuditHeadRequest {})
                .await?
                .into_inner();
            println!(
                "records: {}\nhead:    {}\nreceipt key: {}",
                head.records, head.head, head.receipt_public_key
            );
            // What `audit verify --anchor` takes (the call is itself
            // recorded, so there is always a record to name).
            if head.records > 0 {
                println!("anchor:  {}:{}", head.records, head.head);
            }
            Ok(())
        }
        Command::Tenant(command) => tenant_command(client::admin(channel, bearer), command).await,
        Command::Root(RootCommand::Rotate {
            to,
            region,
            page_size,
        }) => rotate_root(client::admin(channel, bearer), to, region, page_size).await,
        Command::Subject(SubjectCommand::Shred {
            tenant,
            subject,
            receipt,
        }) => {
            let r = client::admin(channel, bearer)
                .shred_subject(pb::ShredSubjectRequest {
                    tenant_id: tenant.clone(),
                    subject_id: subject,
                })
                .await?
                .into_inner();
            let at = time(r.shredded_at);
            if r.already_shredded {
                println!("the subject was already shredded at {at} in tenant {tenant}");
            } else if r.key_destroyed {
                println!("shredded the subject's key in tenant {tenant} at {at}");
            } else {
                println!(
                    "the subject had no key in tenant {tenant}; tombstoned at {at} so it never gets one"
                );
            }
            save_receipt(&r.receipt, receipt)
        }
        Command::Encrypt(args) => {
            let plaintext = input(&args.text)?;
            let r = client::crypto(channel, bearer.clone())
                .encrypt(pb::EncryptRequest {
                    tenant_id: args.tenant,
                    subject_id: args.subject.unwrap_or_default(),
                    context: context(args.context),
                    plaintext,
                })
                .await?
                .into_inner();
            println!("{}", text::encode(&r.ciphertext));
            Ok(())
        }
        Command::Decrypt(args) => {
            let raw = input(&args.ciphertext)?;
            let ciphertext = std::str::from_utf8(&raw)
                .ok()
                .and_then(|t| text::decode(t).ok())
                .ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "the ciphertext is not in the text form {}<base64url>",
                        text::PREFIX
                    ))
                })?;
            let r = client::crypto(channel, bearer.clone())
                .decrypt(pb::DecryptRequest {
                    tenant_id: args.tenant,
                    context: context(args.context),
                    ciphertext,
                })
                .await?
                .into_inner();
            let mut out = std::io::stdout().lock();
            let newline: &[u8] = if out.is_terminal() { b"\n" } else { b"" };
            out.write_all(&r.plaintext)
                .and_then(|()| out.write_all(newline))
                .and_then(|()| out.flush())
                .map_err(|e| Status::new(Code::Unknown, format!("cannot write the plaintext: {e}")))
        }
    }
}

async fn tenant_command(
    mut admin: pb::admin_client::AdminClient<client::Authed>,
    command: TenantCommand,
) -> Result<(), Status> {
    match command {
        TenantCommand::Create {
            id,
            root_key,
            region,
            policy,
        } => {
            let tenant = admin
                .create_tenant(pb::CreateTenantRequest {
                    tenant_id: id,
                    root_key,
                    region,
                    policy: Some(policy.message()),
                })
                .await?;
            print_tenant(&tenant.into_inner());
        }
        TenantCommand::Policy { id, policy } => {
            let tenant = admin
                .update_tenant_policy(pb::UpdateTenantPolicyRequest {
                    tenant_id: id,
                    policy: Some(policy.message()),
                })
                .await?;
            print_tenant(&tenant.into_inner());
        }
        TenantCommand::Show { id } => {
            let tenant = admin
                .get_tenant(pb::GetTenantRequest { tenant_id: id })
                .await?;
            print_tenant(&tenant.into_inner());
        }
        TenantCommand::Rotate { id } => {
            let tenant = admin
                .rotate_tenant_key(pb::RotateTenantKeyRequest { tenant_id: id })
                .await?;
            print_tenant(&tenant.into_inner());
        }
        TenantCommand::List { page_size } => {
            let mut page_token = String::new();
            loop {
                let page = admin
                    .list_tenants(pb::ListTenantsRequest {
                        page_size,
                        page_token,
                    })
                    .await?
                    .into_inner();
                for t in &page.tenants {
                    match t.state() {
                        pb::TenantState::Shredded => {
                            println!("{}\tshredded\t{}", t.tenant_id, time(t.shredded_at))
                        }
                        _ => println!("{}\tactive\tv{}", t.tenant_id, t.primary_version),
                    }
                }
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
        }
        TenantCommand::Shred {
            id,
            confirm,
            receipt,
        } => {
            let r = admin
                .shred_tenant(pb::ShredTenantRequest {
                    tenant_id: id,
                    confirm,
                })
                .await?
                .into_inner();
            let at = time(r.shredded_at);
            if r.already_shredded {
                println!("tenant {} was already shredded at {at}", r.tenant_id);
            } else {
                println!(
                    "shredded tenant {} at {at}: destroyed {} key version(s) and {} subject key(s)",
                    r.tenant_id, r.destroyed_key_versions, r.destroyed_subject_keys
                );
            }
            if r.root_key_deletion_date.is_some() {
                println!(
                    "its dedicated root key {} is deleted by KMS at {}",
                    r.root_key_id,
                    time(r.root_key_deletion_date)
                );
            }
            save_receipt(&r.receipt, receipt)?;
        }
    }
    Ok(())
}

/// Follows a root key rotation with a progress bar (on a terminal) and
/// prints the outcome.
async fn rotate_root(
    mut admin: pb::admin_client::AdminClient<client::Authed>,
    to: String,
    region: String,
    page_size: u32,
) -> Result<(), Status> {
    let mut updates = admin
        .rotate_root_key(pb::RotateRootKeyRequest {
            region,
            to,
            page_size,
        })
        .await?
        .into_inner();
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} keys ({eta} left)")
            .expect("the template is valid")
            .progress_chars("=> "),
    );
    let mut last = None;
    while let Some(update) = updates.message().await? {
        bar.set_length(update.total);
        bar.set_position(update.already_on_target + update.rewrapped + update.changed_concurrently);
        bar.set_message(format!("rotating to {}", update.to));
        last = Some(update);
    }
    bar.finish_and_clear();
    let Some(last) = last else {
        return Err(Status::unknown(
            "the sidecar ended the rotation without a word",
        ));
    };
    println!(
        "{}: {} of {} keys moved to {} now, {} were there already, {} changed concurrently",
        if last.done {
            "done"
        } else {
            "interrupted (run it again to resume)"
        },
        last.rewrapped,
        last.total,
        last.to,
        last.already_on_target,
        last.changed_concurrently
    );
    if last.done {
        Ok(())
    } else {
        Err(Status::aborted(
            "the rotation stopped before the end; run it again to resume",
        ))
    }
}

fn print_tenant(t: &pb::Tenant) {
    println!("tenant:   {}", t.tenant_id);
    let tier = match t.tier() {
        pb::TenantTier::Dedicated => "dedicated root key",
        pb::TenantTier::Customer => "customer root key",
        _ => "shared root key",
    };
    let region = if t.region.is_empty() {
        "default region"
    } else {
        &t.region
    };
    let root_key = if t.root_key_id.is_empty() {
        "-"
    } else {
        &t.root_key_id
    };
    println!("root key: {root_key} ({tier}, {region})");
    match t.state() {
        pb::TenantState::Shredded => {
            println!("state:    shredded at {}", time(t.shredded_at));
            println!("created:  {}", time(t.created_at));
            if t.root_key_deletion_date.is_some() {
                println!(
                    "root key deleted by KMS at {}",
                    time(t.root_key_deletion_date)
                );
            }
        }
        _ => {
            println!("state:    active");
            println!("created:  {}", time(t.created_at));
            println!("primary:  v{}", t.primary_version);
            for v in &t.versions {
                let role = if v.version == t.primary_version {
                    "primary"
                } else {
                    "decrypt only"
                };
                println!(
                    "  v{:<6} {:<13} created {}  root key {}",
                    v.version,
                    role,
                    time(v.created_at),
                    v.root_key_id
                );
            }
        }
    }
}

fn time(ts: Option<prost_types::Timestamp>) -> String {
    let Some(ts) = ts else { return "-".into() };
    let millis = ts.seconds.saturating_mul(1000) + i64::from(ts.nanos / 1_000_000);
    crate::time::UnixMillis(millis).to_string()
}

fn context(pairs: Vec<(String, String)>) -> Context {
    pairs.into_iter().collect()
}

/// The argument itself, or standard input for '-'.
fn input(arg: &str) -> Result<Vec<u8>, Status> {
    if arg != "-" {
        return Ok(arg.as_bytes().to_vec());
    }
    let mut buf = Vec::new();
    std::io::stdin()
        .read_to_end(&mut buf)
        .map_err(|e| Status::invalid_argument(format!("cannot read standard input: {e}")))?;
    Ok(buf)
}
