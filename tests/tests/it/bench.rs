//! `coord-bench state` at a tiny size against a real nats-server, so the
//! scenario keeps building and running: it exits 0 only when no update was
//! lost, the sync point completed and the rollback verified, and it prints
//! both of its tables.

use testkit::NatsServer;

#[tokio::test]
async fn coord_bench_state_runs_at_a_tiny_size() {
    let server = NatsServer::start();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_coord-bench"))
        .args(["--nats-url", server.url(), "--timeout-s", "60", "state"])
        .args(["--writers", "3", "--hot-updates", "12", "--keys", "20"])
        .args(["--concurrency", "4", "--sync-agents", "12"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for row in [
        "| raw KV, one key, 3 writer(s) | 12 |",
        "| synchronizer, reject, one key, 3 writer(s) | 12 |",
        "| synchronizer, merge, one key, 3 writer(s) | 12 |",
        "| synchronizer, lww, one key, 3 writer(s) | 12 |",
        "| synchronizer, update 20 documents | 20 |",
        "| rollback (restore, read back, notify, acknowledged) | 12 |",
    ] {
        assert!(stdout.contains(row), "no row {row:?} in:\n{stdout}");
    }
}

/// Runs coord-bench against a fresh server and returns its stdout; fails the
/// test unless it exits 0.
async fn coord_bench(server: &NatsServer, args: &[&str]) -> String {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_coord-bench"))
        .args(["--nats-url", server.url(), "--timeout-s", "90"])
        .args(args)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    stdout
}

/// `coord-bench dag` exits 0 only when every flow completed `succeeded`, and
/// reports each shape's critical path (2 for a fan-out, a chain's length).
#[tokio::test]
async fn coord_bench_dag_runs_at_a_tiny_size() {
    let server = NatsServer::start();
    let stdout = coord_bench(
        &server,
        &[
            "--agents",
            "2",
            "dag",
            "--fan-out",
            "8",
            "--chain",
            "6",
            "--random-tasks",
            "40",
            "--work-ms",
            "5",
        ],
    )
    .await;
    for row in [
        "| fan-out 1 → 8 | 9 | 2 |",
        "| chain of 6 | 6 | 6 |",
        "| random (seed 1) | 40 |",
    ] {
        assert!(stdout.contains(row), "no row {row:?} in:\n{stdout}");
    }
}

/// `coord-bench alloc` fails on any refused allocate or release, so a row
/// with every pair counted is the proof they all went through.
#[tokio::test]
async fn coord_bench_alloc_runs_at_a_tiny_size() {
    let server = NatsServer::start();
    let stdout = coord_bench(
        &server,
        &[
            "alloc",
            "--alloc-agents",
            "5,30",
            "--alloc-ops",
            "40",
            "--alloc-concurrency",
            "4",
        ],
    )
    .await;
    for row in [
        "| allocator: allocate + release | 5 | 40 |",
        "| raw KV: 2 compare-and-sets on one key | 5 | 40 |",
        "| allocator: allocate + release | 30 | 40 |",
        "| raw KV: 2 compare-and-sets on one key | 30 | 40 |",
    ] {
        assert!(stdout.contains(row), "no row {row:?} in:\n{stdout}");
    }
}

/// `coord-bench curves` prints each sweep and writes its four charts, each a
/// polyline through every point, captioned with the command.
#[tokio::test]
async fn coord_bench_curves_runs_at_a_tiny_size() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let svg_dir = dir.path().to_str().unwrap();
    let stdout = coord_bench(
        &server,
        &[
            "--tasks",
            "12",
            "--flows",
            "3",
            "--agents",
            "2",
            "curves",
            "--curve-agents",
            "1,3",
            "--curve-replicas",
            "1,2",
            "--curve-flow-sizes",
            "10,25",
            "--svg-dir",
            svg_dir,
        ],
    )
    .await;
    for row in [
        "| 1 | 12 |",
        "| 3 | 12 |",
        "| 2 | 12 |",
        "| 10 | 1 |",
        "| 25 | 1 |",
    ] {
        assert!(stdout.contains(row), "no row {row:?} in:\n{stdout}");
    }
    for file in [
        "curve-agents.svg",
        "curve-replicas.svg",
        "curve-flow-size.svg",
        "curve-flow-memory.svg",
    ] {
        let svg = std::fs::read_to_string(dir.path().join(file)).unwrap();
        assert!(svg.starts_with("<svg"), "{file}: {svg}");
        assert_eq!(svg.matches("<circle").count(), 2, "{file}: {svg}");
        assert!(svg.contains("--curve-flow-sizes 10,25"), "{file}: {svg}");
    }
}

/// `coord-bench events` exits 0 only when every event it stored is listed
/// back; it prints the ingest and the query tables.
#[tokio::test]
async fn coord_bench_events_runs_at_a_tiny_size() {
    let server = NatsServer::start();
    let stdout = coord_bench(
        &server,
        &[
            "events",
            "--events",
            "40",
            "--event-concurrency",
            "4",
            "--event-agents",
            "3",
        ],
    )
    .await;
    for row in [
        "| agent events, no schema | 40 |",
        "| agent events, checked against a schema | 40 |",
        "| every event, pages of 1000 | 80 | 1 |",
    ] {
        assert!(stdout.contains(row), "no row {row:?} in:\n{stdout}");
    }
}

/// Runs `coord-bench --spawn` with `args` (a scenario that runs at both
/// settings), checks it succeeded and printed the page cache first, and
/// returns each setting's part of its output.
async fn at_both_settings(args: &[&str]) -> [String; 2] {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_coord-bench"))
        .args(["--spawn", "--timeout-s", "90"])
        .args(args)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let page = stdout.find("### page cache").expect("a page cache table");
    let fsync = stdout.find("### fsync always").expect("an fsync table");
    assert!(page < fsync, "page cache first:\n{stdout}");
    [stdout[page..fsync].to_owned(), stdout[fsync..].to_owned()]
}

/// `coord-bench --spawn dispatch` runs at both settings, a server each, and
/// prints each setting's table with the system's rounds beside the raw one.
#[tokio::test]
async fn coord_bench_dispatch_runs_at_both_settings_at_a_tiny_size() {
    let tables = at_both_settings(&[
        "dispatch", "--tasks", "20", "--flows", "4", "--serial", "2", "--agents", "2",
    ])
    .await;
    for table in &tables {
        for row in [
            "| baseline, pipelined | 20 |",
            "| dispatch, 4 flows × 5 tasks | 20 |",
            "| dispatch, one at a time (1-task flows) | 2 |",
        ] {
            assert!(table.contains(row), "no row {row:?} in:\n{table}");
        }
    }
}

/// `coord-bench agents` at a tiny size: with `--spawn` alone it runs both
/// settings, and each prints a row per agent count whose flow succeeded
/// (the falsely lost column is a figure, not asserted: a loaded machine may
/// stall heartbeats past three intervals).
#[tokio::test]
async fn coord_bench_agents_runs_at_both_settings_at_a_tiny_size() {
    let tables = at_both_settings(&[
        "agents",
        "--agents-curve",
        "3,6",
        "--agents-flow-tasks",
        "12",
        "--agents-idle-s",
        "2",
        "--agents-beat-ms",
        "500",
    ])
    .await;
    for table in &tables {
        for n in ["3", "6"] {
            let row = table
                .lines()
                .find(|l| l.starts_with(&format!("| {n} |")))
                .unwrap_or_else(|| panic!("no row for {n} agents in:\n{table}"));
            assert!(row.contains("| succeeded |"), "{row}");
        }
    }
}
