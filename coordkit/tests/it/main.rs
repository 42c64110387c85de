//! coordkit's adapter tests against a real system (a fresh nats-server and the four
//! services per test): `coordctl` driven as a subprocess, and the Python example
//! agent running flows.

// Test helpers fail fast, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod cli;
mod conformance;
mod python;

use std::process::Output;

/// Runs `coordctl` against `url` and returns its exit status and output.
///
/// Async, because the services run in this test's runtime: a blocking wait would
/// stall them.
pub async fn coordctl(url: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_coordctl"))
        .args(args)
        .env("NATS_URL", url)
        .env_remove("RUST_LOG")
        .kill_on_drop(true)
        .output()
        .await
        .unwrap()
}

/// `coordctl -o json …`, which must succeed, its stdout parsed.
pub async fn coordctl_json<T: serde::de::DeserializeOwned>(url: &str, args: &[&str]) -> T {
    coordctl_answer(url, args, 0).await
}

/// `coordctl -o json …` whose request succeeds and exits with `status` (3: the
/// answer is no), its stdout parsed.
pub async fn coordctl_answer<T: serde::de::DeserializeOwned>(
    url: &str,
    args: &[&str],
    status: i32,
) -> T {
    let mut all = vec!["--output", "json"];
    all.extend_from_slice(args);
    let out = coordctl(url, &all).await;
    assert_eq!(
        out.status.code(),
        Some(status),
        "coordctl {args:?} exited other than {status}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "coordctl {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// A failing `coordctl` run: exit status 1 and `error [code]` on stderr.
pub async fn coordctl_fails(url: &str, args: &[&str], code: &str) -> String {
    let out = coordctl(url, args).await;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "coordctl {args:?} should fail: {stderr}"
    );
    assert!(
        stderr.contains(&format!("error [{code}]")),
        "coordctl {args:?} should report {code}: {stderr}"
    );
    stderr
}
