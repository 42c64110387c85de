//! The Python example agent (`examples/python/agent.py`, official nats-py client,
//! written from docs/protocol.md) runs a flow to completion against the real
//! services and publishes its state. `scripts/setup.sh` installs nats-py into
//! the project venv this test runs it with.

use std::process::Stdio;
use std::time::Duration;

use common::msg::{
    FlowSpec, FlowState, Requirements, SyncPointInitiate, SyncPointState, SyncPointWait, TaskSpec,
};
use common::{AgentId, TaskId};
use testkit::{eventually, workspace_root, System};

fn python() -> std::path::PathBuf {
    let venv = workspace_root().join(".local/venv/bin/python");
    assert!(
        venv.exists(),
        "{} is missing: run `source scripts/setup.sh` (it installs nats-py)",
        venv.display()
    );
    venv
}

/// Starts the example agent as `id` against `url`, with the `python` capability.
fn spawn_agent(url: &str, id: &str) -> tokio::process::Child {
    tokio::process::Command::new(python())
        .arg(workspace_root().join("examples/python/agent.py"))
        .args([
            "--agent-id",
            id,
            "--capability",
            "python",
            "--capacity",
            "cpu=2",
        ])
        .env("NATS_URL", url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
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
    let mut agent = spawn_agent(sys.server.url(), "py-1");

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
    if done.state != FlowState::Succeeded {
        let _ = agent.start_kill();
        let out = agent.wait_with_output().await.unwrap();
        panic!(
            "flow ended {:?}: {:?}\nagent stdout:\n{}\nagent stderr:\n{}",
            done.state,
            done.tasks,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
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
    let _ = agent.start_kill();
}

#[tokio::test]
async fn the_python_agent_carries_on_after_a_nats_outage() {
    let mut sys = System::start().await;
    let mut agent = spawn_agent(sys.server.url(), "py-2");
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
    let after = run("after").await;
    if after != FlowState::Succeeded {
        let _ = agent.start_kill();
        let out = agent.wait_with_output().await.unwrap();
        panic!(
            "flow after the outage ended {after:?}\nagent stdout:\n{}\nagent stderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = agent.start_kill();
    let out = agent.wait_with_output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("reconnected; registering again"),
        "{stdout}"
    );
}
