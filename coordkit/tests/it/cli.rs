//! `coordctl` as a user runs it: every command against a real system, JSON output
//! parsed with the wire types, failures exiting 1 with the server's error code.

use common::error::ErrorBody;
use common::msg::{
    AdjustReply, Allocation, CapacityStatus, ConflictPolicy, FlowList, FlowState, FlowStatus,
    GangReply, QuotaReply, RegisterAgent, ReleaseReply, Reservation, ScopeConfig, StateDoc,
    StateHistory, SyncPoint, SyncPointDiff, SyncPointList, TaskState, ValidationReport,
};
use common::{AgentId, ErrorCode};
use coordkit::demo;
use testkit::System;

use crate::{coordctl, coordctl_answer, coordctl_fails, coordctl_json};

const FLOW_YAML: &str = "\
name: cli flow
tasks:
  - id: a
    kind: echo
    input: {text: hello}
    requirements: {resources: {cpu: 1}, capabilities: [cli]}
  - id: b
    kind: echo
    depends_on: [a]
    requirements: {resources: {cpu: 1}, capabilities: [cli]}
";

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

/// An echo agent with the `cli` capability, in this process.
fn spawn_agent(sys: &System, id: &str) -> tokio::sync::oneshot::Sender<()> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let nats = sys.nats.clone();
    let id = AgentId::new(id).unwrap();
    tokio::spawn(async move {
        let mut opts = demo::demo_agent_options().unwrap().capability("cli");
        opts.agent_id = id;
        coordkit::agent::run(
            nats,
            opts,
            |task| async move { Ok(serde_json::json!({ "echo": task.input })) },
            async {
                let _ = stopped.await;
            },
        )
        .await
    });
    stop
}

#[tokio::test]
async fn submit_yaml_and_wait_then_status_and_list() {
    let sys = System::start().await;
    let url = sys.server.url().to_owned();
    let _agent = spawn_agent(&sys, "cli-agent");
    let dir = tempfile::tempdir().unwrap();
    let spec = write(&dir, "flow.yaml", FLOW_YAML);

    let done: FlowStatus = coordctl_json(&url, &["flow", "submit", &spec, "--wait"]).await;
    assert_eq!(done.state, FlowState::Succeeded);
    assert!(done.tasks.iter().all(|t| t.state == TaskState::Succeeded));
    let a = done
        .tasks
        .iter()
        .find(|t| t.task_id.as_str() == "a")
        .unwrap();
    assert_eq!(a.output["echo"]["text"], "hello");

    let id = done.flow_id.to_string();
    let status = coordctl(&url, &["flow", "status", &id]).await;
    assert!(status.status.success());
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("succeeded"), "{text}");
    assert!(
        text.contains("cli-agent"),
        "the task table names the agent: {text}"
    );

    let list: FlowList = coordctl_json(&url, &["flow", "list", "--state", "succeeded"]).await;
    assert!(list.flows.iter().any(|f| f.flow_id == done.flow_id));

    // A JSON spec on stdin works too, and `watch` follows it to the end.
    let json_spec =
        serde_json::to_string(&serde_yaml::from_str::<serde_json::Value>(FLOW_YAML).unwrap())
            .unwrap();
    let json_path = write(&dir, "flow.json", &json_spec);
    let created: FlowStatus = coordctl_json(&url, &["flow", "submit", &json_path]).await;
    let watched: FlowStatus =
        coordctl_json(&url, &["flow", "watch", created.flow_id.as_str()]).await;
    assert_eq!(watched.state, FlowState::Succeeded);
}

#[tokio::test]
async fn pause_resume_and_cancel_a_flow() {
    let sys = System::start().await;
    let url = sys.server.url().to_owned();
    // No agent has the `cli` capability: the flow stays running, waiting.
    let dir = tempfile::tempdir().unwrap();
    let spec = write(&dir, "flow.yaml", FLOW_YAML);
    let created: FlowStatus = coordctl_json(&url, &["flow", "submit", &spec]).await;
    let id = created.flow_id.to_string();
    assert_eq!(created.state, FlowState::Running);

    let paused: FlowStatus = coordctl_json(&url, &["flow", "pause", &id]).await;
    assert_eq!(paused.state, FlowState::Paused);
    let resumed: FlowStatus = coordctl_json(&url, &["flow", "resume", &id]).await;
    assert_eq!(resumed.state, FlowState::Running);
    let cancelled: FlowStatus = coordctl_json(&url, &["flow", "cancel", &id]).await;
    assert_eq!(cancelled.state, FlowState::Cancelled);
    let status: FlowStatus = coordctl_json(&url, &["flow", "status", &id]).await;
    assert_eq!(status.state, FlowState::Cancelled);
}

#[tokio::test]
async fn health_report_analysis_anomalies_and_system_check() {
    let sys = System::start().await;
    let url = sys.server.url().to_owned();
    let health: common::msg::HealthStatus = coordctl_json(&url, &["health"]).await;
    let names: Vec<&str> = health.services.iter().map(|s| s.name.as_str()).collect();
    for svc in ["orchestrator", "allocator", "synchronizer", "monitor"] {
        assert!(names.contains(&svc), "{names:?}");
    }
    let text = coordctl(&url, &["health"]).await;
    assert!(String::from_utf8_lossy(&text.stdout).contains("orchestrator"));
    let report: common::msg::HealthReport = coordctl_json(&url, &["report"]).await;
    assert!(report.validation.valid, "{:?}", report.validation);
    let _: common::msg::PerformanceAnalysis = coordctl_json(&url, &["analysis"]).await;
    // Text for people, not the JSON reply.
    let text = coordctl(&url, &["analysis"]).await;
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(!text.trim_start().starts_with('{'), "{text}");
    for part in ["bottleneck:", "trends", "slowest agents", "P99 MS"] {
        assert!(text.contains(part), "{part}: {text}");
    }
    let _: common::msg::AnomalyList = coordctl_json(&url, &["anomalies"]).await;
    let check: common::msg::SystemValidation = coordctl_json(&url, &["check-system"]).await;
    assert!(check.valid);
}

#[tokio::test]
async fn modify_explain_and_rerun_a_flow() {
    let sys = System::start().await;
    let url = sys.server.url().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let spec = write(&dir, "flow.yaml", FLOW_YAML);
    // No agent yet: the flow waits, and explain says why.
    let created: FlowStatus = coordctl_json(&url, &["flow", "submit", &spec]).await;
    let id = created.flow_id.to_string();
    let why: common::msg::Explanation = coordctl_json(&url, &["flow", "explain", &id]).await;
    let a = why
        .tasks
        .iter()
        .find(|t| t.task_id.as_str() == "a")
        .unwrap();
    assert!(a.reasons.iter().any(|r| r.contains("no agent")), "{why:?}");
    let text = coordctl(&url, &["flow", "explain", &id, "--task", "b"]).await;
    assert!(String::from_utf8_lossy(&text.stdout).contains("waiting on dependency a"));
    // The plan says the same: nothing can run a, so b waits on it.
    let plan: common::msg::FlowPlan = coordctl_json(&url, &["flow", "optimise", &id]).await;
    let stuck: Vec<&str> = plan
        .unplaceable
        .iter()
        .map(|u| u.task_id.as_str())
        .collect();
    assert_eq!(stuck, ["a", "b"], "{plan:?}");
    let text = coordctl(&url, &["flow", "optimize", &id, "--apply"]).await;
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("critical path: a → b"), "{text}");
    assert!(text.contains("cannot run: a"), "{text}");

    // Remove b, add c after a: the revision is read for us.
    let changes = write(&dir, "changes.yaml", "remove: [b]\nadd:\n  - {id: c, kind: echo, depends_on: [a], requirements: {resources: {cpu: 1}, capabilities: [cli]}}\n");
    let modified: FlowStatus = coordctl_json(&url, &["flow", "modify", &id, &changes]).await;
    let ids: Vec<&str> = modified.tasks.iter().map(|t| t.task_id.as_str()).collect();
    assert_eq!(ids, ["a", "c"]);
    let bad = write(&dir, "bad.yaml", "remove: [nope]\n");
    coordctl_fails(&url, &["flow", "modify", &id, &bad], "validation_failed").await;

    let _agent = spawn_agent(&sys, "cli-agent");
    let done: FlowStatus = coordctl_json(&url, &["flow", "watch", &id]).await;
    assert_eq!(done.state, FlowState::Succeeded);
    let again: FlowStatus = coordctl_json(&url, &["flow", "rerun", &id, "c"]).await;
    assert_eq!(again.state, FlowState::Running);
    let done: FlowStatus = coordctl_json(&url, &["flow", "watch", &id]).await;
    assert_eq!(done.state, FlowState::Succeeded);
    let c = done
        .tasks
        .iter()
        .find(|t| t.task_id.as_str() == "c")
        .unwrap();
    assert_eq!(c.attempt, 2);
}

#[tokio::test]
async fn state_put_get_history_and_a_stale_put_fails_with_conflict() {
    let sys = System::start().await;
    let url = sys.server.url().to_owned();

    let stored: StateDoc = coordctl_json(
        &url,
        &[
            "state",
            "put",
            "planner",
            "--revision",
            "0",
            r#"{"step": 1}"#,
        ],
    )
    .await;
    assert!(stored.revision > 0);
    let got: StateDoc = coordctl_json(&url, &["state", "get", "planner"]).await;
    assert_eq!(got.doc, serde_json::json!({"step": 1}));
    assert_eq!(got.revision, stored.revision);

    let rev = stored.revision.to_string();
    let _: StateDoc = coordctl_json(
        &url,
        &[
            "state",
            "put",
            "planner",
            "--revision",
            &rev,
            r#"{"step": 2}"#,
        ],
    )
    .await;
    let history: StateHistory = coordctl_json(&url, &["state", "history", "planner"]).await;
    let steps: Vec<&serde_json::Value> = history.entries.iter().map(|e| &e.doc["step"]).collect();
    assert_eq!(steps, [1, 2]);

    // The default scope rejects a put made from a stale revision.
    let stderr = coordctl_fails(
        &url,
        &[
            "state",
            "put",
            "planner",
            "--revision",
            &rev,
            r#"{"step": 3}"#,
        ],
        "conflict",
    )
    .await;
    assert!(stderr.contains("details"), "{stderr}");
}

#[tokio::test]
async fn capacity_agents_reserve_and_adjust() {
    let sys = System::start().await;
    let url = sys.server.url().to_owned();
    sys.client
        .register_agent(&RegisterAgent {
            agent_id: AgentId::new("big").unwrap(),
            capabilities: vec!["gpu".into()],
            labels: Default::default(),
            capacity: [("cpu".to_string(), 4.0)].into(),
            heartbeat_interval_ms: 60_000,
        })
        .await
        .unwrap();

    let cap: CapacityStatus = coordctl_json(&url, &["capacity", "show"]).await;
    assert_eq!(cap.pool["cpu"].capacity, 4.0);
    let agents: serde_json::Value = coordctl_json(&url, &["agents", "list"]).await;
    assert_eq!(agents[0]["agent_id"], "big");
    assert_eq!(agents[0]["status"], "active");

    let fits: CapacityStatus = coordctl_json(
        &url,
        &["capacity", "check", "-r", "cpu=2", "--capability", "gpu"],
    )
    .await;
    assert_eq!(fits.fits, Some(true));
    let too_big: CapacityStatus =
        coordctl_answer(&url, &["capacity", "check", "-r", "cpu=64"], 3).await;
    assert_eq!(too_big.fits, Some(false));

    let r: Reservation = coordctl_json(
        &url,
        &[
            "capacity",
            "reserve",
            "--owner",
            "team",
            "-r",
            "cpu=1",
            "--duration-ms",
            "600000",
        ],
    )
    .await;
    assert_eq!(r.agent_id.as_str(), "big");
    let cap: CapacityStatus = coordctl_json(&url, &["capacity", "show"]).await;
    assert_eq!(cap.pool["cpu"].reserved, 1.0);

    let adjusted: AdjustReply =
        coordctl_json(&url, &["capacity", "adjust", "big", "-r", "cpu=8"]).await;
    assert!(adjusted.applied);
    let cap: CapacityStatus = coordctl_json(&url, &["capacity", "show"]).await;
    assert_eq!(cap.pool["cpu"].capacity, 8.0);

    let plan: serde_json::Value = coordctl_json(&url, &["optimize"]).await;
    assert!(plan["moves"].as_array().unwrap().is_empty());

    let a: Allocation = coordctl_json(
        &url,
        &[
            "alloc",
            "allocate",
            "--owner",
            "job-1",
            "-r",
            "cpu=2",
            "--allocation-id",
            "job-1-a",
        ],
    )
    .await;
    assert_eq!(a.allocation_id.as_str(), "job-1-a");
    // No -r: refused, not an allocation of nothing.
    coordctl_fails(
        &url,
        &["alloc", "allocate", "--owner", "job-0"],
        "validation_failed",
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let gang = write(
        &dir,
        "gang.yaml",
        "owner: job-2\nmembers:\n  - resources: {cpu: 1}\n  - resources: {cpu: 1}\n",
    );
    let g: GangReply = coordctl_json(&url, &["alloc", "gang", &gang]).await;
    assert_eq!(g.allocations.len(), 2);
    let released: ReleaseReply = coordctl_json(&url, &["alloc", "release", "job-1-a"]).await;
    assert!(released.released);
    let cap: CapacityStatus = coordctl_json(&url, &["capacity", "show"]).await;
    assert_eq!(cap.pool["cpu"].allocated, 2.0);
}

#[tokio::test]
async fn capacity_quota_caps_an_owner() {
    let sys = System::start().await;
    let url = sys.server.url().to_owned();
    sys.client
        .register_agent(&RegisterAgent {
            agent_id: AgentId::new("w1").unwrap(),
            capabilities: vec![],
            labels: Default::default(),
            capacity: [("cpu".to_string(), 8.0)].into(),
            heartbeat_interval_ms: 60_000,
        })
        .await
        .unwrap();
    let set: QuotaReply =
        coordctl_json(&url, &["capacity", "quota", "team", "--limit", "cpu=3"]).await;
    assert!(set.applied);
    assert_eq!(set.quota.unwrap().limits["cpu"], 3.0);
    let alloc = ["alloc", "allocate", "--owner", "team/a", "-r", "cpu=2"];
    let _: Allocation = coordctl_json(&url, &alloc).await;
    let stderr = coordctl_fails(&url, &alloc, "quota_exceeded").await;
    assert!(stderr.contains("quota_owner"), "{stderr}");
    let cap: CapacityStatus = coordctl_json(
        &url,
        &["capacity", "check", "-r", "cpu=1", "--owner", "team/b"],
    )
    .await;
    assert_eq!(cap.quotas["team"].used["cpu"], 2.0);
    let shown = coordctl(&url, &["capacity", "show"]).await;
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        text.contains("QUOTA OWNER") && text.contains("team"),
        "{text}"
    );

    let refused: QuotaReply =
        coordctl_json(&url, &["capacity", "quota", "team", "-l", "cpu=1"]).await;
    assert!(!refused.applied);
    assert_eq!(refused.no_longer_fit.len(), 1);
    let lowered: QuotaReply = coordctl_json(
        &url,
        &["capacity", "quota", "team", "-l", "cpu=1", "--preempt"],
    )
    .await;
    assert_eq!(lowered.preempted.len(), 1);
    let cleared: QuotaReply = coordctl_json(&url, &["capacity", "quota", "team", "--clear"]).await;
    assert!(cleared.applied && cleared.quota.is_none());
    coordctl_fails(
        &url,
        &["capacity", "quota", "team", "-l", "cpu=-1"],
        "validation_failed",
    )
    .await;
}

#[tokio::test]
async fn scope_set_and_get() {
    let sys = System::start().await;
    let url = sys.server.url().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        &dir,
        "scope.yaml",
        "scope: plans\npolicy: lww\nshared: [/goal]\n",
    );
    let set: ScopeConfig = coordctl_json(&url, &["scope", "set", &cfg]).await;
    assert_eq!(set.policy, ConflictPolicy::Lww);
    let got: ScopeConfig = coordctl_json(&url, &["scope", "get", "plans"]).await;
    assert_eq!(got, set);
    // A typo in a config a person wrote is refused, naming the field.
    let typo = write(&dir, "typo.yaml", "scope: plans\npolicyy: lww\n");
    let stderr = coordctl_fails(&url, &["scope", "set", &typo], "bad_request").await;
    assert!(stderr.contains("policyy"), "{stderr}");
}

#[tokio::test]
async fn sync_points_from_the_command_line() {
    let sys = System::start().await;
    let url = sys.server.url().to_owned();
    for agent in ["s1", "s2"] {
        let _: StateDoc = coordctl_json(
            &url,
            &["state", "put", agent, "--revision", "0", r#"{"plan": "a"}"#],
        )
        .await;
    }
    let sp: SyncPoint = coordctl_json(
        &url,
        &[
            "syncpoint",
            "create",
            "--agent",
            "s1",
            "--agent",
            "s2",
            "--label",
            "before",
        ],
    )
    .await;
    assert_eq!(sp.cut.len(), 2);
    let id = sp.id.to_string();
    let shown: SyncPoint = coordctl_json(&url, &["syncpoint", "show", &id]).await;
    assert_eq!(shown.id, sp.id);
    // `acked` holds when each agent acknowledged, in ms: the column says so.
    let text = coordctl(&url, &["syncpoint", "show", &id]).await;
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("ACKED AT MS"), "{text}");
    let list: SyncPointList = coordctl_json(&url, &["syncpoint", "list"]).await;
    assert!(list.sync_points.iter().any(|p| p.id == sp.id));

    let current: StateDoc = coordctl_json(&url, &["state", "get", "s1"]).await;
    let rev = current.revision.to_string();
    let _: StateDoc = coordctl_json(
        &url,
        &["state", "put", "s1", "--revision", &rev, r#"{"plan": "b"}"#],
    )
    .await;
    let diff: SyncPointDiff = coordctl_json(&url, &["syncpoint", "diff", &id]).await;
    assert!(!diff.unchanged);
    let changed: Vec<&str> = diff
        .agents
        .iter()
        .filter(|a| !a.changes.is_empty())
        .map(|a| a.agent_id.as_str())
        .collect();
    assert_eq!(changed, ["s1"]);

    let report: serde_json::Value =
        coordctl_json(&url, &["validate", "--agent", "s1", "--agent", "s2"]).await;
    assert_eq!(report["valid"], true);

    // Nobody acknowledges (no agent runs): completion is recorded as incomplete,
    // a "no" (status 3).
    let completed: SyncPoint = coordctl_answer(
        &url,
        &["syncpoint", "complete", &id, "--timeout-ms", "200"],
        3,
    )
    .await;
    assert_eq!(completed.missing.len(), 2);
}

#[tokio::test]
async fn bad_input_exits_non_zero_with_the_error_code() {
    let sys = System::start().await;
    let url = sys.server.url().to_owned();
    let dir = tempfile::tempdir().unwrap();

    // A typo in a spec a person wrote is an error naming the field, before any request.
    let typo = write(
        &dir,
        "typo.yaml",
        "name: x\ntasks:\n  - id: a\n    dependson: [b]\n",
    );
    let stderr = coordctl_fails(&url, &["flow", "submit", &typo], "bad_request").await;
    assert!(stderr.contains("dependson"), "{stderr}");

    // The server's own validation: a cycle.
    let cycle = write(
        &dir,
        "cycle.yaml",
        "name: x\ntasks:\n  - {id: a, depends_on: [b]}\n  - {id: b, depends_on: [a]}\n",
    );
    coordctl_fails(&url, &["flow", "submit", &cycle], "validation_failed").await;

    coordctl_fails(&url, &["flow", "status", "no-such-flow"], "not_found").await;
    coordctl_fails(&url, &["state", "get", "nobody"], "not_found").await;

    // With --output json the error body goes to stdout for scripts.
    let out = coordctl(
        &url,
        &["--output", "json", "flow", "status", "not a valid id"],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    let body: ErrorBody = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body.error.code, ErrorCode::InvalidId);

    // Usage errors are clap's: status 2.
    let out = coordctl(&url, &["flow", "frobnicate"]).await;
    assert_eq!(out.status.code(), Some(2));
}

/// A "no" (invalid, incomplete, a flow that did not succeed, unhealthy) exits 3,
/// a system that does not answer 4, and `--help` says so.
#[tokio::test]
async fn exit_statuses_tell_a_no_from_a_failure() {
    let sys = System::start().await;
    let url = sys.server.url().to_owned();
    let dir = tempfile::tempdir().unwrap();

    // A document written before its scope got a schema it breaks.
    let _: StateDoc = coordctl_json(
        &url,
        &[
            "state",
            "put",
            "v1",
            "--scope",
            "checks",
            "--revision",
            "0",
            "{}",
        ],
    )
    .await;
    let cfg = write(
        &dir,
        "scope.yaml",
        "scope: checks\nschema: {type: object, required: [ok]}\n",
    );
    let _: ScopeConfig = coordctl_json(&url, &["scope", "set", &cfg]).await;
    let report: ValidationReport =
        coordctl_answer(&url, &["validate", "--scope", "checks"], 3).await;
    assert!(!report.valid);
    let text = coordctl(&url, &["validate", "--scope", "checks"]).await;
    assert_eq!(text.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&text.stdout).contains("INVALID"));

    // A followed flow that ends cancelled: watch says no, as submit --wait does.
    let spec = write(&dir, "flow.yaml", FLOW_YAML);
    let created: FlowStatus = coordctl_json(&url, &["flow", "submit", &spec]).await;
    let id = created.flow_id.to_string();
    let _: FlowStatus = coordctl_json(&url, &["flow", "cancel", &id]).await;
    let watched: FlowStatus = coordctl_answer(&url, &["flow", "watch", &id], 3).await;
    assert_eq!(watched.state, FlowState::Cancelled);

    let help = coordctl(&url, &["--help"]).await;
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("Exit status:"), "{help}");
    for line in ["  3  the answer is no", "  4  the system did not answer"] {
        assert!(help.contains(line), "{help}");
    }
}

/// Health says no (3) when a required service is missing, and cannot say
/// anything (4) when no monitor answers.
#[tokio::test]
async fn health_tells_unhealthy_from_unreachable() {
    let server = testkit::NatsServer::start();
    let url = server.url().to_owned();
    let out = coordctl(&url, &["health"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("error [unavailable]"), "{stderr}");

    // Only the monitor: the others do not answer $SRV.PING.
    let _monitor = testkit::start_service("monitor", server.config());
    testkit::wait_for_service(&server.connect().await, "monitor").await;
    let health: common::msg::HealthStatus = coordctl_answer(&url, &["health"], 3).await;
    assert_eq!(health.verdict, common::msg::Verdict::Unhealthy);
}

/// `coordctl flow list | head -1`: a reader that has gone ends coordctl quietly,
/// not with a panic.
#[tokio::test]
async fn a_closed_stdout_ends_the_command_quietly() {
    let sys = System::start().await;
    let (writer, reader) = tokio::net::unix::pipe::pipe().unwrap();
    // The reader is gone before coordctl writes a byte, so its first write fails.
    drop(reader);
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_coordctl"))
        .args(["flow", "list"])
        .env("NATS_URL", sys.server.url())
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::from(
            writer.into_blocking_fd().unwrap(),
        ))
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
        .wait_with_output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
}

#[tokio::test]
async fn every_command_has_help() {
    let out = coordctl("nats://127.0.0.1:1", &["--help"]).await;
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    for cmd in [
        "flow",
        "agents",
        "capacity",
        "alloc",
        "optimize",
        "state",
        "scope",
        "validate",
        "synchronize",
        "syncpoint",
        "metrics",
        "health",
        "report",
        "analysis",
        "anomalies",
        "check-system",
        "conformance",
        "events",
    ] {
        assert!(text.contains(cmd), "--help lists {cmd}: {text}");
        let sub = coordctl("nats://127.0.0.1:1", &[cmd, "--help"]).await;
        assert!(sub.status.success(), "{cmd} --help");
    }
    for sub in [
        "submit", "status", "watch", "list", "pause", "resume", "cancel", "modify", "rerun",
        "explain", "optimise",
    ] {
        let out = coordctl("nats://127.0.0.1:1", &["flow", sub, "--help"]).await;
        assert!(out.status.success(), "flow {sub} --help");
    }
}

#[tokio::test]
async fn a_running_tasks_progress_shows_in_status_explain_and_watch() {
    let sys = System::start().await;
    let url = sys.server.url().to_owned();
    // The task reports progress, then runs until the test lets it finish.
    let go = std::sync::Arc::new(tokio::sync::Notify::new());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (nats, release) = (sys.nats.clone(), go.clone());
    tokio::spawn(async move {
        let mut opts = demo::demo_agent_options().unwrap().capability("cli");
        opts.agent_id = AgentId::new("cli-progress").unwrap();
        coordkit::agent::run(
            nats,
            opts,
            move |_task| {
                let release = release.clone();
                async move {
                    coordkit::agent::progress(Some(0.4), Some("indexing".into())).await?;
                    release.notified().await;
                    Ok(serde_json::json!("done"))
                }
            },
            async {
                let _ = stopped.await;
            },
        )
        .await
    });
    let dir = tempfile::tempdir().unwrap();
    let spec = write(&dir, "flow.yaml", FLOW_YAML);
    let created: FlowStatus = coordctl_json(&url, &["flow", "submit", &spec]).await;
    let id = created.flow_id.to_string();
    let started = std::time::Instant::now();
    let text = loop {
        let out = coordctl(&url, &["flow", "status", &id]).await;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.contains("40% indexing") {
            break text;
        }
        assert!(
            started.elapsed().as_secs() < 20,
            "no progress shown: {text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert!(text.contains("PROGRESS"), "{text}");
    let explain = coordctl(&url, &["flow", "explain", &id]).await;
    let explain = String::from_utf8_lossy(&explain.stdout);
    assert!(explain.contains("40% done (indexing)"), "{explain}");
    // `watch` follows the flow; its statuses carry each task's progress.
    let watch = {
        let (url, id) = (url.clone(), id.clone());
        tokio::spawn(
            async move { coordctl_json::<FlowStatus>(&url, &["flow", "watch", &id]).await },
        )
    };
    go.notify_one();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    go.notify_one();
    let watched = watch.await.unwrap();
    assert_eq!(watched.state, FlowState::Succeeded);
    let a = watched
        .tasks
        .iter()
        .find(|t| t.task_id.as_str() == "a")
        .unwrap();
    assert_eq!(a.progress, Some(0.4), "the last progress of a's attempt");
    let _ = stop.send(());
}

/// `coordctl state watch` prints the document, then every write as it lands.
#[tokio::test]
async fn state_watch_follows_the_document_line_by_line() {
    use tokio::io::AsyncBufReadExt;
    let sys = System::start().await;
    let url = sys.server.url().to_owned();
    let put = |revision: u64, doc: &'static str| {
        let url = url.clone();
        async move {
            let rev = revision.to_string();
            let d: StateDoc =
                coordctl_json(&url, &["state", "put", "watched", "--revision", &rev, doc]).await;
            d.revision
        }
    };
    let first = put(0, r#"{"step": 1}"#).await;
    let mut watch = tokio::process::Command::new(env!("CARGO_BIN_EXE_coordctl"))
        .args(["--output", "json", "state", "watch", "watched"])
        .env("NATS_URL", &url)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(watch.stdout.take().unwrap()).lines();
    let mut next = async || -> serde_json::Value {
        let line = tokio::time::timeout(std::time::Duration::from_secs(20), lines.next_line())
            .await
            .expect("a line in time")
            .unwrap()
            .expect("coordctl still running");
        serde_json::from_str(&line).unwrap()
    };
    // The current document comes first: the watch is in place after it.
    let now = next().await;
    assert_eq!(
        (now["revision"].as_u64(), &now["doc"]),
        (Some(first), &serde_json::json!({"step": 1}))
    );
    let second = put(first, r#"{"step": 2}"#).await;
    let third = put(second, r#"{"step": 3}"#).await;
    let a = next().await;
    let b = next().await;
    assert_eq!(
        (a["revision"].as_u64(), &a["doc"]["step"]),
        (Some(second), &serde_json::json!(2))
    );
    assert_eq!(
        (b["revision"].as_u64(), &b["doc"]["step"]),
        (Some(third), &serde_json::json!(3))
    );
    assert_eq!(b["deleted"], false);
    watch.kill().await.unwrap();
}

/// `coordctl events`: schemas set and read, stored events listed by each
/// filter as one JSON object per line, followed live by `watch`, and bad
/// input refused with its code.
#[tokio::test]
async fn events_list_watch_and_schemas_from_the_command_line() {
    use common::msg::{AgentEventPublish, AgentEventRecord, EventSchema};
    use tokio::io::AsyncBufReadExt;

    let sys = System::start().await;
    let url = sys.server.url().to_owned();
    let set: EventSchema = coordctl_json(
        &url,
        &[
            "events",
            "schema",
            "set",
            "approved",
            r#"{"type": "object", "required": ["approved"]}"#,
        ],
    )
    .await;
    assert_eq!(set.event_type, "approved");
    let got: EventSchema = coordctl_json(&url, &["events", "schema", "get", "approved"]).await;
    assert_eq!(got.schema, set.schema);
    coordctl_fails(
        &url,
        &["events", "schema", "set", "bad", r#"{"type": 12}"#],
        "validation_failed",
    )
    .await;
    coordctl_fails(&url, &["events", "list", "--type", "Bad"], "invalid_id").await;

    let since = common::now_ms().saturating_sub(1).to_string();
    let publish = |agent: &str, t: &str, data: serde_json::Value| {
        let client = sys.client.clone();
        let agent = AgentId::new(agent).unwrap();
        let t = t.to_owned();
        async move {
            client
                .publish_event(
                    &agent,
                    &t,
                    &AgentEventPublish {
                        data,
                        event_id: None,
                    },
                )
                .await
                .unwrap()
        }
    };
    publish("w1", "approved", serde_json::json!({"approved": true})).await;
    publish("w2", "approved", serde_json::json!({"approved": false})).await;
    publish("w1", "docked", serde_json::json!({"bay": 3})).await;

    let lines = |args: &'static [&'static str]| {
        let url = url.clone();
        async move {
            let mut all = vec!["--output", "json", "events", "list"];
            all.extend_from_slice(args);
            let out = coordctl(&url, &all).await;
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(|l| serde_json::from_str::<AgentEventRecord>(l).unwrap())
                .map(|r| (r.event.agent_id.to_string(), r.event.event_type))
                .collect::<Vec<_>>()
        }
    };
    let pair = |a: &str, t: &str| (a.to_owned(), t.to_owned());
    assert_eq!(lines(&[]).await.len(), 3);
    assert_eq!(
        lines(&["--type", "approved", "--match", "/approved=true"]).await,
        [pair("w1", "approved")]
    );
    assert_eq!(lines(&["--agent", "w2"]).await, [pair("w2", "approved")]);
    assert_eq!(
        lines(&["--since", "1h", "--limit", "1", "--all"])
            .await
            .len(),
        3
    );

    // Watch from before the first event: the stored ones, then a new one live.
    let mut watch = tokio::process::Command::new(env!("CARGO_BIN_EXE_coordctl"))
        .args([
            "--output", "json", "events", "watch", "--type", "approved", "--since", &since,
        ])
        .env("NATS_URL", &url)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = tokio::io::BufReader::new(watch.stdout.take().unwrap()).lines();
    assert_eq!(next_event(&mut out).await, pair("w1", "approved"));
    assert_eq!(next_event(&mut out).await, pair("w2", "approved"));
    publish("w3", "approved", serde_json::json!({"approved": true})).await;
    assert_eq!(next_event(&mut out).await, pair("w3", "approved"));
    let _ = watch.kill().await;
}

/// The next event `coordctl -o json events watch` prints, as (agent, type).
async fn next_event(
    out: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
) -> (String, String) {
    let line = tokio::time::timeout(std::time::Duration::from_secs(20), out.next_line())
        .await
        .expect("a line from events watch")
        .unwrap()
        .expect("events watch still running");
    let r: common::msg::AgentEventRecord = serde_json::from_str(&line).unwrap();
    (r.event.agent_id.to_string(), r.event.event_type)
}

const TRIGGER_YAML: &str = r#"
name: on-approval
event_type: approval
match: {path: /approved, equals: true}
flow:
  name: publish
  tasks:
    - {id: publish, kind: publish, input: {channel: web}}
"#;

#[tokio::test]
async fn trigger_set_get_list_and_delete() {
    let sys = System::start().await;
    let url = sys.server.url().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let file = write(&dir, "trigger.yaml", TRIGGER_YAML);

    let set: common::msg::Trigger = coordctl_json(&url, &["trigger", "set", &file]).await;
    assert_eq!(set.name, "on-approval");
    let got: common::msg::Trigger = coordctl_json(&url, &["trigger", "get", "on-approval"]).await;
    assert_eq!(got, set);
    let list: common::msg::TriggerList = coordctl_json(&url, &["trigger", "list"]).await;
    assert_eq!(list.triggers, vec![set]);
    let text = coordctl(&url, &["trigger", "list"]).await;
    assert!(String::from_utf8_lossy(&text.stdout).contains("/approved = true"));

    // A typo is refused naming the field; a bad type is a typed error.
    let typo = write(
        &dir,
        "typo.yaml",
        &TRIGGER_YAML.replace("event_type", "eventtype"),
    );
    let err = coordctl_fails(&url, &["trigger", "set", &typo], "bad_request").await;
    assert!(err.contains("eventtype"), "{err}");
    let bad = write(
        &dir,
        "bad.yaml",
        &TRIGGER_YAML.replace("event_type: approval", "event_type: Appro.val"),
    );
    coordctl_fails(&url, &["trigger", "set", &bad], "validation_failed").await;
    coordctl_fails(&url, &["trigger", "get", "nope"], "not_found").await;

    let gone: common::msg::TriggerDeleted =
        coordctl_json(&url, &["trigger", "delete", "on-approval"]).await;
    assert!(gone.deleted);
    let list: common::msg::TriggerList = coordctl_json(&url, &["trigger", "list"]).await;
    assert!(list.triggers.is_empty());
}
