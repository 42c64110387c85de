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
