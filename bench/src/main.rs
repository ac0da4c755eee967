//! `keywarden-bench`: the load generator of issue 7, a program of its own
//! beside the sidecar (the `keywarden` library and binary carry none of it).
//!
//! - `run` drives a running sidecar with C concurrent calls over N HTTP/2
//!   connections (closed loop at full speed, or open loop at a fixed arrival
//!   rate), and with `--echo` runs the same workload against a bare echo
//!   service of the same message sizes on the same transport (the transport
//!   limit), in the same run. Latency goes into an HDR histogram.
//! - `echo` is that echo service ([`echo`]), started by `run` as a child
//!   process of this program.
//! - `startup` measures start-up time and resident memory of the sidecar
//!   binary, by default the `keywarden` beside this program ([`startup`]).
//! - `stream` and `flood`: the streaming calls, and a memory attack.
//!
//! What is measured never contains a payload: the plaintext is a fixed
//! pattern, and neither it, a ciphertext nor a token is ever printed.

mod baseline;
mod echo;
mod flood;
mod load;
mod report;
mod startup;
mod streams;
mod tenants;

use std::{
    io::IsTerminal,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use clap::{Args, Parser, Subcommand, ValueEnum};
use futures::{StreamExt, stream};
use tonic::{Code, Status, transport::Channel};

use keywarden::{
    api::{pb, status::code_name},
    client::{self, Bearer, ClientTls, Connection},
    config::ListenAddr,
    envelope::Context,
};

use load::{Length, Pace, Workload};
use report::{Report, TargetResult};
use tenants::TenantPicker;

#[derive(Parser)]
#[command(
    name = "keywarden-bench",
    version,
    about = "Load generator: throughput and latency of a running sidecar beside a bare echo \
             service; start-up time and memory"
)]
struct Cli {
    #[command(flatten)]
    connection: Connection,

    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Drive a running sidecar (--addr) and print throughput and latency
    /// percentiles; with --echo, also the bare transport limit.
    Run(RunArgs),
    /// A bare gRPC echo of the Crypto service: no crypto, no auth, no audit,
    /// the same message sizes and server settings (started by `run --echo`).
    #[command(hide = true)]
    Echo(EchoArgs),
    /// Measure start-up time (spawn to first answered call) and the resident
    /// memory of a sidecar on the embedded default, idle and with keys cached.
    Startup(startup::StartupArgs),
    /// Send one large object through EncryptStream and back through
    /// DecryptStream: throughput, and with --pid the sidecar's peak memory.
    Stream(streams::StreamArgs),
    /// Flood a sidecar (--pid) with 16 MiB batches from N senders,
    /// anonymous or not, and report its peak memory and a legitimate
    /// caller's latency meanwhile (docs/SECURITY.md 12.2).
    Flood(flood::FloodArgs),
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Calls in flight at once (one client task each).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: u32,
    /// HTTP/2 connections, shared round-robin by the clients.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub connections: u32,
    /// What every call does. decrypt first encrypts a pool of ciphertexts
    /// per tenant (not measured), then measures decrypting them;
    /// generate-data-key makes a data key per call (it needs the `datakey`
    /// permission, which the embedded admin token has). blind-index computes
    /// a 32-bit token of the payload.
    #[arg(long, value_enum, default_value_t = Op::Encrypt)]
    pub op: Op,
    /// Plaintext bytes per item (a fixed pattern).
    #[arg(long, default_value_t = 128)]
    pub payload: usize,
    /// Encrypt with `deterministic = true` (AES-256-SIV, envelope suite
    /// 0x04; issue 17): every item is the same plaintext, tenant and
    /// context, so every answer is the same ciphertext. With --op decrypt,
    /// the pool is deterministic ciphertexts; with --baseline, the seal loop
    /// is the deterministic envelope's.
    #[arg(long)]
    pub deterministic: bool,
    /// Items per call: 1 = unary Encrypt/Decrypt/BlindIndex, more =
    /// EncryptBatch/DecryptBatch/BlindIndexBatch.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch: u32,
    /// Tenants PREFIX-0 .. PREFIX-(T-1); each call picks one.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub tenants: u32,
    /// How each call picks its tenant.
    #[arg(long, value_enum, default_value_t = Distribution::Uniform)]
    pub distribution: Distribution,
    /// The Zipf law's exponent (YCSB's default); tenant 0 is the hottest.
    #[arg(long, default_value_t = 0.99)]
    pub zipf_exponent: f64,
    /// Tenant ids are PREFIX-0 .. PREFIX-(T-1).
    #[arg(long, default_value = "bench")]
    pub tenant_prefix: String,
    /// First create the tenants that do not exist yet (Admin.CreateTenant).
    #[arg(long)]
    pub setup: bool,
    /// warm: one Encrypt per tenant before measuring, so its keys are cached.
    /// cold: no such touch (only that; keys cached earlier may still be).
    #[arg(long, value_enum, default_value_t = CacheMode::Warm)]
    pub cache: CacheMode,
    /// How long to measure (after the warm-up), e.g. 10s, 1m.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// Measure this many calls instead of a duration.
    #[arg(long, conflicts_with = "duration", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// Calls made before measuring, not recorded.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    pub warmup: Duration,
    /// Open loop: start calls at this fixed rate per second, latency counted
    /// from each call's scheduled start (no coordinated omission). Without
    /// it: closed loop, each client calls again as soon as it has an answer.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Also run the same workload against a bare echo service (a child
    /// process) on the same transport, and print the ratio.
    #[arg(long)]
    pub echo: bool,
    /// Also measure, in this process on one thread, the crypto limits for
    /// the same items: the envelope's seal loop and the raw AES-256-GCM seal,
    /// with each crypto provider (encrypt only).
    #[arg(long)]
    pub baseline: bool,
    /// Print one JSON document instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct EchoArgs {
    /// host:port or unix:/path; port 0 picks a free port. The address bound
    /// is printed on the first line of standard output.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: ListenAddr,
    /// Runtime threads, as the sidecar's `worker_threads` (the same
    /// variable and default, so that both run on the same runtime).
    #[arg(
        long,
        env = "KEYWARDEN_WORKER_THREADS",
        default_value_t = 1,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new()
            .range(0..=keywarden::config::MAX_WORKER_THREADS as u64)
    )]
    pub worker_threads: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Encrypt,
    Decrypt,
    /// GenerateDataKey under the tenant key (unary only; --payload is not
    /// used): a fresh data key and its wrapped form per call.
    #[value(name = "generate-data-key")]
    #[serde(rename = "generate-data-key")]
    GenerateDataKey,
    /// BlindIndex (BlindIndexBatch with --batch): the payload is the one
    /// value, 32 bits, no transformation.
    #[serde(rename = "blind-index")]
    BlindIndex,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Distribution {
    Uniform,
    Zipf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    Warm,
    Cold,
}

/// The sidecar `run`, `stream` and `flood` drive, as the global connection
/// options name it.
pub struct SidecarAddr {
    pub addr: String,
    pub tls: Option<ClientTls>,
    pub bearer: Bearer,
}

impl SidecarAddr {
    fn new(connection: &Connection) -> Result<Self, String> {
        let (tls, bearer) = connection.credentials()?;
        Ok(SidecarAddr {
            addr: connection.addr.clone(),
            tls,
            bearer,
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The echo service runs on the runtime the sidecar would have; the rest
    // on one thread per CPU.
    let worker_threads = match &cli.command {
        BenchCommand::Echo(args) => args.worker_threads,
        _ => 0,
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if worker_threads > 0 {
        runtime.worker_threads(worker_threads);
    }
    match runtime.enable_all().build() {
        Ok(runtime) => runtime.block_on(run_command(cli.command, &cli.connection)),
        Err(e) => {
            eprintln!("keywarden-bench: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run_command(command: BenchCommand, connection: &Connection) -> ExitCode {
    match command {
        BenchCommand::Echo(args) => match echo::serve(args.listen).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("keywarden-bench echo: {e}");
                ExitCode::FAILURE
            }
        },
        BenchCommand::Startup(args) => startup::run(args).await,
        BenchCommand::Stream(args) => {
            let json = args.json;
            let report = async { streams::run(args, SidecarAddr::new(connection)?).await }.await;
            finish(report.map(|report| {
                report.print(json);
                true
            }))
        }
        BenchCommand::Flood(args) => {
            let json = args.json;
            let report = async { flood::run(args, SidecarAddr::new(connection)?).await }.await;
            finish(report.map(|report| {
                report.print(json);
                true
            }))
        }
        BenchCommand::Run(args) => {
            let json = args.json;
            let report = async { run(args, SidecarAddr::new(connection)?).await }.await;
            finish(report.map(|report| {
                let clean = report.print(json);
                if !clean {
                    eprintln!("keywarden-bench: some calls failed (see errors)");
                }
                clean
            }))
        }
    }
}

/// The exit code of a `run` or `stream`: failure on an error (printed) or
/// an unclean run.
fn finish(outcome: Result<bool, String>) -> ExitCode {
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(message) => {
            eprintln!("keywarden-bench: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The context map of every item: two entries, as a typical field.
pub fn bench_context() -> Context {
    Context::from([
        ("table".to_owned(), "users".to_owned()),
        ("column".to_owned(), "email".to_owned()),
    ])
}

/// The tenant ids of a run.
pub fn tenant_ids(prefix: &str, tenants: u32) -> Vec<String> {
    (0..tenants).map(|i| format!("{prefix}-{i}")).collect()
}

/// What every measured call does, checked before anything is sent.
fn workload(args: &RunArgs) -> Result<Workload, String> {
    if let Some(rate) = args.rate
        && !(rate.is_finite() && rate > 0.0)
    {
        return Err("--rate must be a positive number of calls per second".into());
    }
    if args.op == Op::GenerateDataKey && args.batch != 1 {
        return Err("--op generate-data-key has no batch form: --batch must be 1".into());
    }
    let picker = TenantPicker::new(args.tenants, args.distribution, args.zipf_exponent)?;
    Ok(Workload {
        op: args.op,
        deterministic: args.deterministic,
        plaintext: vec![0x5a; args.payload],
        batch: args.batch as usize,
        context: bench_context(),
        tenant_ids: tenant_ids(&args.tenant_prefix, args.tenants),
        picker,
        pool: Vec::new(),
    })
}

/// `bench run`: set up, measure the sidecar, then (with `--echo`) the echo.
pub async fn run(args: RunArgs, sidecar: SidecarAddr) -> Result<Report, String> {
    let workload = workload(&args)?;
    let pace = match args.rate {
        Some(rate) => Pace::Open { rate },
        None => Pace::Closed,
    };
    let length = match args.count {
        Some(count) => Length::Count(count),
        None => Length::Duration(args.duration),
    };
    let concurrency = args.concurrency as usize;
    let channels = connect_all(&sidecar.addr, sidecar.tls.as_ref(), args.connections).await?;
    let mut notes = Vec::new();
    if args.setup {
        let admin = client::admin(channels[0].clone(), sidecar.bearer.clone());
        let done = setup_tenants(admin, &workload.tenant_ids, concurrency).await?;
        notes.push(format!(
            "set-up: {} tenant(s) created, {} existed already",
            done.created, done.existed
        ));
    }
    let clients = crypto_clients(&channels, &sidecar.bearer, concurrency);
    match (args.op, args.cache) {
        (Op::Decrypt, _) => {
            notes.push(
                "decrypt: a pool of ciphertexts per tenant was encrypted before measuring, \
                 which touched (cached) every tenant's keys whatever --cache says"
                    .into(),
            );
        }
        (Op::Encrypt | Op::GenerateDataKey, CacheMode::Warm) => {
            touch_tenants(&clients, &workload.tenant_ids, &workload.context).await?;
            notes.push(
                "cache warm: every tenant was touched by one Encrypt before measuring".into(),
            );
        }
        (Op::BlindIndex, CacheMode::Warm) => {
            touch_index_keys(&clients, &workload.tenant_ids, &workload.context).await?;
            notes.push(
                "cache warm: every tenant was touched by one BlindIndex before measuring (which \
                 also made its index key)"
                    .into(),
            );
        }
        (Op::BlindIndex, CacheMode::Cold) => notes.push(
            "cache cold: this run did not touch the tenants before measuring; a tenant's first \
             BlindIndex makes its index key"
                .into(),
        ),
        (Op::Encrypt | Op::GenerateDataKey, CacheMode::Cold) => notes.push(
            "cache cold: this run did not touch the tenants before measuring; keys cached by \
             earlier calls may still be cached"
                .into(),
        ),
    }
    if let Pace::Open { .. } = pace {
        notes.push(
            "open loop: latency counts from each call's scheduled start, so it includes any \
             queueing when the target falls behind the rate"
                .into(),
        );
    }

    let mut results = vec![measure("sidecar", &clients, &workload, pace, length, &args).await?];
    if args.echo {
        let echo = echo::EchoProcess::start(&sidecar.addr).await?;
        if sidecar.tls.is_some() {
            notes.push("the sidecar was reached over TLS; the echo service is plaintext".into());
        }
        if matches!(sidecar.addr.parse::<ListenAddr>(), Ok(ListenAddr::Tcp(tcp)) if !tcp.ip().is_loopback())
        {
            notes.push(
                "the sidecar is on another host; the echo service runs on this one, so the \
                 ratio compares different networks"
                    .into(),
            );
        }
        let channels = connect_all(echo.addr(), None, args.connections).await?;
        // The same token goes to the echo service, so the requests have the
        // same size on the wire; the echo service ignores it.
        let clients = crypto_clients(&channels, &sidecar.bearer, concurrency);
        results.push(measure("echo", &clients, &workload, pace, length, &args).await?);
        drop(echo);
    }
    let mut report = Report::new(&args, results, notes);
    if args.baseline && matches!(args.op, Op::Encrypt | Op::BlindIndex) {
        let (plaintext, tenant, context, op, deterministic) = (
            workload.plaintext.clone(),
            workload.tenant_ids[0].clone(),
            workload.context.clone(),
            args.op,
            workload.deterministic,
        );
        let length = Duration::from_secs(2);
        report.set_baselines(
            tokio::task::spawn_blocking(move || match op {
                Op::BlindIndex => {
                    baseline::measure_blind_index(&plaintext, &tenant, &context, length)
                }
                _ => baseline::measure(&plaintext, &tenant, &context, deterministic, length),
            })
            .await
            .map_err(|e| format!("the baseline measurement failed: {e}"))?,
        );
    }
    Ok(report)
}

/// Measures one target: the decrypt pool first (for decrypt), then the load.
async fn measure(
    target: &'static str,
    clients: &[pb::crypto_client::CryptoClient<client::Authed>],
    workload: &Workload,
    pace: Pace,
    length: Length,
    args: &RunArgs,
) -> Result<TargetResult, String> {
    let mut workload = workload.clone();
    if workload.op == Op::Decrypt {
        workload.pool = encrypt_pool(clients, &workload).await?;
    }
    let outcome = load::drive(clients, Arc::new(workload), pace, length, args.warmup).await;
    Ok(TargetResult::new(target, &outcome, args))
}

async fn connect_all(
    addr: &str,
    tls: Option<&ClientTls>,
    connections: u32,
) -> Result<Vec<Channel>, String> {
    let mut channels = Vec::new();
    for _ in 0..connections {
        channels.push(client::connect(addr, tls).await?);
    }
    Ok(channels)
}

/// One client per concurrent call, taking the connections in turn.
fn crypto_clients(
    channels: &[Channel],
    bearer: &Bearer,
    concurrency: usize,
) -> Vec<pb::crypto_client::CryptoClient<client::Authed>> {
    (0..concurrency)
        .map(|i| client::crypto(channels[i % channels.len()].clone(), bearer.clone()))
        .collect()
}

/// A progress bar on a terminal (standard error), nothing elsewhere.
fn progress(total: usize, what: &str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() || total < 2 {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} ({eta} left)")
            .expect("the template is valid")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}

/// Runs `call` for every index in `0..total`, `concurrency` at a time, with
/// a progress bar; stops at the first error.
async fn for_each<F, Fut>(
    total: usize,
    concurrency: usize,
    what: &str,
    call: F,
) -> Result<(), String>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let bar = progress(total, what);
    let mut calls = stream::iter(0..total)
        .map(&call)
        .buffer_unordered(concurrency.max(1));
    while let Some(result) = calls.next().await {
        if let Err(e) = result {
            bar.abandon();
            return Err(format!("{what}: {e}"));
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(())
}

/// What [`setup_tenants`] did.
#[derive(Debug, Default)]
pub struct SetUp {
    pub created: u64,
    pub existed: u64,
}

/// Creates every tenant of `ids` that does not exist yet.
pub async fn setup_tenants(
    admin: pb::admin_client::AdminClient<client::Authed>,
    ids: &[String],
    concurrency: usize,
) -> Result<SetUp, String> {
    let created = AtomicU64::new(0);
    let existed = AtomicU64::new(0);
    for_each(ids.len(), concurrency, "creating tenants", |i| {
        let mut admin = admin.clone();
        let (created, existed) = (&created, &existed);
        async move {
            let request = pb::CreateTenantRequest {
                tenant_id: ids[i].clone(),
                ..Default::default()
            };
            match admin.create_tenant(request).await {
                Ok(_) => created.fetch_add(1, Ordering::Relaxed),
                Err(status) if status.code() == Code::AlreadyExists => {
                    existed.fetch_add(1, Ordering::Relaxed)
                }
                Err(status) => return Err(failed(&ids[i], &status)),
            };
            Ok(())
        }
    })
    .await?;
    Ok(SetUp {
        created: created.into_inner(),
        existed: existed.into_inner(),
    })
}

fn failed(tenant: &str, status: &Status) -> String {
    format!(
        "tenant {tenant}: {}: {}",
        code_name(status.code()),
        status.message()
    )
}

/// One Encrypt of 16 bytes per tenant, so its keys are in the cache.
pub async fn touch_tenants(
    clients: &[pb::crypto_client::CryptoClient<client::Authed>],
    ids: &[String],
    context: &Context,
) -> Result<(), String> {
    for_each(ids.len(), clients.len(), "touching tenants", |i| {
        let mut client = clients[i % clients.len()].clone();
        let request = pb::EncryptRequest {
            tenant_id: ids[i].clone(),
            subject_id: String::new(),
            context: context.clone(),
            plaintext: vec![0x5a; 16],
            deterministic: false,
            key_version: 0,
        };
        async move {
            client
                .encrypt(request)
                .await
                .map(drop)
                .map_err(|status| failed(&ids[i], &status))
        }
    })
    .await
}

/// One BlindIndex per tenant: caches its keys, and makes its index key.
pub async fn touch_index_keys(
    clients: &[pb::crypto_client::CryptoClient<client::Authed>],
    ids: &[String],
    context: &Context,
) -> Result<(), String> {
    for_each(ids.len(), clients.len(), "touching tenants", |i| {
        let mut client = clients[i % clients.len()].clone();
        let request = pb::BlindIndexRequest {
            tenant_id: ids[i].clone(),
            context: context.clone(),
            values: vec![pb::IndexValue {
                value: vec![0x5a; 16],
                transformations: vec![],
            }],
            bits: load::INDEX_BITS,
            key_version: 0,
            all_versions: false,
        };
        async move {
            client
                .blind_index(request)
                .await
                .map(drop)
                .map_err(|status| failed(&ids[i], &status))
        }
    })
    .await
}

/// Ciphertexts per tenant that `--op decrypt` cycles through.
fn pool_size(tenants: usize) -> usize {
    if tenants <= 1024 { 8 } else { 1 }
}

/// Encrypts the decrypt pool: [`pool_size`] ciphertexts of the workload's
/// plaintext per tenant, through the target itself.
async fn encrypt_pool(
    clients: &[pb::crypto_client::CryptoClient<client::Authed>],
    workload: &Workload,
) -> Result<Vec<Vec<Vec<u8>>>, String> {
    let per_tenant = pool_size(workload.tenant_ids.len());
    let slots: Vec<std::sync::Mutex<Vec<Vec<u8>>>> = (0..workload.tenant_ids.len())
        .map(|_| std::sync::Mutex::new(Vec::with_capacity(per_tenant)))
        .collect();
    let total = workload.tenant_ids.len() * per_tenant;
    for_each(total, clients.len(), "encrypting the decrypt pool", |i| {
        let mut client = clients[i % clients.len()].clone();
        let tenant = i / per_tenant;
        let request = pb::EncryptRequest {
            tenant_id: workload.tenant_ids[tenant].clone(),
            subject_id: String::new(),
            context: workload.context.clone(),
            plaintext: workload.plaintext.clone(),
            deterministic: workload.deterministic,
            key_version: 0,
        };
        let slots = &slots;
        async move {
            let response = client
                .encrypt(request)
                .await
                .map_err(|status| failed(&workload.tenant_ids[tenant], &status))?;
            slots[tenant]
                .lock()
                .expect("no panic while holding the lock")
                .push(response.into_inner().ciphertext);
            Ok(())
        }
    })
    .await?;
    Ok(slots
        .into_iter()
        .map(|slot| slot.into_inner().expect("no panic while holding the lock"))
        .collect())
}

#[cfg(test)]
mod tests;
