//! The test kit's own promise: a test leaves no process and no store
//! behind, even when it is killed outright (nextest's timeout sends
//! SIGKILL, and no `Drop` runs).

use std::time::Duration;

use testkit::{eventually, NatsServer};

/// The processes whose parent is `parent`, with their name and state (the
/// third field of `/proc/{pid}/stat`: `Z` for one that exited and was not
/// reaped yet).
fn children(parent: u32) -> Vec<(u32, String, char)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Some((name, state, ppid)) = stat(pid) {
            if ppid == parent {
                found.push((pid, name, state));
            }
        }
    }
    found
}

/// Name, state and parent of `pid`, if it still exists.
fn stat(pid: u32) -> Option<(String, char, u32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (name) state ppid …"; the name may hold spaces and parentheses.
    let (head, rest) = text.rsplit_once(')')?;
    let name = head.split_once('(')?.1.to_owned();
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((name, state, ppid))
}

/// `coord-bench --spawn` starts its nats-server through the kit, as a test
/// does; killed with SIGKILL while the server runs, it takes the server
/// with it, and the next server the kit starts removes its store.
#[tokio::test]
async fn a_killed_test_process_takes_its_nats_server_with_it() {
    let mut bench = tokio::process::Command::new(env!("CARGO_BIN_EXE_coord-bench"))
        .args(["--spawn", "--page-cache", "--timeout-s", "600", "dispatch"])
        .args(["--tasks", "10", "--flows", "1", "--serial", "100000000"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = bench.id().unwrap();
    let server = eventually(Duration::from_secs(60), "coord-bench's nats-server", || {
        let found = children(pid)
            .into_iter()
            .find(|(_, name, _)| name == "nats-server");
        async move { found.map(|(server, _, _)| server) }
    })
    .await;
    // The server's temp dir: the parent of its store (`-sd {dir}/store`).
    let cmdline = std::fs::read(format!("/proc/{server}/cmdline")).unwrap();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let store = args
        .iter()
        .skip_while(|a| *a != "-sd")
        .nth(1)
        .expect("the server's -sd");
    let dir = std::path::Path::new(store).parent().unwrap().to_owned();
    assert!(dir.exists(), "{}", dir.display());

    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    bench.wait().await.unwrap();

    // Gone, or exited and waiting for whoever inherited it to reap it.
    eventually(
        Duration::from_secs(20),
        "the orphaned nats-server to die",
        || {
            let dead = stat(server).is_none_or(|(_, state, _)| state == 'Z');
            async move { dead.then_some(()) }
        },
    )
    .await;
    // (Another test's server may have removed it already.)
    let _next = NatsServer::start();
    assert!(!dir.exists(), "{} outlived its test", dir.display());
}
