//! `keywarden encrypt` and `decrypt`: one value through the sidecar's Crypto
//! service, in the text form of a ciphertext (`kw1:` and base64url); and
//! `keywarden blind-index`: the blind-index token of one or more values.

use std::io::{IsTerminal, Write};

use clap::{Args, Subcommand};
use keywarden::{
    api::pb,
    client::{self, Connection},
    envelope::text,
};

use super::{CliError, input, text_input};

#[derive(Subcommand)]
pub enum CryptoCommand {
    /// Encrypt TEXT (or standard input with '-') and print the ciphertext as
    /// one line: kw1: and base64url.
    Encrypt(EncryptArgs),
    /// Decrypt a kw1: ciphertext (or standard input with '-') and print the
    /// plaintext.
    Decrypt(DecryptArgs),
    /// Print the blind-index token of VALUE (several values: one compound
    /// token), in hex: [index key version]_32, then the truncated hash. With
    /// --all-versions, one line per live index key version, the primary's
    /// first.
    BlindIndex(BlindIndexArgs),
}

#[derive(Args)]
pub struct BlindIndexArgs {
    #[arg(long)]
    tenant: String,
    /// key=value naming the field indexed; repeat for several.
    #[arg(long = "context", value_name = "KEY=VALUE", value_parser = parse_pair)]
    context: Vec<(String, String)>,
    /// Bits of hash in the token, 8 to 256.
    #[arg(long, default_value_t = 32)]
    bits: u32,
    /// Applied to every value before hashing, in the order given: nfc,
    /// nfkc, case-fold, trim or last-chars:N.
    #[arg(long = "transform", value_name = "STEP", value_parser = parse_transform)]
    transforms: Vec<pb::IndexTransformation>,
    /// Hash under this index key version instead of the primary.
    #[arg(long, conflicts_with = "all_versions")]
    key_version: Option<u32>,
    /// One token per live index key version (for queries while re-indexing).
    #[arg(long)]
    all_versions: bool,
    /// The value, or '-' to read standard input; several make a compound
    /// index.
    #[arg(default_value = "-", num_args = 1..)]
    values: Vec<String>,
}

/// A transformation as the command line names it.
fn parse_transform(raw: &str) -> Result<pb::IndexTransformation, String> {
    use pb::index_transformation::Kind;
    let (kind, count) = match raw.split_once(':') {
        Some(("last-chars", n)) => (
            Kind::LastChars,
            n.parse::<u32>()
                .map_err(|_| "last-chars:N needs a number N".to_owned())?,
        ),
        None => match raw {
            "nfc" => (Kind::Nfc, 0),
            "nfkc" => (Kind::Nfkc, 0),
            "case-fold" => (Kind::CaseFold, 0),
            "trim" => (Kind::Trim, 0),
            _ => return Err(TRANSFORMS.to_owned()),
        },
        Some(_) => return Err(TRANSFORMS.to_owned()),
    };
    Ok(pb::IndexTransformation {
        kind: kind as i32,
        count,
    })
}

const TRANSFORMS: &str = "expected nfc, nfkc, case-fold, trim or last-chars:N";

#[derive(Args)]
pub struct EncryptArgs {
    #[arg(long)]
    tenant: String,
    /// Encrypt under this data subject's key instead of the tenant key.
    #[arg(long)]
    subject: Option<String>,
    /// key=value bound into the ciphertext; repeat for several.
    #[arg(long = "context", value_name = "KEY=VALUE", value_parser = parse_pair)]
    context: Vec<(String, String)>,
    /// Deterministic encryption: the same tenant, key, context and plaintext
    /// always give the same ciphertext (for equality lookups; it reveals
    /// which values are equal).
    #[arg(long)]
    deterministic: bool,
    /// With --deterministic: seal under this tenant key version instead of
    /// the primary (to look up rows not yet rewrapped after a rotation).
    #[arg(long, requires = "deterministic")]
    key_version: Option<u32>,
    /// The plaintext, or '-' to read standard input.
    #[arg(default_value = "-")]
    text: String,
}

#[derive(Args)]
pub struct DecryptArgs {
    #[arg(long)]
    tenant: String,
    /// The same key=value pairs given to encrypt.
    #[arg(long = "context", value_name = "KEY=VALUE", value_parser = parse_pair)]
    context: Vec<(String, String)>,
    /// The kw1: ciphertext, or '-' to read standard input.
    #[arg(default_value = "-")]
    ciphertext: String,
}

pub(super) fn parse_pair(raw: &str) -> Result<(String, String), String> {
    raw.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| "expected KEY=VALUE".to_owned())
}

pub async fn run(connection: &Connection, command: CryptoCommand) -> Result<(), CliError> {
    let (channel, bearer) = super::connect(connection).await?;
    let mut crypto = client::crypto(channel, bearer);
    match command {
        CryptoCommand::Encrypt(args) => {
            let plaintext = input(&args.text).map_err(CliError::Input)?;
            let r = crypto
                .encrypt(pb::EncryptRequest {
                    tenant_id: args.tenant,
                    subject_id: args.subject.unwrap_or_default(),
                    context: args.context.into_iter().collect(),
                    plaintext,
                    deterministic: args.deterministic,
                    key_version: args.key_version.unwrap_or(0),
                })
                .await?
                .into_inner();
            println!("{}", text::encode(&r.ciphertext));
            Ok(())
        }
        CryptoCommand::BlindIndex(args) => {
            let values = args
                .values
                .iter()
                .map(|v| {
                    Ok(pb::IndexValue {
                        value: input(v).map_err(CliError::Input)?,
                        transformations: args.transforms.clone(),
                    })
                })
                .collect::<Result<Vec<_>, CliError>>()?;
            let r = crypto
                .blind_index(pb::BlindIndexRequest {
                    tenant_id: args.tenant,
                    context: args.context.into_iter().collect(),
                    values,
                    bits: args.bits,
                    key_version: args.key_version.unwrap_or(0),
                    all_versions: args.all_versions,
                })
                .await?
                .into_inner();
            for token in r.tokens {
                println!("{}", hex::encode(token));
            }
            Ok(())
        }
        CryptoCommand::Decrypt(args) => {
            let ciphertext = text_input(&args.ciphertext, "the ciphertext")?;
            let r = crypto
                .decrypt(pb::DecryptRequest {
                    tenant_id: args.tenant,
                    context: args.context.into_iter().collect(),
                    ciphertext,
                })
                .await?
                .into_inner();
            let mut out = std::io::stdout().lock();
            let newline: &[u8] = if out.is_terminal() { b"\n" } else { b"" };
            out.write_all(&r.plaintext)
                .and_then(|()| out.write_all(newline))
                .and_then(|()| out.flush())
                .map_err(|e| CliError::Output(format!("cannot write the plaintext: {e}")))
        }
    }
}
