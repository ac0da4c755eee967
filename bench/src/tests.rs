use std::time::Duration;

use clap::Parser;
use rand::{SeedableRng, rngs::StdRng};
use tonic::Request;

use super::{
    BenchCommand, CacheMode, Distribution, Op, RunArgs,
    echo::Echo,
    startup::{Memory, median, parse_status},
    tenants::TenantPicker,
};
use keywarden::{
    api::pb::{self, crypto_server::Crypto as _},
    envelope::TENANT_OVERHEAD,
};

#[derive(Parser)]
struct Bench {
    #[command(subcommand)]
    command: BenchCommand,
}

fn run_args(args: &[&str]) -> Result<RunArgs, clap::Error> {
    let full = [&["bench", "run"][..], args].concat();
    match Bench::try_parse_from(full)?.command {
        BenchCommand::Run(args) => Ok(args),
        other => panic!("parsed as {other:?}"),
    }
}

#[test]
fn run_defaults() {
    let args = run_args(&[]).unwrap();
    assert_eq!(args.concurrency, 16);
    assert_eq!(args.connections, 1);
    assert_eq!(args.op, Op::Encrypt);
    assert_eq!(args.payload, 128);
    assert_eq!(args.batch, 1);
    assert_eq!(args.tenants, 1);
    assert_eq!(args.distribution, Distribution::Uniform);
    assert_eq!(args.zipf_exponent, 0.99);
    assert_eq!(args.tenant_prefix, "bench");
    assert_eq!(args.cache, CacheMode::Warm);
    assert_eq!(args.duration, Duration::from_secs(10));
    assert_eq!(args.count, None);
    assert_eq!(args.warmup, Duration::from_secs(2));
    assert_eq!(args.rate, None);
    assert!(!args.setup && !args.echo && !args.json);
}

#[test]
fn run_options() {
    let args = run_args(&[
        "--concurrency",
        "64",
        "--connections",
        "4",
        "--op",
        "decrypt",
        "--payload",
        "1048576",
        "--batch",
        "1000",
        "--tenants",
        "100000",
        "--distribution",
        "zipf",
        "--zipf-exponent",
        "1.2",
        "--tenant-prefix",
        "load",
        "--setup",
        "--cache",
        "cold",
        "--count",
        "500",
        "--warmup",
        "500ms",
        "--rate",
        "2500.5",
        "--echo",
        "--json",
    ])
    .unwrap();
    assert_eq!((args.concurrency, args.connections), (64, 4));
    assert_eq!(args.op, Op::Decrypt);
    assert_eq!(
        (args.payload, args.batch, args.tenants),
        (1 << 20, 1000, 100_000)
    );
    assert_eq!(args.distribution, Distribution::Zipf);
    assert_eq!(args.zipf_exponent, 1.2);
    assert_eq!(args.tenant_prefix, "load");
    assert_eq!(args.cache, CacheMode::Cold);
    assert_eq!(args.count, Some(500));
    assert_eq!(args.warmup, Duration::from_millis(500));
    assert_eq!(args.rate, Some(2500.5));
    assert!(args.setup && args.echo && args.json);

    let args = run_args(&["--duration", "1m30s"]).unwrap();
    assert_eq!(args.duration, Duration::from_secs(90));
}

#[test]
fn run_refuses_nonsense() {
    for bad in [
        &["--concurrency", "0"][..],
        &["--connections", "0"],
        &["--batch", "0"],
        &["--tenants", "0"],
        &["--count", "0"],
        &["--op", "rewrap"],
        &["--distribution", "pareto"],
        &["--cache", "hot"],
        &["--duration", "ten seconds"],
        &["--duration", "5s", "--count", "10"],
    ] {
        assert!(run_args(bad).is_err(), "{bad:?} was accepted");
    }
    for bad_rate in ["0", "-5", "NaN", "inf"] {
        let args = run_args(&[&format!("--rate={bad_rate}")]).unwrap();
        assert!(super::workload(&args).is_err(), "--rate {bad_rate}");
    }
    let args = run_args(&[
        "--tenants",
        "10",
        "--distribution",
        "zipf",
        "--zipf-exponent=-1",
    ])
    .unwrap();
    assert!(super::workload(&args).is_err());
}

#[test]
fn echo_and_startup_parse() {
    match Bench::try_parse_from(["bench", "echo", "--listen", "unix:/tmp/x.sock"])
        .unwrap()
        .command
    {
        BenchCommand::Echo(args) => assert_eq!(args.listen.to_string(), "unix:/tmp/x.sock"),
        other => panic!("{other:?}"),
    }
    match Bench::try_parse_from(["bench", "echo", "--worker-threads", "4"])
        .unwrap()
        .command
    {
        BenchCommand::Echo(args) => assert_eq!(args.worker_threads, 4),
        other => panic!("{other:?}"),
    }
    // The sidecar's bound on `worker_threads`, so the echo cannot ask for more.
    assert!(Bench::try_parse_from(["bench", "echo", "--worker-threads", "257"]).is_err());
    assert!(Bench::try_parse_from(["bench", "echo", "--worker-threads", "-1"]).is_err());
    match Bench::try_parse_from(["bench", "startup", "--restarts", "3", "--tenants", "0"])
        .unwrap()
        .command
    {
        BenchCommand::Startup(args) => assert_eq!((args.restarts, args.tenants), (3, 0)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn tenant_ids_follow_the_prefix() {
    assert_eq!(
        super::tenant_ids("bench", 3),
        ["bench-0", "bench-1", "bench-2"]
    );
}

fn counts(picker: &TenantPicker, tenants: usize, draws: usize) -> Vec<u64> {
    let mut rng = StdRng::seed_from_u64(7);
    let mut counts = vec![0u64; tenants];
    for _ in 0..draws {
        let t = picker.pick(&mut rng);
        assert!(t < tenants, "picked {t} of {tenants}");
        counts[t] += 1;
    }
    counts
}

#[test]
fn one_tenant_is_always_tenant_zero() {
    for distribution in [Distribution::Uniform, Distribution::Zipf] {
        let picker = TenantPicker::new(1, distribution, 0.99).unwrap();
        assert_eq!(counts(&picker, 1, 1000), [1000]);
    }
}

#[test]
fn uniform_covers_every_tenant_evenly() {
    let picker = TenantPicker::new(10, Distribution::Uniform, 0.99).unwrap();
    let counts = counts(&picker, 10, 100_000);
    for (t, n) in counts.iter().enumerate() {
        // Expected 10,000 each; 5 standard deviations is about 475.
        assert!((9_500..=10_500).contains(n), "tenant {t}: {n}");
    }
}

#[test]
fn zipf_is_skewed_by_rank() {
    let tenants = 1000;
    let s = 0.99;
    let picker = TenantPicker::new(tenants as u32, Distribution::Zipf, s).unwrap();
    let draws = 200_000;
    let counts = counts(&picker, tenants, draws);
    // P(rank k) = k^-s / H(n, s).
    let h: f64 = (1..=tenants).map(|k| (k as f64).powf(-s)).sum();
    for rank in [1usize, 2, 10] {
        let expected = draws as f64 * (rank as f64).powf(-s) / h;
        let got = counts[rank - 1] as f64;
        assert!(
            (got - expected).abs() < 0.1 * expected,
            "rank {rank}: {got} draws, expected about {expected:.0}"
        );
    }
    // Tenant 0 is the hottest; the top 10% of tenants take most draws.
    assert_eq!(counts.iter().max(), Some(&counts[0]));
    let top: u64 = counts[..tenants / 10].iter().sum();
    assert!(top as f64 > 0.6 * draws as f64, "top 10%: {top}");
    // And the tail is reached.
    assert!(counts[tenants / 2..].iter().sum::<u64>() > 0);
}

#[tokio::test]
async fn echo_answers_the_sizes_of_the_sidecar() {
    let context = super::bench_context();
    for size in [0usize, 1, 128, 64 << 10] {
        let plaintext = vec![0x5a; size];
        let sealed = Echo
            .encrypt(Request::new(pb::EncryptRequest {
                tenant_id: "t".into(),
                subject_id: String::new(),
                context: context.clone(),
                plaintext: plaintext.clone(),
                deterministic: false,
                key_version: 0,
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(sealed.ciphertext.len(), size + TENANT_OVERHEAD);
        assert_eq!(sealed.key_version, 1);
        let opened = Echo
            .decrypt(Request::new(pb::DecryptRequest {
                tenant_id: "t".into(),
                context: context.clone(),
                ciphertext: sealed.ciphertext.clone(),
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(opened.plaintext, plaintext);

        let batch = Echo
            .encrypt_batch(Request::new(pb::EncryptBatchRequest {
                tenant_id: "t".into(),
                items: vec![
                    pb::EncryptItem {
                        subject_id: String::new(),
                        context: context.clone(),
                        plaintext: plaintext.clone(),
                        deterministic: false,
                        key_version: 0,
                    };
                    3
                ],
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(batch.results.len(), 3);
        let mut items = Vec::new();
        for result in batch.results {
            match result.result {
                Some(pb::encrypt_result::Result::Ok(ok)) => {
                    assert_eq!(ok.ciphertext.len(), size + TENANT_OVERHEAD);
                    items.push(pb::DecryptItem {
                        context: context.clone(),
                        ciphertext: ok.ciphertext,
                    });
                }
                other => panic!("{other:?}"),
            }
        }
        let opened = Echo
            .decrypt_batch(Request::new(pb::DecryptBatchRequest {
                tenant_id: "t".into(),
                items,
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(opened.results.len(), 3);
        for result in opened.results {
            match result.result {
                Some(pb::decrypt_result::Result::Ok(ok)) => assert_eq!(ok.plaintext, plaintext),
                other => panic!("{other:?}"),
            }
        }

        let rewrapped = Echo
            .rewrap(Request::new(pb::RewrapRequest {
                tenant_id: "t".into(),
                context: context.clone(),
                ciphertext: sealed.ciphertext.clone(),
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(rewrapped.ciphertext.len(), size + TENANT_OVERHEAD);
    }
}

#[test]
fn proc_status_is_read() {
    let status =
        "Name:\tkeywarden\nVmPeak:\t  812345 kB\nVmHWM:\t   20480 kB\nVmRSS:\t   15360 kB\n";
    assert_eq!(
        parse_status(status),
        Some(Memory {
            rss_kib: 15360,
            hwm_kib: 20480
        })
    );
    assert_eq!(parse_status("Name:\tx\n"), None);
}

#[test]
fn medians() {
    assert_eq!(median(&mut []), 0.0);
    assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
    assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
}

#[tokio::test]
async fn echo_answers_the_sizes_of_deterministic_envelopes() {
    use keywarden::envelope::deterministic::DETERMINISTIC_TENANT_OVERHEAD;
    for size in [0usize, 1, 128] {
        let plaintext = vec![0x5a; size];
        let sealed = Echo
            .encrypt(Request::new(pb::EncryptRequest {
                tenant_id: "t".into(),
                subject_id: String::new(),
                context: super::bench_context(),
                plaintext: plaintext.clone(),
                deterministic: true,
                key_version: 0,
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            sealed.ciphertext.len(),
            size + DETERMINISTIC_TENANT_OVERHEAD
        );
        let opened = Echo
            .decrypt(Request::new(pb::DecryptRequest {
                tenant_id: "t".into(),
                context: super::bench_context(),
                ciphertext: sealed.ciphertext,
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(opened.plaintext, plaintext);
    }
    let args = run_args(&["--deterministic", "--batch", "1000"]).unwrap();
    assert!(args.deterministic);
}

#[test]
fn generate_data_key_is_an_op_without_a_batch_form() {
    let args = run_args(&["--op", "generate-data-key"]).unwrap();
    assert_eq!(args.op, Op::GenerateDataKey);
    assert!(super::workload(&args).is_ok());
    let batched = run_args(&["--op", "generate-data-key", "--batch", "10"]).unwrap();
    assert_eq!(
        super::workload(&batched).err().unwrap(),
        "--op generate-data-key has no batch form: --batch must be 1"
    );
}

#[tokio::test]
async fn the_echo_service_answers_data_keys_of_the_real_sizes() {
    let made = Echo
        .generate_data_key(Request::new(pb::GenerateDataKeyRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (made.data_key.len(), made.wrapped_data_key.len()),
        (32, keywarden::envelope::datakey::TENANT_WRAPPED_LEN)
    );
}

#[test]
fn blind_index_parses_and_the_echo_answers_tokens_of_the_real_size() {
    let args = run_args(&["--op", "blind-index", "--batch", "1000"]).unwrap();
    assert_eq!(args.op, Op::BlindIndex);
    let echo = super::echo::zero_token(32);
    assert_eq!(echo.tokens, vec![vec![0, 0, 0, 1, 0, 0, 0, 0]]);
    assert_eq!(
        super::echo::zero_token(7).tokens[0].len(),
        keywarden::envelope::blind::token_len(8)
    );
}
