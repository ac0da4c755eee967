//! The transport limit: a bare `keywarden.v1.Crypto` that only echoes.
//!
//! No crypto, no authentication, no audit. Encrypt answers the plaintext
//! followed by [`TENANT_OVERHEAD`] zero bytes with key version 1, the size of
//! a real tenant-key ciphertext (with `deterministic`, the
//! [`DETERMINISTIC_TENANT_OVERHEAD`] of a deterministic one), and Decrypt
//! answers the ciphertext less the overhead its suite byte names; the batch
//! calls do the same per item, and Rewrap echoes; GenerateDataKey answers a
//! zero key and a zero wrapped form of the real sizes; BlindIndex answers a
//! zero token of the size asked for. It is served by the sidecar's own
//! [`server::serve`] (the same tonic server
//! builder, TCP_NODELAY, connection handling and message size limit) on the
//! same kind of tokio runtime (multi-thread, `--worker-threads` as the
//! sidecar's `worker_threads`), so what it costs is what gRPC over this
//! transport costs with these messages.

use std::{
    io::{BufRead, BufReader, Write},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use futures::StreamExt;
use tonic::{Request, Response, Status, Streaming, service::Routes};

use keywarden::{
    api::{pb, streams::ResponseStream},
    config::{ListenAddr, RequestLimits},
    envelope::{
        SUITE_DETERMINISTIC, TENANT_OVERHEAD, blind, datakey,
        deterministic::DETERMINISTIC_TENANT_OVERHEAD,
    },
    server,
};

/// The echo service.
#[derive(Clone, Copy, Debug, Default)]
pub struct Echo;

/// An "envelope" of the real size: the plaintext and zeros, the last of
/// them the suite byte for a deterministic one (so [`open`] knows its
/// overhead).
pub fn seal(mut plaintext: Vec<u8>, deterministic: bool) -> pb::EncryptResponse {
    let overhead = if deterministic {
        DETERMINISTIC_TENANT_OVERHEAD
    } else {
        TENANT_OVERHEAD
    };
    plaintext.resize(plaintext.len() + overhead, 0);
    if deterministic && let Some(last) = plaintext.last_mut() {
        *last = SUITE_DETERMINISTIC;
    }
    pb::EncryptResponse {
        ciphertext: plaintext,
        key_version: 1,
    }
}

/// A token of the real size for `bits` (clamped to what BlindIndex takes),
/// all zeros, of key version 1.
pub fn zero_token(bits: u32) -> pb::BlindIndexResponse {
    let bits = bits.clamp(blind::MIN_BITS, blind::MAX_BITS);
    let mut token = vec![0u8; blind::token_len(bits)];
    token[3] = 1;
    pb::BlindIndexResponse {
        tokens: vec![token],
        key_version: 1,
    }
}

/// The "plaintext" of [`seal`]'s output.
pub fn open(mut ciphertext: Vec<u8>) -> pb::DecryptResponse {
    let overhead = if ciphertext.last() == Some(&SUITE_DETERMINISTIC) {
        DETERMINISTIC_TENANT_OVERHEAD
    } else {
        TENANT_OVERHEAD
    };
    ciphertext.truncate(ciphertext.len().saturating_sub(overhead));
    pb::DecryptResponse {
        plaintext: ciphertext,
        key_version: 1,
    }
}

/// Passes a stream's chunks through as responses, the first request (the
/// start) answered with an empty chunk.
fn pass_through<Req, Resp>(
    request: Request<Streaming<Req>>,
    chunk: fn(Req) -> Option<Vec<u8>>,
    respond: fn(Vec<u8>) -> Resp,
) -> Response<ResponseStream<Resp>>
where
    Req: Send + 'static,
    Resp: Send + 'static,
{
    let responses = request
        .into_inner()
        .map(move |request| request.map(|r| respond(chunk(r).unwrap_or_default())));
    Response::new(Box::pin(responses))
}

#[tonic::async_trait]
impl pb::crypto_server::Crypto for Echo {
    type EncryptStreamStream = ResponseStream<pb::EncryptStreamResponse>;
    type DecryptStreamStream = ResponseStream<pb::DecryptStreamResponse>;

    async fn encrypt_stream(
        &self,
        request: Request<Streaming<pb::EncryptStreamRequest>>,
    ) -> Result<Response<Self::EncryptStreamStream>, Status> {
        Ok(pass_through(
            request,
            |r| match r.part {
                Some(pb::encrypt_stream_request::Part::Chunk(chunk)) => Some(chunk),
                _ => None,
            },
            |chunk| pb::EncryptStreamResponse {
                chunk,
                key_version: 1,
            },
        ))
    }

    async fn decrypt_stream(
        &self,
        request: Request<Streaming<pb::DecryptStreamRequest>>,
    ) -> Result<Response<Self::DecryptStreamStream>, Status> {
        Ok(pass_through(
            request,
            |r| match r.part {
                Some(pb::decrypt_stream_request::Part::Chunk(chunk)) => Some(chunk),
                _ => None,
            },
            |chunk| pb::DecryptStreamResponse {
                chunk,
                key_version: 1,
            },
        ))
    }

    async fn encrypt(
        &self,
        request: Request<pb::EncryptRequest>,
    ) -> Result<Response<pb::EncryptResponse>, Status> {
        let request = request.into_inner();
        Ok(Response::new(seal(
            request.plaintext,
            request.deterministic,
        )))
    }

    async fn decrypt(
        &self,
        request: Request<pb::DecryptRequest>,
    ) -> Result<Response<pb::DecryptResponse>, Status> {
        Ok(Response::new(open(request.into_inner().ciphertext)))
    }

    async fn encrypt_batch(
        &self,
        request: Request<pb::EncryptBatchRequest>,
    ) -> Result<Response<pb::EncryptBatchResponse>, Status> {
        let results = request
            .into_inner()
            .items
            .into_iter()
            .map(|item| pb::EncryptResult {
                result: Some(pb::encrypt_result::Result::Ok(seal(
                    item.plaintext,
                    item.deterministic,
                ))),
            })
            .collect();
        Ok(Response::new(pb::EncryptBatchResponse { results }))
    }

    async fn decrypt_batch(
        &self,
        request: Request<pb::DecryptBatchRequest>,
    ) -> Result<Response<pb::DecryptBatchResponse>, Status> {
        let results = request
            .into_inner()
            .items
            .into_iter()
            .map(|item| pb::DecryptResult {
                result: Some(pb::decrypt_result::Result::Ok(open(item.ciphertext))),
            })
            .collect();
        Ok(Response::new(pb::DecryptBatchResponse { results }))
    }

    async fn rewrap(
        &self,
        request: Request<pb::RewrapRequest>,
    ) -> Result<Response<pb::RewrapResponse>, Status> {
        Ok(Response::new(pb::RewrapResponse {
            ciphertext: request.into_inner().ciphertext,
            key_version: 1,
            previous_key_version: 1,
        }))
    }

    /// A data key and a wrapped form of the real sizes, all zeros.
    async fn generate_data_key(
        &self,
        _: Request<pb::GenerateDataKeyRequest>,
    ) -> Result<Response<pb::GenerateDataKeyResponse>, Status> {
        Ok(Response::new(pb::GenerateDataKeyResponse {
            data_key: vec![0; 32],
            wrapped_data_key: vec![0; datakey::TENANT_WRAPPED_LEN],
            key_version: 1,
        }))
    }

    async fn decrypt_data_key(
        &self,
        _: Request<pb::DecryptDataKeyRequest>,
    ) -> Result<Response<pb::DecryptDataKeyResponse>, Status> {
        Ok(Response::new(pb::DecryptDataKeyResponse {
            data_key: vec![0; 32],
            key_version: 1,
        }))
    }

    async fn rewrap_data_key(
        &self,
        request: Request<pb::RewrapDataKeyRequest>,
    ) -> Result<Response<pb::RewrapDataKeyResponse>, Status> {
        Ok(Response::new(pb::RewrapDataKeyResponse {
            wrapped_data_key: request.into_inner().wrapped_data_key,
            key_version: 1,
            previous_key_version: 1,
        }))
    }

    async fn blind_index(
        &self,
        request: Request<pb::BlindIndexRequest>,
    ) -> Result<Response<pb::BlindIndexResponse>, Status> {
        Ok(Response::new(zero_token(request.into_inner().bits)))
    }

    async fn blind_index_batch(
        &self,
        request: Request<pb::BlindIndexBatchRequest>,
    ) -> Result<Response<pb::BlindIndexBatchResponse>, Status> {
        let results = request
            .into_inner()
            .items
            .into_iter()
            .map(|item| pb::BlindIndexResult {
                result: Some(pb::blind_index_result::Result::Ok(zero_token(item.bits))),
            })
            .collect();
        Ok(Response::new(pb::BlindIndexBatchResponse { results }))
    }
}

/// Serves [`Echo`] on `listen` until SIGTERM or ctrl-c. The address bound
/// is printed first, on its own line: `listening on ADDR`.
pub async fn serve(listen: ListenAddr) -> Result<(), String> {
    let listener = server::Listener::bind(&listen)
        .await
        .map_err(|e| e.to_string())?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {}", listener.local_addr())
            .and_then(|()| out.flush())
            .map_err(|e| format!("cannot write to standard output: {e}"))?;
    }
    // The same wire bounds as the sidecar's defaults.
    keywarden::api::codec::raise_max_batch_items(RequestLimits::default().max_batch_items);
    let mut routes = Routes::builder();
    routes.add_service(server::crypto_server(
        Echo,
        RequestLimits::default().max_request_bytes,
    ));
    server::serve(
        server::admit_every_call(routes.routes()),
        vec![listener],
        None,
        &keywarden::config::ServerConfig::default(),
        server::shutdown_signal(),
    )
    .await
    .map_err(|e| e.to_string())
}

/// `keywarden-bench echo` as a child process, killed on drop.
pub struct EchoProcess {
    child: Child,
    addr: String,
    socket: Option<PathBuf>,
}

impl EchoProcess {
    /// Starts the echo service on the kind of transport `like` names: a
    /// unix socket in the temporary directory for a unix socket, a free port
    /// on 127.0.0.1 for TCP.
    pub async fn start(like: &str) -> Result<Self, String> {
        let socket = like.starts_with("unix:").then(|| {
            std::env::temp_dir().join(format!("keywarden-bench-echo-{}.sock", std::process::id()))
        });
        let listen = match &socket {
            Some(path) => format!("unix:{}", path.display()),
            None => "127.0.0.1:0".to_owned(),
        };
        let exe = std::env::current_exe()
            .map_err(|e| format!("cannot find this program to start the echo service: {e}"))?;
        let mut child = Command::new(exe)
            .args(["echo", "--listen", &listen])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start the echo service: {e}"))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut process = EchoProcess {
            child,
            addr: String::new(),
            socket,
        };
        let line = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::task::spawn_blocking(move || {
                let mut line = String::new();
                BufReader::new(stdout).read_line(&mut line).map(|_| line)
            }),
        )
        .await
        .map_err(|_| "the echo service did not start within 10 s".to_owned())?
        .map_err(|e| format!("the echo service: {e}"))?
        .map_err(|e| format!("the echo service: {e}"))?;
        process.addr = line
            .trim()
            .strip_prefix("listening on ")
            .ok_or_else(|| format!("the echo service did not start: {:?}", line.trim()))?
            .to_owned();
        Ok(process)
    }

    /// Where it listens, as `--addr` takes it.
    pub fn addr(&self) -> &str {
        &self.addr
    }
}

impl Drop for EchoProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(path) = &self.socket {
            let _ = std::fs::remove_file(path);
        }
    }
}
