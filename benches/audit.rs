//! Counting a data-plane call for the audit log (`Counts::add`, on every
//! call under one lock), with one caller and with 40,000 distinct callers
//! (JWT users) of one tenant in the interval: the call is made for the
//! caller interned last, the worst case of the linear search this replaced
//! (issue 14, finding 10). Both should cost the same.
//!
//! `cargo bench --bench audit`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use keywarden::audit::counts::Counts;

fn counts(c: &mut Criterion) {
    let mut group = c.benchmark_group("counts");
    for callers in [1usize, 40_000] {
        let counts = Counts::default();
        let names: Vec<String> = (0..callers).map(|i| format!("jwt:user-{i:05}")).collect();
        for name in &names {
            counts.add("Encrypt", Some("acme"), name, "OK");
        }
        let last = &names[callers - 1];
        group.bench_function(format!("add/{callers}_callers"), |b| {
            b.iter(|| counts.add("Encrypt", black_box(Some("acme")), black_box(last), "OK"))
        });
    }
    group.finish();
}

criterion_group!(benches, counts);
criterion_main!(benches);
