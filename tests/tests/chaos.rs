//! A small chaos run per backend (the harness in `src/chaos.rs`; the full
//! runs and their figures are in docs/reliability.md): carriers and the relay
//! SIGKILLed and restarted, relay↔carrier partitions, terminals sending
//! receipts twice and out of order, two relay replicas on PostgreSQL (one
//! killed at a time), and — on SQLite, as root — a full disk under the relay. Every invariant must hold. A tampered run checks that the
//! checks do fire.

use std::time::Duration;

use integration_tests::chaos::{Options, Report, run};
use integration_tests::process::test_binary;
use integration_tests::{Backend, backend_tests, drop_postgres_database, postgres_database};

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .any(|line| line.starts_with("Uid:") && line.split_whitespace().nth(1) == Some("0"))
    })
}

fn options(backend: Backend, database_url: Option<String>) -> Options {
    Options {
        seed: 7,
        backend,
        database_url,
        messages: 1_500,
        users: 300,
        carriers: 3,
        carrier_kills: 3,
        relay_kills: 2,
        // On PostgreSQL, two replicas: a killed one stays down past its
        // leases and the other takes its carriers over.
        replicas: if backend == Backend::Postgres { 2 } else { 1 },
        partitions: 2,
        // Each point once: the relay's receipts stored and a batch acked,
        // an expansion step, a fold uncommitted, a carrier's batch stored.
        crash_points: chukei_proto::crash::POINTS.len(),
        duplicate_events: 0.2,
        disk_full: backend == Backend::Sqlite && running_as_root(),
        concurrency: 16,
        rate: 150,
        tamper: false,
        bin_dir: test_binary("relay-svc")
            .unwrap()
            .parent()
            .unwrap()
            .to_path_buf(),
    }
}

async fn chaotic_run(backend: Backend, tamper: bool) -> Option<Report> {
    let database = match backend {
        Backend::Sqlite => None,
        Backend::Postgres => Some(postgres_database().await.unwrap()?),
    };
    let full = options(backend, database.as_ref().map(|(url, _)| url.clone()));
    // The tampered run needs no faults, only something to tamper with.
    let report = run(if tamper {
        Options {
            tamper,
            messages: 300,
            carrier_kills: 0,
            relay_kills: 0,
            partitions: 0,
            crash_points: 0,
            disk_full: false,
            rate: 0,
            ..full
        }
    } else {
        full
    })
    .await;
    if let Some((_, name)) = &database {
        drop_postgres_database(name).await.unwrap();
    }
    let report = report.unwrap();
    println!("{report}");
    Some(report)
}

async fn every_invariant_holds_under_faults(backend: Backend) {
    let Some(report) = chaotic_run(backend, false).await else {
        return;
    };
    assert_eq!(report.violations.0, [0; 7], "{report}");
    assert_eq!(report.accepted, report.messages, "{report}");
    assert_eq!(report.relay_recovery.len(), 2, "{report}");
    // Each process died at its point, so the invariants above held across
    // those crashes too.
    assert_eq!(
        report.crash_points.len(),
        chukei_proto::crash::POINTS.len(),
        "{report}"
    );
    assert!(
        report.crash_points.iter().all(|(_, died)| *died),
        "{report}"
    );
    assert!(
        report
            .relay_recovery
            .iter()
            .all(|(_, accepting)| accepting.is_some()),
        "{report}"
    );
    if let Some(disk) = &report.disk_full {
        assert!(
            disk.refused.keys().all(|code| code == "Unavailable"),
            "a full disk is UNAVAILABLE: {report}"
        );
        assert!(!disk.refused.is_empty(), "{report}");
        assert!(
            disk.recovered_in
                .is_some_and(|d| d < Duration::from_secs(30)),
            "{report}"
        );
    }
}

async fn the_checks_catch_a_tampered_run(backend: Backend) {
    let Some(report) = chaotic_run(backend, true).await else {
        return;
    };
    let [i1, i2, _, i4, _, i6, _] = report.violations.0;
    assert!(i1 >= 1 && i2 >= 1 && i4 >= 1 && i6 >= 1, "{report}");
}

backend_tests!(
    every_invariant_holds_under_faults,
    the_checks_catch_a_tampered_run
);
