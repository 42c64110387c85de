//! The compose files on real containers: `docker-compose.yml` as shipped,
//! scaled and broken; the 3-node cluster overlay stopped and partitioned;
//! the isolating overlay with an agent in its own container. The images are
//! built here without pulling anything (kit.rs), laid over the shipped files
//! by an override that swaps only image sources.
//!
//! Skipped with a message where no Docker engine answers; where one answers
//! and `CI` is set, anything else missing is a failure.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod kit;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use common::msg::{CapacityRequest, Event, EventKind, FlowState, TaskState};
use common::{Client, FlowId, TaskId};
use futures::StreamExt;
use kit::{docker_or_skip, images, Stack};
use testkit::eventually;

/// How long a stack may take to come up healthy (health checks every 5–10 s).
const UP: Duration = Duration::from_secs(180);
/// How long the flows may take to finish after the faults.
const SETTLE: Duration = Duration::from_secs(180);

async fn connect(url: &str, login: Option<(&str, &str)>) -> async_nats::Client {
    let mut opts = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .max_reconnects(None);
    if let Some((user, password)) = login {
        opts = async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
            .retry_on_initial_connect()
            .max_reconnects(None);
    }
    tokio::time::timeout(Duration::from_secs(30), opts.connect(url))
        .await
        .expect("the published NATS port answers")
        .unwrap()
}

/// Submits `n` copies of the demo flow (the demo agent's `demo` capability),
/// retrying while the system is getting back up.
async fn submit(client: &Client, n: usize) -> Vec<FlowId> {
    submit_for(client, n, None).await
}

/// Submits `n` copies of the demo flow, each task asking for `capability`
/// instead of the demo agent's when one is given.
async fn submit_for(client: &Client, n: usize, capability: Option<&str>) -> Vec<FlowId> {
    let mut ids = Vec::new();
    for _ in 0..n {
        let mut spec = coordkit::demo::demo_flow().unwrap();
        if let Some(c) = capability {
            for t in &mut spec.tasks {
                t.requirements.capabilities = vec![c.to_owned()];
            }
        }
        let id = eventually(Duration::from_secs(60), "a flow accepted", || {
            let (client, spec) = (client.clone(), spec.clone());
            async move { client.create_flow(&spec).await.ok().map(|s| s.flow_id) }
        })
        .await;
        ids.push(id);
    }
    ids
}

/// Waits until every flow has succeeded, each within `within`. A flow still
/// unfinished then fails the test with what it is waiting for (each task's state,
/// attempt and agent, the agents' status) and the stack's last log lines; a
/// flow that ended otherwise fails it with its status, the agents' and the logs.
async fn all_succeed(stack: &Stack, client: &Client, flows: &[FlowId], within: Duration) {
    for flow in flows {
        let started = std::time::Instant::now();
        let state = loop {
            let s = client.flow_status(flow).await.ok();
            if let Some(s) = s.as_ref().filter(|s| s.state.is_terminal()) {
                break s.clone();
            }
            if started.elapsed() > within {
                let tasks: Vec<String> = s
                    .iter()
                    .flat_map(|s| &s.tasks)
                    .map(|t| {
                        format!(
                            "{} {:?} attempt {} on {:?}",
                            t.task_id, t.state, t.attempt, t.agent_id
                        )
                    })
                    .collect();
                let agents = client
                    .capacity(&CapacityRequest::default())
                    .await
                    .map(|c| format!("{:?}", c.agent_status))
                    .unwrap_or_else(|e| e.to_string());
                panic!(
                    "flow {flow} not finished within {within:?}: {:?}\ntasks: {tasks:#?}\nagents: {agents}\n{}",
                    s.map(|s| s.state),
                    stack.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(
            state.state,
            FlowState::Succeeded,
            "{state:?}\nagents: {:?}\n{}",
            client
                .capacity(&CapacityRequest::default())
                .await
                .map(|c| c.agent_status),
            stack.logs()
        );
    }
}

/// Every event the events stream holds, read from its start. Just after a
/// node rejoined a cluster, JetStream may answer "temporarily unavailable"
/// for a while: asked again until it answers.
async fn all_events(nats: &async_nats::Client) -> Vec<Event> {
    let js = jetstream::new(nats.clone());
    let (last, mut messages) = eventually(Duration::from_secs(60), "the events stream", || {
        let js = js.clone();
        async move {
            let mut stream = js.get_stream(common::nats::STREAM_EVENTS).await.ok()?;
            let last = stream.info().await.ok()?.state.last_sequence;
            let consumer = stream
                .create_consumer(consumer::pull::OrderedConfig {
                    deliver_policy: consumer::DeliverPolicy::All,
                    ..Default::default()
                })
                .await
                .ok()?;
            Some((last, consumer.messages().await.ok()?))
        }
    })
    .await;
    let mut out = Vec::new();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(20), messages.next())
            .await
            .expect("the events stream reads back")
            .unwrap()
            .unwrap();
        let seq = msg.info().unwrap().stream_sequence;
        if let Ok(e) = serde_json::from_slice::<Event>(&msg.payload) {
            out.push(e);
        }
        if seq >= last {
            return out;
        }
    }
}

/// Each task of each flow succeeded exactly once (one `succeeded` event),
/// the system's cross-checks pass and no agent has anything booked.
///
/// A flow's events are published after the write that finishes it, and
/// again from its outbox while the stream has not acknowledged them (every
/// 2 s): just after a fault heals, a flow can read `succeeded` before its
/// last events are stored. So the stream is read until every task's event
/// is there (or a minute has passed), and then each must be there once.
async fn each_task_once_nothing_leaked(
    nats: &async_nats::Client,
    client: &Client,
    flows: &[FlowId],
) {
    let tasks = || {
        flows
            .iter()
            .flat_map(|f| ["a", "b", "c"].map(|t| (f.clone(), TaskId::new(t).unwrap())))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let succeeded = loop {
        let mut succeeded: BTreeMap<(FlowId, TaskId), usize> = BTreeMap::new();
        for e in all_events(nats).await {
            if let EventKind::TaskTransition {
                flow_id,
                task_id,
                to: TaskState::Succeeded,
                ..
            } = e.kind
            {
                *succeeded.entry((flow_id, task_id)).or_default() += 1;
            }
        }
        if tasks().all(|k| succeeded.contains_key(&k)) || std::time::Instant::now() > deadline {
            break succeeded;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    for flow in flows {
        for task in ["a", "b", "c"] {
            let n = succeeded
                .get(&(flow.clone(), TaskId::new(task).unwrap()))
                .copied();
            assert_eq!(n, Some(1), "{flow} task {task} succeeded once");
        }
    }
    eventually(
        Duration::from_secs(60),
        "no allocation left and a consistent system",
        || {
            let client = client.clone();
            async move {
                let cap = client.capacity(&CapacityRequest::default()).await.ok()?;
                let booked: f64 = cap
                    .agents
                    .values()
                    .flat_map(|r| r.values())
                    .map(|r| r.allocated)
                    .sum();
                let valid = client.validate_system().await.ok()?.valid;
                (booked == 0.0 && valid).then_some(())
            }
        },
    )
    .await;
}

/// `docker-compose.yml` as shipped: up and healthy, flows run by the demo
/// agent (the Rust runtime) and by the Python example agent, each in its
/// own container; then three orchestrators and two allocators, and under
/// running flows one orchestrator replica and both agents killed and the
/// nats container restarted (its volume keeps the streams): every flow
/// succeeds, each task once, on the agent it asked for, nothing stays booked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_stack_scales_and_survives_kills_and_a_nats_restart() {
    if !docker_or_skip("shipped_stack") {
        return;
    }
    let images = images();
    let stack = Stack::up("scale", &images, &[], &["demo", "python-demo"], &[]);
    // nats, four services, the demo agent, the Python agent.
    stack.wait_healthy(7, UP);
    let nats = connect(&stack.nats_url(), None).await;
    let client = Client::new(nats.clone());
    let mut first = submit(&client, 1).await;
    let mut python = submit_for(&client, 1, Some("python")).await;
    all_succeed(&stack, &client, &first, Duration::from_secs(60)).await;
    all_succeed(&stack, &client, &python, Duration::from_secs(60)).await;
    let on_python = client.flow_status(&python[0]).await.unwrap();
    assert!(
        on_python
            .tasks
            .iter()
            .all(|t| t.agent_id.as_ref().map(|a| a.as_str()) == Some("python-agent")),
        "the Python agent's container ran them: {on_python:?}"
    );
    // The image's own health check (`coordctl healthcheck`, the Dockerfile's
    // HEALTHCHECK): the service in its container answers, a container of
    // no service passes, and a service it cannot reach fails it.
    let healthcheck = |container: &str, env: &[&str]| {
        let mut args = vec!["exec"];
        for e in env {
            args.extend(["-e", e]);
        }
        args.extend([container, "coordctl", "healthcheck"]);
        Command::new("docker")
            .args(&args)
            .status()
            .unwrap()
            .success()
    };
    let orchestrator = stack.containers("orchestrator")[0].clone();
    assert!(healthcheck(&orchestrator, &[]), "the orchestrator answers");
    assert!(healthcheck(&stack.containers("demo-agent")[0], &[]));
    assert!(
        !healthcheck(&orchestrator, &["NATS_URL=nats://127.0.0.1:1"]),
        "no answer through a server that is not there"
    );

    stack.compose(&[
        "up",
        "-d",
        "--no-build",
        "--scale",
        "orchestrator=3",
        "--scale",
        "allocator=2",
    ]);
    stack.wait_healthy(10, UP);
    assert_eq!(stack.containers("orchestrator").len(), 3);
    assert_eq!(stack.containers("allocator").len(), 2);

    first.extend(submit(&client, 12).await);
    python.extend(submit_for(&client, 4, Some("python")).await);
    let orchestrator = stack.containers("orchestrator")[1].clone();
    let agent = stack.containers("demo-agent")[0].clone();
    let py_agent = stack.containers("python-agent")[0].clone();
    let nats_box = stack.containers("nats")[0].clone();
    stack.docker(&["kill", &orchestrator]);
    stack.docker(&["kill", &agent]);
    stack.docker(&["kill", &py_agent]);
    first.extend(submit(&client, 4).await);
    python.extend(submit_for(&client, 2, Some("python")).await);
    stack.docker(&["start", &agent]);
    stack.docker(&["start", &py_agent]);
    stack.docker(&["restart", "--time", "5", &nats_box]);
    first.extend(submit(&client, 4).await);
    // The killed replica back too (a restart policy does not apply to a kill).
    stack.docker(&["start", &orchestrator]);
    let flows: Vec<FlowId> = first.iter().chain(&python).cloned().collect();
    all_succeed(&stack, &client, &flows, SETTLE).await;
    each_task_once_nothing_leaked(&nats, &client, &flows).await;
    for flow in &python {
        let s = client.flow_status(flow).await.unwrap();
        assert!(
            s.tasks
                .iter()
                .all(|t| t.agent_id.as_ref().map(|a| a.as_str()) == Some("python-agent")),
            "{s:?}"
        );
    }
    stack.wait_healthy(10, UP);
}

/// Whether a NATS node says it is a current member of its JetStream cluster:
/// in contact with a meta leader and caught up (its `/healthz` for the
/// server's JetStream, asked from inside its container). A node cut off
/// from the others may take long to answer: no answer in 5 s is no.
fn node_current(container: &str) -> bool {
    Command::new("docker")
        .args([
            "exec",
            container,
            "busybox",
            "timeout",
            "5",
            "wget",
            // No `-T`: this static busybox's wget crashes on it.
            "-qO-",
            "http://localhost:8222/healthz?js-server-only=true",
        ])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The 3-node cluster overlay: one node stopped, flows carry on; one node
/// cut off its network (a real partition), the majority carries on and a
/// client on the minority side gets no success; the node rejoins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_overlay_rides_out_a_stopped_node_and_a_partition() {
    if !docker_or_skip("cluster_overlay") {
        return;
    }
    let images = images();
    let stack = Stack::up(
        "cluster",
        &images,
        &["deploy/compose.cluster.yml"],
        &["demo"],
        &[],
    );
    // Three nodes, four services, the demo agent.
    stack.wait_healthy(8, UP);
    let nats = connect(&stack.nats_url(), None).await;
    let client = Client::new(nats.clone());
    let mut flows = submit(&client, 2).await;
    all_succeed(&stack, &client, &flows, Duration::from_secs(90)).await;

    // One node stopped: the other two keep the quorum.
    let node2 = stack.containers("nats-2")[0].clone();
    stack.docker(&["stop", "--time", "2", &node2]);
    let more = submit(&client, 3).await;
    all_succeed(&stack, &client, &more, SETTLE).await;
    flows.extend(more);
    stack.docker(&["start", &node2]);
    stack.wait_healthy(8, UP);
    eventually(Duration::from_secs(90), "nats-2 current again", || async {
        node_current(&node2).then_some(())
    })
    .await;

    // A partition: nats-3 off the project's network.
    let node3 = stack.containers("nats-3")[0].clone();
    let network = stack.network();
    stack.docker(&["network", "disconnect", &network, &node3]);
    // The majority's view: nats-3 is no longer a current replica of the
    // reports stream (its leader, re-elected on the majority if nats-3
    // led it, says so).
    let js = jetstream::new(nats.clone());
    eventually(
        Duration::from_secs(60),
        "the majority sees nats-3 gone",
        || async {
            let mut stream = js.get_stream(common::nats::STREAM_REPORTS).await.ok()?;
            let cluster = stream.info().await.ok()?.cluster.clone()?;
            (cluster.leader.as_deref() != Some("nats-3")
                && cluster
                    .replicas
                    .iter()
                    .any(|r| r.name == "nats-3" && (r.offline || !r.current)))
            .then_some(())
        },
    )
    .await;
    let more = submit(&client, 3).await;
    all_succeed(&stack, &client, &more, SETTLE).await;
    flows.extend(more);
    // A client on the minority side (in nats-3's network namespace) asks for
    // a flow: it must not be told it succeeded.
    let spec = dir_with_demo_flow();
    let minority = Command::new("docker")
        .args(["run", "--rm", "--network"])
        .arg(format!("container:{node3}"))
        .arg("-v")
        .arg(format!("{}:/spec:ro", spec.path().display()))
        .args([
            "-e",
            "NATS_URL=nats://127.0.0.1:4222",
            "-e",
            "COORD_REQUEST_TIMEOUT_MS=3000",
            &images.coordkit,
            "coordctl",
            "flow",
            "submit",
            "/spec/flow.json",
        ])
        .output()
        .unwrap();
    assert!(
        !minority.status.success(),
        "a flow submitted on the minority side was acknowledged: {}",
        String::from_utf8_lossy(&minority.stdout)
    );
    // Healed, with the name the other nodes route to.
    stack.docker(&["network", "connect", "--alias", "nats-3", &network, &node3]);
    eventually(Duration::from_secs(90), "nats-3 rejoins", || async {
        node_current(&node3).then_some(())
    })
    .await;
    let more = submit(&client, 2).await;
    all_succeed(&stack, &client, &more, SETTLE).await;
    flows.extend(more);
    each_task_once_nothing_leaked(&nats, &client, &flows).await;
}

/// A directory holding the demo flow's spec, for `coordctl flow submit`.
fn dir_with_demo_flow() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let spec = coordkit::demo::demo_flow().unwrap();
    std::fs::write(
        dir.path().join("flow.json"),
        serde_json::to_vec(&spec).unwrap(),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    for p in [dir.path().to_path_buf(), dir.path().join("flow.json")] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    dir
}

/// The isolating overlay with the demo profile: the agent in its container
/// runs flows and writes its own state, and is refused when it acts as
/// another agent; the operator reads back that nothing of the kind happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_overlay_lets_an_agent_container_act_only_as_itself() {
    if !docker_or_skip("isolated_overlay") {
        return;
    }
    let images = images();
    let secret = |who: &str| format!("{who}-{:x}", std::process::id() ^ 0x5a5a_1234);
    let (service, operator, demo) = (secret("svc"), secret("op"), secret("demo"));
    let stack = Stack::up(
        "isolated",
        &images,
        &["deploy/compose.isolated.yml"],
        &["demo"],
        &[
            ("COORD_SERVICE_PASSWORD", &service),
            ("COORD_OPERATOR_PASSWORD", &operator),
            ("COORD_AGENTS_FILE", "./deploy/agents.demo.conf"),
            ("DEMO_AGENT_PASSWORD", &demo),
        ],
    );
    stack.wait_healthy(6, UP);
    let nats = connect(&stack.nats_url(), Some(("coord-operator", &operator))).await;
    let client = Client::new(nats.clone());
    let flows = submit(&client, 2).await;
    all_succeed(&stack, &client, &flows, Duration::from_secs(90)).await;

    let agent = stack.containers("demo-agent")[0].clone();
    // coordctl in the agent's container, logged in as the agent.
    let as_agent = |args: &[&str]| {
        Command::new("docker")
            .args([
                "exec",
                "-e",
                "NATS_INBOX_PREFIX=_INBOX_demo-agent",
                "-e",
                "COORD_REQUEST_TIMEOUT_MS=3000",
                &agent,
                "coordctl",
            ])
            .args(args)
            .output()
            .unwrap()
    };
    let own = as_agent(&[
        "state",
        "put",
        "demo-agent",
        "--revision",
        "0",
        r#"{"mine":1}"#,
    ]);
    assert!(
        own.status.success(),
        "the agent writes its own state: {}",
        String::from_utf8_lossy(&own.stderr)
    );
    let forged = as_agent(&[
        "state",
        "put",
        "other-agent",
        "--revision",
        "0",
        r#"{"forged":1}"#,
    ]);
    assert!(
        !forged.status.success(),
        "the agent wrote another agent's state: {}",
        String::from_utf8_lossy(&forged.stdout)
    );
    let listed = as_agent(&["flow", "list"]);
    assert!(
        !listed.status.success(),
        "the agent listed every flow: {}",
        String::from_utf8_lossy(&listed.stdout)
    );
    let mine = client
        .state_get(&common::AgentId::new("demo-agent").unwrap())
        .await
        .unwrap();
    assert_eq!(mine.doc, serde_json::json!({"mine": 1}));
    let theirs = client
        .state_get(&common::AgentId::new("other-agent").unwrap())
        .await;
    assert!(
        theirs
            .as_ref()
            .map_or(true, |d| d.doc.get("forged").is_none()),
        "{theirs:?}"
    );
}
