//! The Python example agent (`examples/python/agent.py`, official nats-py client,
//! written from docs/protocol.md) against the real services: flows, state, sync
//! points, a NATS outage, long idle stretches, leaving on SIGTERM, the
//! conformance-task convention, lease keeping and trace propagation.
//! `scripts/setup.sh` installs nats-py into the project venv these tests run it with.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::msg::{
    AgentStatus, AnomaliesRequest, AnomalyKind, CapacityRequest, FlowSpec, FlowState, FlowStatus,
    Requirements, RetryPolicy, StatePut, SyncPointInitiate, SyncPointState, SyncPointWait,
    TaskSpec, TaskState, TaskStatus,
};
use common::{AgentId, FlowId, TaskId};
use futures::StreamExt;
use testkit::{eventually, wait_for_service, workspace_root, System};
use tokio::io::{AsyncBufReadExt, BufReader};

fn python() -> std::path::PathBuf {
    let venv = workspace_root().join(".local/venv/bin/python");
    assert!(
        venv.exists(),
        "{} is missing: run `source scripts/setup.sh` (it installs nats-py)",
        venv.display()
    );
    venv
}

/// The example agent as a child process, its stdout and stderr collected as
/// they come (a pipe nobody reads would block it once full).
struct PyAgent {
    id: AgentId,
    child: tokio::process::Child,
    log: Arc<Mutex<String>>,
}

impl PyAgent {
    /// Starts the agent as `id` against `url`, with the `python` capability and
    /// `cpu=2`, plus `extra` arguments.
    fn spawn(url: &str, id: &str, extra: &[&str]) -> PyAgent {
        let mut child = tokio::process::Command::new(python())
            .arg("-u")
            .arg(workspace_root().join("examples/python/agent.py"))
            .args(["--agent-id", id, "--capability", "python"])
            .args(extra)
            .env("NATS_URL", url)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        for pipe in [
            Box::new(stdout) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
            Box::new(stderr),
        ] {
            let log = log.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        PyAgent {
            id: AgentId::new(id).unwrap(),
            child,
            log,
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGTERM and returns how long the agent took to exit, failing the
    /// test after `within`.
    async fn terminate(&mut self, within: Duration) -> Duration {
        let pid = self.child.id().expect("the agent is running").to_string();
        let sent = Instant::now();
        let status = tokio::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .unwrap();
        assert!(status.success(), "kill -TERM {pid}");
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(Ok(exit)) => {
                assert!(
                    exit.success(),
                    "the agent exited with {exit}:\n{}",
                    self.log()
                );
                sent.elapsed()
            }
            other => panic!(
                "the agent did not exit within {within:?} of SIGTERM ({other:?}):\n{}",
                self.log()
            ),
        }
    }
}

impl Drop for PyAgent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("agent {} said:\n{}", self.id, self.log());
        }
    }
}

/// The allocator's view of `agent`'s status, if it lists it.
async fn status_of(sys: &System, agent: &AgentId) -> Option<AgentStatus> {
    let cap = sys
        .client
        .capacity(&CapacityRequest::default())
        .await
        .ok()?;
    cap.agent_status.get(agent).copied()
}

async fn wait_active(sys: &System, agent: &PyAgent) {
    eventually(
        Duration::from_secs(30),
        &format!("{} to register", agent.id),
        || async { (status_of(sys, &agent.id).await == Some(AgentStatus::Active)).then_some(()) },
    )
    .await;
}

/// Waits for the flow to end and returns its status.
async fn finished(sys: &System, flow: &FlowId) -> FlowStatus {
    eventually(Duration::from_secs(60), "the flow to finish", || async {
        let s = sys.client.flow_status(flow).await.ok()?;
        s.state.is_terminal().then_some(s)
    })
    .await
}

fn task_of<'a>(status: &'a FlowStatus, id: &str) -> &'a TaskStatus {
    status
        .tasks
        .iter()
        .find(|t| t.task_id.as_str() == id)
        .unwrap_or_else(|| panic!("no task {id} in {status:?}"))
}

fn task(id: &str, deps: &[&str], input: serde_json::Value) -> TaskSpec {
    let mut t = TaskSpec::new(TaskId::new(id).unwrap());
    t.kind = "echo".into();
    t.input = input;
    t.requirements = Requirements {
        resources: [("cpu".to_string(), 1.0)].into(),
        capabilities: vec!["python".into()],
        ..Default::default()
    };
    t.depends_on = deps.iter().map(|d| TaskId::new(*d).unwrap()).collect();
    t
}

#[tokio::test]
async fn a_flow_completes_on_the_python_agent() {
    let sys = System::start().await;
    let agent = PyAgent::spawn(sys.server.url(), "py-1", &[]);

    let flow = FlowSpec::new(
        "python",
        vec![
            task(
                "fetch",
                &[],
                serde_json::json!({"url": "https://example.org"}),
            ),
            task("left", &["fetch"], serde_json::json!({"n": 1})),
            task("right", &["fetch"], serde_json::json!({"n": 2})),
        ],
    );
    let created = sys.client.create_flow(&flow).await.unwrap();
    let done = eventually(
        Duration::from_secs(60),
        "the flow to finish on py-1",
        || async {
            let s = sys.client.flow_status(&created.flow_id).await.ok()?;
            s.state.is_terminal().then_some(s)
        },
    )
    .await;
    assert_eq!(done.state, FlowState::Succeeded, "{:?}", done.tasks);
    for t in &done.tasks {
        assert_eq!(t.agent_id.as_ref().map(|a| a.as_str()), Some("py-1"));
        assert_eq!(t.output["agent"], "py-1");
    }
    let right = done
        .tasks
        .iter()
        .find(|t| t.task_id.as_str() == "right")
        .unwrap();
    assert_eq!(right.output["echo"], serde_json::json!({"n": 2}));

    // The agent published its state after each task.
    let me = AgentId::new("py-1").unwrap();
    eventually(
        Duration::from_secs(10),
        "py-1's state after 3 tasks",
        || async {
            let doc = sys.client.state_get(&me).await.ok()?;
            (doc.doc["tasks_done"] == 3).then_some(())
        },
    )
    .await;

    // It acknowledges sync-point notices, so a sync point over it completes.
    let point = sys
        .client
        .syncpoint_initiate(&SyncPointInitiate {
            scope: Default::default(),
            agents: vec![me.clone()],
            label: "python".into(),
        })
        .await
        .unwrap();
    let completed = sys
        .client
        .syncpoint_complete(&SyncPointWait {
            sync_point_id: point.id.clone(),
            timeout_ms: 10_000,
        })
        .await
        .unwrap();
    assert_eq!(completed.state, SyncPointState::Completed, "{completed:?}");

    // A failing task is reported as failed (not retryable), and the flow fails.
    let failing = FlowSpec::new(
        "python-fail",
        vec![task("boom", &[], serde_json::json!({"fail": "no luck"}))],
    );
    let created = sys.client.create_flow(&failing).await.unwrap();
    let failed = eventually(
        Duration::from_secs(60),
        "the failing flow to finish",
        || async {
            let s = sys.client.flow_status(&created.flow_id).await.ok()?;
            s.state.is_terminal().then_some(s)
        },
    )
    .await;
    assert_eq!(failed.state, FlowState::Failed);
    let error = failed.tasks[0].error.as_deref().unwrap_or_default();
    assert!(
        error.contains("no luck"),
        "the agent's error is kept: {error}"
    );
    drop(agent);
}

/// After each task the agent publishes a `task_done` event: it is stored
/// under the agent's identity, listed, seen by a watcher and counted by the
/// monitor; once a schema it does not meet is registered, the agent gets the
/// `validation_failed` verdict (and logs it) and nothing more is stored.
#[tokio::test]
async fn the_python_agents_task_events_are_stored_listed_watched_counted_and_refused() {
    let sys = System::start().await;
    let me = AgentId::new("py-ev").unwrap();
    let mut watch = sys
        .nats
        .subscribe(common::subject::agent_events_filter(Some("task_done"), Some(&me)).unwrap())
        .await
        .unwrap();
    sys.nats.flush().await.unwrap();
    let agent = PyAgent::spawn(sys.server.url(), me.as_str(), &[]);
    let run = |name: &'static str| {
        let sys = &sys;
        async move {
            let flow = FlowSpec::new(name, vec![task("a", &[], serde_json::json!({}))]);
            let created = sys.client.create_flow(&flow).await.unwrap();
            let done = finished(sys, &created.flow_id).await;
            assert_eq!(done.state, FlowState::Succeeded, "{:?}", done.tasks);
            created.flow_id
        }
    };
    let flow = run("events").await;
    let query = common::msg::AgentEventQuery {
        event_type: Some("task_done".into()),
        agent_id: Some(me.clone()),
        ..Default::default()
    };
    let listed = eventually(Duration::from_secs(20), "the task_done event", || async {
        let l = sys.client.list_events(&query).await.ok()?;
        (!l.events.is_empty()).then_some(l)
    })
    .await;
    assert_eq!(listed.events.len(), 1, "{listed:?}");
    let e = &listed.events[0].event;
    assert_eq!(e.event_id, format!("{flow}.a.1"));
    assert_eq!(e.data["task_id"], "a");
    let seen = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        serde_json::from_slice::<common::msg::AgentEvent>(&seen.payload).unwrap(),
        *e
    );
    eventually(Duration::from_secs(20), "the monitor's count", || async {
        let m = sys.client.metrics().await.ok()?;
        (m.agent_events_by_type.get("task_done") == Some(&1)).then_some(())
    })
    .await;

    sys.client
        .event_schema_set(&common::msg::EventSchemaSet {
            event_type: "task_done".into(),
            schema: Some(serde_json::json!({"type": "object", "required": ["approved_by"]})),
        })
        .await
        .unwrap();
    run("refused").await;
    eventually(
        Duration::from_secs(20),
        "the agent told of the refusal",
        || async {
            agent
                .log()
                .contains("event task_done not stored: validation_failed")
                .then_some(())
        },
    )
    .await;
    let after = sys.client.list_events(&query).await.unwrap();
    assert_eq!(after.events.len(), 1, "{after:?}");
    drop(agent);
}

#[tokio::test]
async fn the_python_agent_carries_on_after_a_nats_outage() {
    let mut sys = System::start().await;
    let agent = PyAgent::spawn(sys.server.url(), "py-2", &[]);
    let run = |name: &'static str| {
        let client = sys.client.clone();
        async move {
            let spec = FlowSpec::new(name, vec![task("only", &[], serde_json::json!({}))]);
            let created = client.create_flow(&spec).await.unwrap();
            eventually(Duration::from_secs(60), "the flow to finish", || async {
                let s = client.flow_status(&created.flow_id).await.ok()?;
                s.state.is_terminal().then_some(s.state)
            })
            .await
        }
    };
    assert_eq!(run("before").await, FlowState::Succeeded);
    sys.server.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    sys.server.resume();
    // The agent is under test here, not how soon the services resubscribe:
    // the flow is created once the orchestrator answers again.
    wait_for_service(&sys.nats, "orchestrator").await;
    assert_eq!(run("after").await, FlowState::Succeeded);
    let log = agent.log();
    assert!(log.contains("reconnected; registering again"), "{log}");
}

/// A task run by the conformance-task convention (`{"conformance": …}`).
fn conformance(id: &str, conformance: serde_json::Value) -> TaskSpec {
    let mut t = task(id, &[], serde_json::json!({ "conformance": conformance }));
    t.kind = "conformance".into();
    t
}

/// A retry policy of two attempts, the second right after the first.
fn two_attempts() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 2,
        backoff_base_ms: 50,
        ..Default::default()
    }
}

/// The `agent_id`s of the events waiting in `events`, taken without waiting
/// for more.
async fn agents_named(events: &mut async_nats::Subscriber) -> Vec<String> {
    let mut agents = Vec::new();
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(50), events.next()).await {
        let event: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
        agents.push(event["agent_id"].as_str().unwrap_or_default().to_owned());
    }
    agents
}

/// After the leave, nothing may call the agent lost: the allocator keeps it
/// `left` through several loss windows (3 missed 200 ms heartbeats plus a
/// 500 ms sweep), and neither an `agent_lost` event nor a monitor anomaly
/// names it.
async fn never_lost(sys: &System, agent: &AgentId, lost: &mut async_nats::Subscriber) {
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(status_of(sys, agent).await, Some(AgentStatus::Left));
    let named = agents_named(lost).await;
    assert!(
        !named.iter().any(|a| a == agent.as_str()),
        "{agent} was declared lost: {named:?}"
    );
    let anomalies = sys
        .client
        .anomalies(&AnomaliesRequest {
            kind: Some(AnomalyKind::AgentLost),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(anomalies.anomalies.is_empty(), "{anomalies:?}");
}

#[tokio::test]
async fn the_python_agent_survives_a_long_idle_stretch() {
    let sys = System::start().await;
    let mut agent = PyAgent::spawn(sys.server.url(), "py-idle", &[]);
    wait_active(&sys, &agent).await;
    // A long stretch with nothing to do, heartbeats only.
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert!(
        agent.is_running(),
        "the agent died while idle:\n{}",
        agent.log()
    );
    let spec = FlowSpec::new(
        "after-idle",
        vec![task("only", &[], serde_json::json!({"n": 1}))],
    );
    let created = sys.client.create_flow(&spec).await.unwrap();
    let done = finished(&sys, &created.flow_id).await;
    assert_eq!(done.state, FlowState::Succeeded, "{:?}", done.tasks);
    assert_eq!(task_of(&done, "only").output["agent"], "py-idle");
}

#[tokio::test]
async fn the_python_agent_leaves_on_sigterm() {
    let sys = System::start().await;
    let mut lost = sys.nats.subscribe("coord.events.agent.lost").await.unwrap();
    let mut left = sys.nats.subscribe("coord.events.agent.left").await.unwrap();
    sys.nats.flush().await.unwrap();
    let mut agent = PyAgent::spawn(sys.server.url(), "py-term", &["--heartbeat-ms", "200"]);

    let spec = FlowSpec::new(
        "before-sigterm",
        vec![task("only", &[], serde_json::json!({}))],
    );
    let created = sys.client.create_flow(&spec).await.unwrap();
    assert_eq!(
        finished(&sys, &created.flow_id).await.state,
        FlowState::Succeeded
    );

    let took = agent.terminate(Duration::from_secs(5)).await;
    assert!(agent.log().contains("left (left)"), "{}", agent.log());
    assert_eq!(status_of(&sys, &agent.id).await, Some(AgentStatus::Left));
    let event = tokio::time::timeout(Duration::from_secs(5), left.next())
        .await
        .expect("an agent.left event")
        .unwrap();
    let event: serde_json::Value = serde_json::from_slice(&event.payload).unwrap();
    assert_eq!(event["agent_id"], "py-term", "{event}");
    never_lost(&sys, &agent.id, &mut lost).await;
    eprintln!("py-term exited {took:?} after SIGTERM");
}

#[tokio::test]
async fn sigterm_hands_a_running_python_task_back() {
    let sys = System::start().await;
    let mut lost = sys.nats.subscribe("coord.events.agent.lost").await.unwrap();
    let mut cancels = sys
        .nats
        .subscribe("coord.agents.py-long.cancel")
        .await
        .unwrap();
    sys.nats.flush().await.unwrap();
    let mut long = PyAgent::spawn(sys.server.url(), "py-long", &["--heartbeat-ms", "200"]);
    wait_active(&sys, &long).await;

    let mut slow = conformance(
        "slow",
        serde_json::json!({"sleep_ms": 30_000, "progress_every_ms": 200}),
    );
    slow.retry = two_attempts();
    let created = sys
        .client
        .create_flow(&FlowSpec::new("long", vec![slow]))
        .await
        .unwrap();
    let flow = created.flow_id;
    eventually(
        Duration::from_secs(30),
        "the task to be working on py-long",
        || async {
            let s = sys.client.flow_status(&flow).await.ok()?;
            let t = task_of(&s, "slow");
            (t.state == TaskState::Running && t.progress.is_some()).then_some(())
        },
    )
    .await;
    let other = PyAgent::spawn(sys.server.url(), "py-other", &[]);
    wait_active(&sys, &other).await;

    long.terminate(Duration::from_secs(5)).await;
    let log = long.log();
    assert!(log.contains("handing back 1 running task"), "{log}");
    assert!(log.contains("left (left)"), "{log}");
    assert_eq!(status_of(&sys, &long.id).await, Some(AgentStatus::Left));

    // The leave took attempt 1 away (the agent is told why) and the retry
    // policy runs attempt 2 on the other agent.
    let notice = tokio::time::timeout(Duration::from_secs(10), cancels.next())
        .await
        .expect("a cancel notice for py-long")
        .unwrap();
    let notice: common::msg::CancelNotice = serde_json::from_slice(&notice.payload).unwrap();
    assert_eq!(notice.attempt, 1, "{notice:?}");
    assert_eq!(
        notice.code,
        common::msg::CancelCode::AgentLeft,
        "{notice:?}"
    );
    eventually(
        Duration::from_secs(30),
        "attempt 2 to be working on py-other",
        || async {
            let s = sys.client.flow_status(&flow).await.ok()?;
            let t = task_of(&s, "slow");
            (t.state == TaskState::Running
                && t.attempt == 2
                && t.agent_id.as_ref() == Some(&other.id)
                && t.progress.is_some())
            .then_some(())
        },
    )
    .await;

    // A cancel notice stops the attempt at once, with no final report.
    sys.client.cancel_flow(&flow).await.unwrap();
    let stopped = format!("stopped {flow}/slow#2: cancelled (flow_cancelled)");
    eventually(
        Duration::from_secs(10),
        "py-other to stop attempt 2",
        || async { other.log().contains(&stopped).then_some(()) },
    )
    .await;
    never_lost(&sys, &long.id, &mut lost).await;
}

#[tokio::test]
async fn the_python_agent_runs_conformance_tasks() {
    let sys = System::start().await;
    let agent = PyAgent::spawn(
        sys.server.url(),
        "py-conf",
        &[
            "--capacity",
            "cpu=8",
            "--concurrency",
            "8",
            "--work-ms",
            "1500",
        ],
    );
    wait_active(&sys, &agent).await;
    // A document exists already: the task's compare-and-set must start from its revision.
    let before = sys
        .client
        .state_put(&StatePut {
            agent_id: agent.id.clone(),
            expected_revision: 0,
            doc: serde_json::json!({"old": true}),
            scope: Default::default(),
            clock: None,
        })
        .await
        .unwrap();

    let mut retryable = conformance("retryable", serde_json::json!({"fail": "retryable"}));
    retryable.retry = two_attempts();
    let mut fatal = conformance("fatal", serde_json::json!({"fail": "fatal"}));
    fatal.retry = two_attempts();
    // No progress_every_ms: a conformance task reports only as it says, so
    // the 400 ms heartbeat timeout fires during the 1.5 s of work (the plain
    // echo below keeps its lease by itself).
    let mut leased = conformance("leased", serde_json::json!({"sleep_ms": 1500}));
    leased.timeouts.heartbeat_ms = Some(400);
    let spec = FlowSpec::new(
        "conformance",
        vec![
            conformance(
                "progress",
                serde_json::json!({"sleep_ms": 4000, "progress_every_ms": 200, "output": {"done": "progress"}}),
            ),
            retryable,
            fatal,
            conformance(
                "state",
                serde_json::json!({"state": {"written_by": "conformance", "n": 7}, "output": {"ok": true}}),
            ),
            leased,
        ],
    );
    let created = sys.client.create_flow(&spec).await.unwrap();
    let flow = created.flow_id;
    let (progress, message) = eventually(
        Duration::from_secs(30),
        "progress of the running task",
        || async {
            let s = sys.client.flow_status(&flow).await.ok()?;
            let t = task_of(&s, "progress");
            if t.state != TaskState::Running {
                return None;
            }
            Some((t.progress?, t.progress_message.clone()?))
        },
    )
    .await;
    assert!(progress > 0.0 && progress < 1.0, "{progress}");
    assert!(message.starts_with("step "), "{message}");

    let done = finished(&sys, &flow).await;
    let progress = task_of(&done, "progress");
    assert_eq!(progress.state, TaskState::Succeeded, "{progress:?}");
    assert_eq!(progress.output, serde_json::json!({"done": "progress"}));
    let retryable = task_of(&done, "retryable");
    assert_eq!(
        (retryable.state, retryable.attempt),
        (TaskState::Failed, 2),
        "{retryable:?}"
    );
    assert!(
        retryable
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("conformance: asked to fail"),
        "{retryable:?}"
    );
    let fatal = task_of(&done, "fatal");
    assert_eq!(
        (fatal.state, fatal.attempt),
        (TaskState::Failed, 1),
        "{fatal:?}"
    );
    let state = task_of(&done, "state");
    assert_eq!(state.state, TaskState::Succeeded, "{state:?}");
    assert_eq!(state.output, serde_json::json!({"ok": true}));
    let leased = task_of(&done, "leased");
    assert_eq!(
        (leased.state, leased.attempt),
        (TaskState::TimedOut, 1),
        "{leased:?}"
    );
    let doc = sys.client.state_get(&agent.id).await.unwrap();
    assert_eq!(
        doc.doc,
        serde_json::json!({"written_by": "conformance", "n": 7})
    );
    assert!(doc.revision > before.revision, "{doc:?} {before:?}");

    // A plain echo keeps its lease too (it takes 1.5 s against 400 ms).
    let mut echo = task("echo", &[], serde_json::json!({"n": 1}));
    echo.timeouts.heartbeat_ms = Some(400);
    let created = sys
        .client
        .create_flow(&FlowSpec::new("leased-echo", vec![echo]))
        .await
        .unwrap();
    let done = finished(&sys, &created.flow_id).await;
    let echo = task_of(&done, "echo");
    assert_eq!(
        (echo.state, echo.attempt),
        (TaskState::Succeeded, 1),
        "{echo:?}"
    );
}

#[tokio::test]
async fn the_python_agent_carries_the_trace_into_its_reports() {
    let sys = System::start().await;
    let agent = PyAgent::spawn(sys.server.url(), "py-trace", &[]);
    wait_active(&sys, &agent).await;
    let mut assigns = sys
        .nats
        .subscribe("coord.agents.py-trace.assign")
        .await
        .unwrap();
    let mut reports = sys
        .nats
        .subscribe("coord.agents.py-trace.report")
        .await
        .unwrap();
    sys.nats.flush().await.unwrap();

    let spec = FlowSpec::new(
        "traced",
        vec![conformance(
            "traced",
            serde_json::json!({"sleep_ms": 600, "progress_every_ms": 200}),
        )],
    );
    let created = sys.client.create_flow(&spec).await.unwrap();
    assert_eq!(
        finished(&sys, &created.flow_id).await.state,
        FlowState::Succeeded
    );
    // The first message with a body (the allocator's probes have none).
    let assignment = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let msg = assigns.next().await.unwrap();
            if !msg.payload.is_empty() {
                break msg;
            }
        }
    })
    .await
    .expect("the assignment");
    let traceparent = assignment
        .headers
        .as_ref()
        .and_then(|h| h.get("traceparent"))
        .expect("the assignment carries a traceparent")
        .to_string();

    let mut kinds = Vec::new();
    while !kinds.iter().any(|k| k == "completed") {
        let report = tokio::time::timeout(Duration::from_secs(5), reports.next())
            .await
            .unwrap_or_else(|_| panic!("reports so far: {kinds:?}"))
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&report.payload).unwrap();
        let kind = body["type"].as_str().unwrap_or_default().to_owned();
        let carried = report
            .headers
            .as_ref()
            .and_then(|h| h.get("traceparent"))
            .map(|v| v.to_string());
        assert_eq!(
            carried.as_deref(),
            Some(traceparent.as_str()),
            "{kind} report"
        );
        kinds.push(kind);
    }
    assert_eq!(
        kinds.first().map(String::as_str),
        Some("started"),
        "{kinds:?}"
    );
    assert!(kinds.iter().any(|k| k == "progress"), "{kinds:?}");
}
