//! `coordctl conformance` against real agents: the Rust runtime's echo agent
//! (`coordctl agent`) keeps every rule; small agents written here on raw NATS,
//! each breaking the contract on purpose, fail the rules they break; the
//! Python example agent is run the same way.

use std::collections::HashSet;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use common::msg::AgentStatus;
use common::AgentId;
use futures::StreamExt;
use serde_json::{json, Value};
use testkit::{eventually, workspace_root, System};

use crate::coordctl;

/// Waits until `agent` is registered and active.
async fn registered(sys: &System, agent: &str) {
    let id = AgentId::new(agent).unwrap();
    eventually(
        Duration::from_secs(30),
        &format!("{agent} to register"),
        || async {
            let cap = sys.client.capacity(&Default::default()).await.ok()?;
            (cap.agent_status.get(&id) == Some(&AgentStatus::Active)).then_some(())
        },
    )
    .await;
}

/// Runs the kit with `--output json`; its report and exit status.
async fn kit(url: &str, args: &[&str]) -> (Value, Option<i32>) {
    let mut all = vec!["--output", "json", "conformance"];
    all.extend_from_slice(args);
    report_of(coordctl(url, &all).await)
}

fn report_of(out: std::process::Output) -> (Value, Option<i32>) {
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "the kit printed no report ({e}):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (report, out.status.code())
}

/// The verdict and detail of one rule in the kit's report.
fn rule<'a>(report: &'a Value, name: &str) -> (&'a str, &'a str) {
    let row = report["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["rule"] == name)
        .unwrap_or_else(|| panic!("no rule {name} in {report:#}"));
    (
        row["result"].as_str().unwrap(),
        row["detail"].as_str().unwrap(),
    )
}

/// Every rule passed: the ones given, and no other.
fn assert_all_pass(report: &Value, code: Option<i32>) {
    let rows = report["rules"].as_array().unwrap();
    let not_passed: Vec<&Value> = rows.iter().filter(|r| r["result"] != "pass").collect();
    assert!(not_passed.is_empty(), "rules not passed: {not_passed:#?}");
    assert_eq!(rows.len(), 17, "every rule ran: {report:#}");
    assert_eq!(report["passed"], true);
    assert_eq!(code, Some(0));
}

#[tokio::test]
async fn the_rust_runtime_agent_keeps_every_rule() {
    let sys = System::start().await;
    let url = sys.server.url().to_owned();
    let mut agent = tokio::process::Command::new(env!("CARGO_BIN_EXE_coordctl"))
        .args(["agent", "--id", "conf-rust", "--heartbeat-ms", "500"])
        .env("NATS_URL", &url)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    registered(&sys, "conf-rust").await;
    let stop = format!("kill -TERM {}", agent.id().unwrap());
    let (report, code) = kit(&url, &["--agent-id", "conf-rust", "--stop-cmd", &stop]).await;
    assert_all_pass(&report, code);
    // It left on SIGTERM, and exited.
    let exited = tokio::time::timeout(Duration::from_secs(10), agent.wait()).await;
    assert!(matches!(exited, Ok(Ok(s)) if s.success()), "{exited:?}");
}

/// On the isolating deployment (`deploy/nats-auth.conf`, an account per
/// agent from `deploy/agent-user.sh`): the services log in as theirs, the
/// agent `me` (started by `agent` with only its own password) and the kit as
/// an operator. Every rule passes and the agent leaves on SIGTERM.
async fn keeps_every_rule_on_an_isolating_server(
    me: &str,
    agent: impl FnOnce(&str) -> tokio::process::Command,
) {
    use testkit::isolated::{isolated_server, login, password, OPERATOR, SERVICE};

    common::telemetry::init_for_tests();
    let server = isolated_server(&[me]);
    let services: Vec<_> = testkit::SERVICES
        .iter()
        .map(|n| testkit::start_service(n, login(&server, SERVICE)))
        .collect();
    let operator = common::nats::connect(&login(&server, OPERATOR), "operator")
        .await
        .unwrap();
    for name in testkit::SERVICES {
        testkit::wait_for_service(&operator, name).await;
    }
    let ops = common::Client::new(operator).with_timeout(Duration::from_secs(10));
    let url = server.url().to_owned();
    let mut agent = agent(me)
        .env("NATS_URL", &url)
        .env("NATS_USER", me)
        .env("NATS_PASSWORD", password(me))
        .env_remove("NATS_INBOX_PREFIX")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let id = AgentId::new(me).unwrap();
    eventually(Duration::from_secs(30), "the agent to register", || async {
        let cap = ops.capacity(&Default::default()).await.ok()?;
        (cap.agent_status.get(&id) == Some(&AgentStatus::Active)).then_some(())
    })
    .await;

    let stop = format!("kill -TERM {}", agent.id().unwrap());
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_coordctl"))
        .args(["--output", "json", "conformance", "--agent-id", me])
        .args(["--stop-cmd", &stop])
        .env("NATS_URL", &url)
        .env("NATS_USER", OPERATOR.0)
        .env("NATS_PASSWORD", OPERATOR.1)
        .env_remove("NATS_INBOX_PREFIX")
        .env_remove("RUST_LOG")
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let (report, code) = report_of(out);
    assert_all_pass(&report, code);
    let exited = tokio::time::timeout(Duration::from_secs(10), agent.wait()).await;
    assert!(matches!(exited, Ok(Ok(s)) if s.success()), "{exited:?}");
    for s in services {
        s.stop().await.unwrap();
    }
}

#[tokio::test]
async fn the_rust_runtime_agent_keeps_every_rule_on_an_isolating_server() {
    keeps_every_rule_on_an_isolating_server("conf-iso", |me| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_coordctl"));
        cmd.args(["agent", "--id", me, "--heartbeat-ms", "500"]);
        cmd
    })
    .await;
}

#[tokio::test]
async fn the_python_agent_keeps_every_rule_on_an_isolating_server() {
    let venv = workspace_root().join(".local/venv/bin/python");
    assert!(venv.exists(), "run `source scripts/setup.sh` first");
    keeps_every_rule_on_an_isolating_server("conf-iso-py", |me| {
        let mut cmd = tokio::process::Command::new(venv);
        cmd.arg(workspace_root().join("examples/python/agent.py"));
        cmd.args(["--agent-id", me, "--capability", "python"]);
        cmd.args(["--capacity", "cpu=2", "--heartbeat-ms", "500"]);
        cmd
    })
    .await;
}

/// How a hand-written agent breaks the contract.
#[derive(Clone, Copy)]
struct Breaks {
    /// Keeps working through cancel notices and sends its final report anyway.
    ignores_cancel: bool,
    /// Never reports progress, whatever the task asks.
    no_progress: bool,
    /// Puts its state with revision 0 and ignores the reply.
    blind_state: bool,
    /// Runs an assignment again each time it comes.
    runs_repeats: bool,
}

/// An agent on raw NATS following the conformance convention except where
/// `breaks` says, with the `raw` capability and 2 cpu.
async fn raw_agent(nats: async_nats::Client, id: &'static str, breaks: Breaks) {
    let mut assignments = nats
        .subscribe(format!("coord.agents.{id}.assign"))
        .await
        .unwrap();
    let register = json!({
        "agent_id": id, "capabilities": ["raw"], "capacity": {"cpu": 2}, "heartbeat_interval_ms": 500,
    });
    nats.request(
        format!("coord.agents.{id}.register"),
        register.to_string().into(),
    )
    .await
    .unwrap();
    let beats = nats.clone();
    tokio::spawn(async move {
        loop {
            let beat = json!({"agent_id": id, "at_ms": common::now_ms(), "running": 0});
            let _ = beats
                .publish(
                    format!("coord.agents.{id}.heartbeat"),
                    beat.to_string().into(),
                )
                .await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let cancelled: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut notices = nats
        .subscribe(format!("coord.agents.{id}.cancel"))
        .await
        .unwrap();
    let seen = cancelled.clone();
    tokio::spawn(async move {
        while let Some(m) = notices.next().await {
            let n: Value = serde_json::from_slice(&m.payload).unwrap();
            let key = format!("{}.{}.{}", n["flow_id"], n["task_id"], n["attempt"]);
            seen.lock().unwrap().insert(key);
        }
    });
    let js = jetstream::new(nats.clone());
    let mut taken = HashSet::new();
    while let Some(msg) = assignments.next().await {
        let Ok(a) = serde_json::from_slice::<Value>(&msg.payload) else {
            continue;
        };
        let key = format!("{}.{}.{}", a["flow_id"], a["task_id"], a["attempt"]);
        if !taken.insert(key) && !breaks.runs_repeats {
            continue;
        }
        let (nats, js, cancelled) = (nats.clone(), js.clone(), cancelled.clone());
        tokio::spawn(async move {
            let key = format!("{}.{}.{}", a["flow_id"], a["task_id"], a["attempt"]);
            let report = |kind: Value, n: u32| {
                let js = js.clone();
                let mut body = json!({
                    "flow_id": a["flow_id"], "task_id": a["task_id"], "attempt": a["attempt"], "agent_id": id,
                });
                let ty = kind["type"].as_str().unwrap().to_owned();
                body.as_object_mut()
                    .unwrap()
                    .extend(kind.as_object().unwrap().clone());
                let mut msg_id = format!(
                    "{}.{}.{}.{ty}",
                    a["flow_id"].as_str().unwrap(),
                    a["task_id"].as_str().unwrap(),
                    a["attempt"]
                );
                if ty == "progress" {
                    msg_id.push_str(&format!(".{n}"));
                }
                async move {
                    let to = format!("coord.agents.{id}.report");
                    js.publish_with_headers(
                        to.clone(),
                        common::nats::dedupe_headers(&to, &msg_id),
                        body.to_string().into(),
                    )
                    .await
                    .unwrap()
                    .await
                    .unwrap();
                }
            };
            report(json!({"type": "started"}), 0).await;
            let conf = &a["input"]["conformance"];
            let sleep = conf["sleep_ms"].as_u64().unwrap_or(0);
            let every = conf["progress_every_ms"].as_u64().unwrap_or(0);
            let mut slept = 0;
            let mut step = 0;
            while slept < sleep {
                tokio::time::sleep(Duration::from_millis(50)).await;
                slept += 50;
                if !breaks.ignores_cancel && cancelled.lock().unwrap().contains(&key) {
                    return;
                }
                if !breaks.no_progress && every > 0 && slept % every < 50 && slept < sleep {
                    step += 1;
                    let p = slept as f64 / sleep as f64;
                    report(json!({"type": "progress", "progress": p, "message": format!("step {step}")}), step).await;
                }
            }
            if let Some(state) = conf.get("state") {
                let get = nats
                    .request(
                        format!("coord.agents.{id}.state.get"),
                        json!({"agent_id": id}).to_string().into(),
                    )
                    .await
                    .unwrap();
                let current: Value = serde_json::from_slice(&get.payload).unwrap();
                let revision = if breaks.blind_state {
                    0
                } else {
                    current["revision"].as_u64().unwrap_or(0)
                };
                let put = json!({"agent_id": id, "expected_revision": revision, "doc": state});
                nats.request(
                    format!("coord.agents.{id}.state.put"),
                    put.to_string().into(),
                )
                .await
                .unwrap();
            }
            match conf["fail"].as_str() {
                Some(how) => {
                    report(json!({"type": "failed", "error": "conformance: asked to fail", "retryable": how == "retryable"}), 0).await;
                }
                None => {
                    let output = conf
                        .get("output")
                        .cloned()
                        .unwrap_or_else(|| json!({"echo": a["input"]}));
                    report(json!({"type": "completed", "output": output}), 0).await;
                }
            }
        });
    }
}

#[tokio::test]
async fn an_agent_that_ignores_cancel_notices_fails_cancel_and_stale_attempt() {
    let sys = System::start().await;
    let url = sys.server.url().to_owned();
    let nats = sys.server.connect().await;
    let breaks = Breaks {
        ignores_cancel: true,
        no_progress: false,
        blind_state: false,
        runs_repeats: false,
    };
    let _agent = tokio::spawn(raw_agent(nats, "deaf", breaks));
    registered(&sys, "deaf").await;
    let (report, code) = kit(
        &url,
        &[
            "--agent-id",
            "deaf",
            "--rules",
            "success,cancel,stale_attempt",
        ],
    )
    .await;
    assert_eq!(code, Some(1), "{report:#}");
    assert_eq!(report["passed"], false);
    assert_eq!(rule(&report, "success").0, "pass", "{report:#}");
    let (verdict, detail) = rule(&report, "cancel");
    assert_eq!(verdict, "fail", "{report:#}");
    assert!(detail.contains("after its cancel notice"), "{detail}");
    let (verdict, detail) = rule(&report, "stale_attempt");
    assert_eq!(verdict, "fail", "{report:#}");
    assert!(detail.contains("fenced"), "{detail}");

    // The same run in text: a table naming the broken rules.
    let out = coordctl(
        &url,
        &["conformance", "--agent-id", "deaf", "--rules", "cancel"],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("cancel") && l.contains("FAIL")),
        "{text}"
    );
}

#[tokio::test]
async fn an_agent_without_progress_or_state_cas_fails_those_rules() {
    let sys = System::start().await;
    let url = sys.server.url().to_owned();
    let nats = sys.server.connect().await;
    let breaks = Breaks {
        ignores_cancel: false,
        no_progress: true,
        blind_state: true,
        runs_repeats: true,
    };
    let _agent = tokio::spawn(raw_agent(nats, "sloppy", breaks));
    registered(&sys, "sloppy").await;
    let (report, code) = kit(
        &url,
        &[
            "--agent-id",
            "sloppy",
            "--rules",
            "success,repeat_ignored,progress_keeps_lease,state_cas,progress_valid",
        ],
    )
    .await;
    assert_eq!(code, Some(1), "{report:#}");
    assert_eq!(rule(&report, "success").0, "pass", "{report:#}");
    let (verdict, detail) = rule(&report, "repeat_ignored");
    assert_eq!(verdict, "fail", "{report:#}");
    assert!(detail.contains("run more than once"), "{detail}");
    let (verdict, detail) = rule(&report, "progress_keeps_lease");
    assert_eq!(verdict, "fail", "{report:#}");
    assert!(detail.contains("timed_out"), "{detail}");
    let (verdict, detail) = rule(&report, "state_cas");
    assert_eq!(verdict, "fail", "{report:#}");
    assert!(detail.contains("not the task's state"), "{detail}");
    assert_eq!(rule(&report, "progress_valid").0, "skip", "{report:#}");
}

#[tokio::test]
async fn the_kit_refuses_an_agent_it_cannot_pin_tasks_on() {
    let sys = System::start().await;
    let url = sys.server.url().to_owned();
    for id in ["twin-1", "twin-2"] {
        // Runs until the test ends.
        drop(tokio::spawn(raw_agent(
            sys.server.connect().await,
            id,
            Breaks {
                ignores_cancel: false,
                no_progress: false,
                blind_state: false,
                runs_repeats: false,
            },
        )));
        registered(&sys, id).await;
    }
    let out = coordctl(&url, &["conformance", "--agent-id", "twin-1"]).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("could also go to twin-2"), "{stderr}");
    let out = coordctl(&url, &["conformance", "--agent-id", "nobody"]).await;
    assert!(String::from_utf8_lossy(&out.stderr).contains("not registered"));
}

/// The Python example agent under the kit, leave included.
#[tokio::test]
async fn the_python_agent_keeps_every_rule() {
    let sys = System::start().await;
    let url = sys.server.url().to_owned();
    let venv = workspace_root().join(".local/venv/bin/python");
    assert!(venv.exists(), "run `source scripts/setup.sh` first");
    let mut agent = tokio::process::Command::new(venv)
        .arg(workspace_root().join("examples/python/agent.py"))
        .args([
            "--agent-id",
            "conf-py",
            "--capability",
            "python",
            "--capacity",
            "cpu=2",
            "--heartbeat-ms",
            "500",
        ])
        .env("NATS_URL", &url)
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    registered(&sys, "conf-py").await;
    let stop = format!("kill -TERM {}", agent.id().unwrap());
    let (report, code) = kit(&url, &["--agent-id", "conf-py", "--stop-cmd", &stop]).await;
    assert_all_pass(&report, code);
    let _ = tokio::time::timeout(Duration::from_secs(10), agent.wait()).await;
}
