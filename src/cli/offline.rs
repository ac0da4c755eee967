//! The commands that need no sidecar: `audit verify` (a log file, or the
//! PostgreSQL audit log), `receipt verify` and `token new`. Each prints its
//! own verdict; what it cannot read, or a bad argument, exits 2.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{Args, Subcommand};
use keywarden::audit::{self, Anchor, Broken, Verified};

#[derive(Subcommand)]
pub enum OfflineCommand {
    /// Check erasure receipts (no sidecar needed).
    #[command(subcommand)]
    Receipt(ReceiptCommand),
    /// Static API tokens.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Subcommand)]
pub enum ReceiptCommand {
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
pub enum TokenCommand {
    /// Make a new random API token: prints the token (give it to the caller)
    /// and the entry to add to the tokens file (only its hash).
    New {
        /// The caller's name: its identity becomes token:NAME.
        name: String,
    },
}

/// `audit verify`'s arguments (its help is on `super::AuditCommand`).
#[derive(Args)]
pub struct VerifyAuditArgs {
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
    anchors: Vec<Anchor>,
}

/// The exit code of a failure to start checking (usage or unreadable).
const CANNOT_CHECK: u8 = 2;

pub fn run(command: OfflineCommand) -> ExitCode {
    match command {
        OfflineCommand::Receipt(ReceiptCommand::Verify { file, public_key }) => {
            verify_receipt(&file, &public_key)
        }
        OfflineCommand::Token(TokenCommand::New { name }) => new_token(&name),
    }
}

/// Prints `message` and exits [`CANNOT_CHECK`].
fn cannot_check(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("{message}");
    ExitCode::from(CANNOT_CHECK)
}

fn verify_receipt(file: &str, public_key: &str) -> ExitCode {
    let bytes = if file == "-" {
        super::input(file)
    } else {
        std::fs::read(file).map_err(|e| format!("cannot read {file}: {e}"))
    };
    let text = match bytes {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(message) => return cannot_check(message),
    };
    let key = if public_key.starts_with("ed25519:") {
        public_key.to_owned()
    } else {
        match std::fs::read_to_string(public_key) {
            Ok(key) => key,
            Err(e) => return cannot_check(format!("cannot read the public key {public_key}: {e}")),
        }
    };
    match keywarden::receipt::verify(&text, &key) {
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
    use keywarden::auth::tokens;
    use secrecy::ExposeSecret;
    if name.is_empty() || name.len() > 128 || name.contains(char::is_whitespace) {
        return cannot_check("the name must be 1 to 128 characters without spaces");
    }
    let token = tokens::generate();
    let hash = hex::encode(tokens::hash(token.expose_secret()));
    println!("{}", token.expose_secret());
    eprintln!(
        "give the line above to the caller (it is shown once), and add this to the tokens file:\n\n\
         [[token]]\nname = \"{name}\"\nsha256 = \"{hash}\"\n"
    );
    ExitCode::SUCCESS
}

/// `audit verify`: the file, or with `--postgres` the PostgreSQL log.
pub fn verify_audit(args: VerifyAuditArgs) -> ExitCode {
    if !args.postgres {
        return verify_audit_file(&args.file, &args.anchors);
    }
    super::block_on(0, verify_postgres_audit(&args.anchors))
}

async fn verify_postgres_audit(anchors: &[Anchor]) -> ExitCode {
    // The URL holds a password: from the environment, never a flag (which
    // any local user could read in the process list).
    let Ok(url) = std::env::var("KEYWARDEN_DATABASE_URL") else {
        return cannot_check("set KEYWARDEN_DATABASE_URL to the keystore's database");
    };
    let pool = match sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
    {
        Ok(pool) => pool,
        Err(e) => {
            return cannot_check(format!(
                "cannot connect to the database at KEYWARDEN_DATABASE_URL: {e}"
            ));
        }
    };
    match audit::PostgresLog::read(&pool).await {
        Ok(log) => report_audit("the PostgreSQL audit log", log.verify(anchors)),
        Err(e) => cannot_check(format!("cannot read the audit log: {e}")),
    }
}

fn verify_audit_file(file: &Path, anchors: &[Anchor]) -> ExitCode {
    match std::fs::File::open(file) {
        Ok(f) => report_audit(
            &file.display().to_string(),
            audit::verify_anchored(std::io::BufReader::new(f), anchors),
        ),
        Err(e) => cannot_check(format!("cannot read {}: {e}", file.display())),
    }
}

/// Prints what `audit verify` found; exit 0, 1 or 3 (see
/// `super::AuditCommand`).
fn report_audit(name: &str, verified: Result<Verified, Broken>) -> ExitCode {
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
