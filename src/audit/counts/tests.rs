use super::{counters::FEW, *};

fn counted(action: &'static str, outcome: &'static str) -> Kind {
    Kind {
        phase: Phase::Counted,
        action,
        outcome,
    }
}

fn rows(pending: &Pending) -> Vec<(&str, &str, &str, &str, &str, u64)> {
    pending
        .sorted()
        .into_iter()
        .map(|c| {
            (
                c.tenant,
                c.caller,
                c.kind.phase.name(),
                c.kind.action,
                c.kind.outcome,
                c.calls,
            )
        })
        .collect()
}

#[test]
fn counters_add_up_per_tenant_caller_call_and_outcome_and_flush_in_order() {
    let mut pending = Pending::new(MAX_COUNTERS);
    for _ in 0..3 {
        pending.add("acme", "token:app", counted("Encrypt", "OK"), 1);
    }
    pending.add(
        "acme",
        "token:app",
        counted("Encrypt", "INVALID_ARGUMENT"),
        1,
    );
    pending.add("acme", "token:batch", counted("Encrypt", "OK"), 1000);
    pending.add("acme", "token:app", counted("Decrypt", "OK"), 2);
    pending.add("acme", "token:app", counted("Encrypt", "OK"), 4);
    let refused = Kind {
        phase: Phase::Refused,
        action: "Encrypt",
        outcome: "UNAUTHENTICATED",
    };
    pending.add("", "tcp 10.0.0.7", refused, 1);
    pending.add("zeta", "token:app", counted("Decrypt", "OK"), 1);
    assert_eq!(
        rows(&pending),
        [
            (
                "",
                "tcp 10.0.0.7",
                "refused",
                "Encrypt",
                "UNAUTHENTICATED",
                1
            ),
            ("acme", "token:app", "counted", "Decrypt", "OK", 2),
            (
                "acme",
                "token:app",
                "counted",
                "Encrypt",
                "INVALID_ARGUMENT",
                1
            ),
            ("acme", "token:app", "counted", "Encrypt", "OK", 7),
            ("acme", "token:batch", "counted", "Encrypt", "OK", 1000),
            ("zeta", "token:app", "counted", "Decrypt", "OK", 1),
        ]
    );
    assert_eq!(pending.overflowed, 0);
}

#[test]
fn past_the_bound_new_counters_fold_into_other_and_known_ones_still_count() {
    let mut pending = Pending::new(3);
    for tenant in ["a", "b", "c"] {
        pending.add(tenant, "jwt:ada", counted("Encrypt", "OK"), 1);
    }
    // New tenants, a new caller, a known pair with a new outcome: all
    // past the bound.
    pending.add("d", "jwt:ada", counted("Encrypt", "OK"), 1);
    pending.add("e", "jwt:eve", counted("Encrypt", "OK"), 5);
    pending.add("a", "jwt:ada", counted("Encrypt", "NOT_FOUND"), 1);
    // A known counter still counts as itself.
    pending.add("b", "jwt:ada", counted("Encrypt", "OK"), 10);
    assert_eq!(
        rows(&pending),
        [
            ("", "(other)", "counted", "Encrypt", "NOT_FOUND", 1),
            ("", "(other)", "counted", "Encrypt", "OK", 6),
            ("a", "jwt:ada", "counted", "Encrypt", "OK", 1),
            ("b", "jwt:ada", "counted", "Encrypt", "OK", 11),
            ("c", "jwt:ada", "counted", "Encrypt", "OK", 1),
        ]
    );
    assert_eq!(pending.overflowed, 7);
    // Neither the folded tenants nor the folded caller were kept.
    assert_eq!(pending.by_tenant.len(), 4, "a, b, c and none");
    assert_eq!(
        pending.names.callers,
        ["jwt:ada".into(), "(other)".into()] as [Arc<str>; 2]
    );
}

#[test]
fn a_tenant_with_many_callers_counts_each_apart_through_its_index() {
    let mut pending = Pending::new(MAX_COUNTERS);
    let callers: Vec<String> = (0..3 * FEW).map(|i| format!("jwt:user-{i:02}")).collect();
    for round in 1..=3 {
        for caller in &callers {
            pending.add("acme", caller, counted("Encrypt", "OK"), round);
            pending.add("acme", caller, counted("Decrypt", "OK"), 1);
        }
    }
    assert!(matches!(pending.by_tenant["acme"], Counters::Many(_)));
    let mut expected = Vec::new();
    for caller in &callers {
        expected.push(("acme", caller.as_str(), "counted", "Decrypt", "OK", 3));
        expected.push(("acme", caller.as_str(), "counted", "Encrypt", "OK", 6));
    }
    assert_eq!(rows(&pending), expected);
    assert_eq!(pending.held, 2 * callers.len());
}

#[test]
fn a_refusal_flood_from_many_peers_cannot_crowd_out_calls_that_ran() {
    let counts = Counts::default();
    for i in 0..MAX_REFUSED_COUNTERS + 10 {
        let peer = format!("tcp 10.{}.{}.{}:40000", i >> 16, (i >> 8) & 255, i & 255);
        counts.refused("Encrypt", None, &peer, "UNAUTHENTICATED");
    }
    counts.add("Encrypt", Some("acme"), "token:app", "OK");
    let refused = counts.refused.lock().unwrap();
    assert_eq!(refused.held, MAX_REFUSED_COUNTERS + 1);
    assert_eq!(refused.overflowed, 10);
    let ran = counts.ran.lock().unwrap();
    assert_eq!(
        rows(&ran),
        [("acme", "token:app", "counted", "Encrypt", "OK", 1)]
    );
}

#[test]
fn refusals_count_a_peer_without_its_port_and_only_valid_tenants() {
    let counts = Counts::default();
    for port in [40001, 40002, 40003] {
        counts.refused(
            "Decrypt",
            Some("acme"),
            &format!("tcp 192.0.2.1:{port}"),
            "UNAUTHENTICATED",
        );
    }
    counts.refused(
        "Decrypt",
        Some("acme"),
        "tcp [2001:db8::1]:443",
        "UNAUTHENTICATED",
    );
    counts.refused(
        "Decrypt",
        Some("bad\ntenant"),
        "unix socket",
        "UNAUTHENTICATED",
    );
    counts.refused("GetTenant", Some("acme"), "jwt:bob", "PERMISSION_DENIED");
    assert_eq!(
        rows(&counts.refused.lock().unwrap()),
        [
            (
                "",
                "unix socket",
                "refused",
                "Decrypt",
                "UNAUTHENTICATED",
                1
            ),
            (
                "acme",
                "jwt:bob",
                "refused",
                "GetTenant",
                "PERMISSION_DENIED",
                1
            ),
            (
                "acme",
                "tcp 192.0.2.1",
                "refused",
                "Decrypt",
                "UNAUTHENTICATED",
                3
            ),
            (
                "acme",
                "tcp [2001:db8::1]",
                "refused",
                "Decrypt",
                "UNAUTHENTICATED",
                1
            ),
        ]
    );
    assert_eq!(without_port("tcp not-an-address:1"), "tcp not-an-address:1");
    assert_eq!(without_port("token:a:b"), "token:a:b");
}

/// Issue 14's attack review: a caller with `encrypt` on one tenant named
/// a new valid tenant id in each call, and each refusal became a record
/// of its own (docs/SECURITY.md §12.15).
#[test]
fn refused_and_failed_calls_name_at_most_a_few_tenants_per_caller() {
    let counts = Counts::default();
    for n in 0..1000 {
        let tenant = format!("t{n:05}");
        counts.refused("Encrypt", Some(&tenant), "token:enc1", "PERMISSION_DENIED");
        counts.add("Encrypt", Some(&tenant), "token:star", "NOT_FOUND");
        counts.add("Encrypt", Some(&tenant), "token:star", "OK");
    }
    counts.refused("Encrypt", Some("t00003"), "token:enc1", "PERMISSION_DENIED");
    counts.refused(
        "Encrypt",
        Some("t00003"),
        "token:other",
        "PERMISSION_DENIED",
    );
    let refused = counts.refused.lock().unwrap();
    let refused = rows(&refused);
    assert_eq!(refused.len(), MAX_TENANTS_PER_CALLER + 1 + 1, "{refused:?}");
    let ran = counts.ran.lock().unwrap();
    let ran = rows(&ran);
    // 1000 OK counters (the tenants exist), 32 + 1 NOT_FOUND ones.
    assert_eq!(ran.len(), 1000 + MAX_TENANTS_PER_CALLER + 1);
    let tenantless: Vec<_> = refused.iter().filter(|r| r.0.is_empty()).collect();
    assert_eq!(tenantless.len(), 1, "{refused:?}");
    assert!(format!("{tenantless:?}").contains(&format!("{}", 1000 - MAX_TENANTS_PER_CALLER)));
}
