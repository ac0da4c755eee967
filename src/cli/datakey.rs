//! `keywarden datakey generate` and `decrypt`: data keys from the sidecar
//! (permission `datakey`); `keywarden seal-file` and `open-file`: a file
//! sealed here, as a client stream (docs/FORMAT.md, suite 0x06), under a
//! fresh data key, and opened again with the key DecryptDataKey answers.
//! Only the data key crosses the wire, never the file.

use std::{
    fs::File,
    io::{BufReader, BufWriter, IsTerminal, Read, Write},
    path::{Path, PathBuf},
};

use clap::{Args, Subcommand};
use keywarden::{
    api::pb,
    client::{self, Connection},
    envelope::{Context, Provider, client_stream, text},
    secret::Key256,
};
use zeroize::Zeroize;

use super::{CliError, crypto::parse_pair, text_input};

#[derive(Subcommand)]
pub enum DataKeyCommand {
    /// Data keys for client-side encryption.
    #[command(subcommand)]
    Datakey(Datakey),
    /// Encrypt a file here, under a fresh data key from the sidecar, as a
    /// client stream whose header carries the wrapped data key.
    SealFile(SealFileArgs),
    /// Decrypt a file made by seal-file: the sidecar unwraps its data key.
    OpenFile(OpenFileArgs),
}

#[derive(Subcommand)]
pub enum Datakey {
    /// Make a data key. Prints one JSON line: "data_key" (hex, a secret:
    /// keep it in memory only), "wrapped_data_key" (kw1: text form, to
    /// store) and "key_version".
    Generate(GenerateArgs),
    /// Print the data key (hex) of a kw1: wrapped data key (or standard
    /// input with '-').
    Decrypt(DecryptArgs),
}

#[derive(Args)]
pub struct GenerateArgs {
    #[arg(long)]
    tenant: String,
    /// Wrap under this data subject's key instead of the tenant key.
    #[arg(long)]
    subject: Option<String>,
    /// key=value bound into the wrapped data key; repeat for several.
    #[arg(long = "context", value_name = "KEY=VALUE", value_parser = parse_pair)]
    context: Vec<(String, String)>,
}

#[derive(Args)]
pub struct DecryptArgs {
    #[arg(long)]
    tenant: String,
    /// The same key=value pairs given to generate.
    #[arg(long = "context", value_name = "KEY=VALUE", value_parser = parse_pair)]
    context: Vec<(String, String)>,
    /// The kw1: wrapped data key, or '-' to read standard input.
    #[arg(default_value = "-")]
    wrapped: String,
}

#[derive(Args)]
pub struct SealFileArgs {
    #[arg(long)]
    tenant: String,
    /// Wrap the data key under this data subject's key.
    #[arg(long)]
    subject: Option<String>,
    /// key=value bound into the data key and the stream; repeat for several.
    #[arg(long = "context", value_name = "KEY=VALUE", value_parser = parse_pair)]
    context: Vec<(String, String)>,
    /// The file to encrypt.
    input: PathBuf,
    /// Where to write the envelope (it must not exist).
    output: PathBuf,
}

#[derive(Args)]
pub struct OpenFileArgs {
    #[arg(long)]
    tenant: String,
    /// The same key=value pairs given to seal-file.
    #[arg(long = "context", value_name = "KEY=VALUE", value_parser = parse_pair)]
    context: Vec<(String, String)>,
    /// The envelope seal-file wrote.
    input: PathBuf,
    /// Where to write the plaintext (it must not exist). If the envelope
    /// fails to authenticate, the file holds an incomplete prefix and the
    /// command fails: discard it.
    output: PathBuf,
}

/// How much of a file is read per step.
const CHUNK: usize = 1 << 20;

pub async fn run(connection: &Connection, command: DataKeyCommand) -> Result<(), CliError> {
    let (channel, bearer) = super::connect(connection).await?;
    let mut crypto = client::crypto(channel, bearer);
    match command {
        DataKeyCommand::Datakey(Datakey::Generate(args)) => {
            let r = crypto
                .generate_data_key(pb::GenerateDataKeyRequest {
                    tenant_id: args.tenant,
                    subject_id: args.subject.unwrap_or_default(),
                    context: args.context.into_iter().collect(),
                })
                .await?
                .into_inner();
            let line = serde_json::json!({
                "data_key": hex::encode(&r.data_key),
                "wrapped_data_key": text::encode(&r.wrapped_data_key),
                "key_version": r.key_version,
            });
            println!("{line}");
            Ok(())
        }
        DataKeyCommand::Datakey(Datakey::Decrypt(args)) => {
            let wrapped = text_input(&args.wrapped, "the wrapped data key")?;
            let r = crypto
                .decrypt_data_key(pb::DecryptDataKeyRequest {
                    tenant_id: args.tenant,
                    context: args.context.into_iter().collect(),
                    wrapped_data_key: wrapped,
                })
                .await?
                .into_inner();
            println!("{}", hex::encode(&r.data_key));
            Ok(())
        }
        DataKeyCommand::SealFile(args) => {
            let context: Context = args.context.into_iter().collect();
            let mut from = open(&args.input)?;
            let mut to = create(&args.output)?;
            let mut r = crypto
                .generate_data_key(pb::GenerateDataKeyRequest {
                    tenant_id: args.tenant.clone(),
                    subject_id: args.subject.unwrap_or_default(),
                    context: Clone::clone(&context),
                })
                .await?
                .into_inner();
            let key = data_key(&mut r.data_key)?;
            let (mut sealer, mut out) = client_stream::seal_start(
                Provider::default(),
                &key,
                &r.wrapped_data_key,
                &args.tenant,
                &context,
            )
            .map_err(|e| CliError::Output(format!("cannot seal: {e}")))?;
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = from
                    .read(&mut buf)
                    .map_err(|e| read_error(&args.input, e))?;
                if n == 0 {
                    break;
                }
                sealer
                    .push(&buf[..n], &mut out)
                    .map_err(|e| CliError::Output(format!("cannot seal: {e}")))?;
                write(&mut to, &mut out, &args.output)?;
            }
            sealer
                .finish(&mut out)
                .map_err(|e| CliError::Output(format!("cannot seal: {e}")))?;
            write(&mut to, &mut out, &args.output)?;
            to.flush().map_err(|e| write_error(&args.output, e))
        }
        DataKeyCommand::OpenFile(args) => {
            let context: Context = args.context.into_iter().collect();
            let mut from = open(&args.input)?;
            let undecryptable = || {
                CliError::Input(
                    "the file is not a client stream, or it was altered, or it was made for \
                     another tenant or context"
                        .to_owned(),
                )
            };
            // The header: as many bytes as parse_header asks for.
            let mut header = Vec::new();
            let len = loop {
                if let Some(parsed) =
                    client_stream::parse_header(&header).map_err(|_| undecryptable())?
                {
                    break parsed.len;
                }
                let mut byte = [0u8; 64];
                let want = byte
                    .len()
                    .min(client_stream::SUBJECT_HEADER_LEN - header.len());
                let n = from
                    .read(&mut byte[..want.max(1)])
                    .map_err(|e| read_error(&args.input, e))?;
                if n == 0 {
                    return Err(undecryptable());
                }
                header.extend_from_slice(&byte[..n]);
            };
            let body_start = header.split_off(len);
            let wrapped = client_stream::parse_header(&header)
                .ok()
                .flatten()
                .ok_or_else(undecryptable)?
                .wrapped_data_key
                .to_vec();
            let mut r = crypto
                .decrypt_data_key(pb::DecryptDataKeyRequest {
                    tenant_id: args.tenant.clone(),
                    context: Clone::clone(&context),
                    wrapped_data_key: wrapped,
                })
                .await?
                .into_inner();
            let key = data_key(&mut r.data_key)?;
            let mut opener = client_stream::open_start(
                Provider::default(),
                &key,
                &header,
                &args.tenant,
                &context,
            )
            .map_err(|_| undecryptable())?;
            let mut to = create(&args.output)?;
            let mut out = Vec::new();
            opener
                .push(&body_start, &mut out)
                .map_err(|_| undecryptable())?;
            let mut buf = vec![0u8; CHUNK];
            loop {
                write(&mut to, &mut out, &args.output)?;
                let n = from
                    .read(&mut buf)
                    .map_err(|e| read_error(&args.input, e))?;
                if n == 0 {
                    break;
                }
                opener
                    .push(&buf[..n], &mut out)
                    .map_err(|_| undecryptable())?;
            }
            opener.finish(&mut out).map_err(|_| undecryptable())?;
            write(&mut to, &mut out, &args.output)?;
            to.flush().map_err(|e| write_error(&args.output, e))?;
            if std::io::stderr().is_terminal() {
                eprintln!("{}: whole and authentic", args.output.display());
            }
            Ok(())
        }
    }
}

/// The data key the sidecar answered, taken out of the response (its bytes
/// there are zeroed).
fn data_key(bytes: &mut Vec<u8>) -> Result<Key256, CliError> {
    let key = Key256::from_slice(bytes);
    bytes.zeroize();
    key.ok_or_else(|| {
        CliError::Output("the sidecar answered a data key that is not 32 bytes".into())
    })
}

fn open(path: &Path) -> Result<BufReader<File>, CliError> {
    File::open(path)
        .map(BufReader::new)
        .map_err(|e| read_error(path, e))
}

fn create(path: &Path) -> Result<BufWriter<File>, CliError> {
    File::options()
        .write(true)
        .create_new(true)
        .open(path)
        .map(BufWriter::new)
        .map_err(|e| write_error(path, e))
}

/// Writes out what `out` holds and empties it.
fn write(to: &mut BufWriter<File>, out: &mut Vec<u8>, path: &Path) -> Result<(), CliError> {
    to.write_all(out).map_err(|e| write_error(path, e))?;
    out.clear();
    Ok(())
}

fn read_error(path: &Path, e: std::io::Error) -> CliError {
    CliError::Input(format!("cannot read {}: {e}", path.display()))
}

fn write_error(path: &Path, e: std::io::Error) -> CliError {
    CliError::Output(format!("cannot write {}: {e}", path.display()))
}
