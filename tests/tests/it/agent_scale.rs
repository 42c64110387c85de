//! Many agents on one deployment: assignments need no JetStream consumer per
//! agent, so an agent past any per-stream consumer limit (1,000 by default in
//! nats-server 2.15) gets its work and the server's consumers do not grow
//! with the agents; and no task is placed on an agent that does not listen
//! for its assignments.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream;
use common::msg::{
    AgentReport, AllocateRequest, Assignment, FlowSpec, FlowState, Heartbeat, RegisterAgent,
    ReportKind, Requirements, TaskRef,
};
use common::{subject, AgentId, ErrorCode, FlowId, TaskId};
use futures::StreamExt;
use serde_json::json;
use testkit::{eventually, System};

use crate::orchestrator::{cpu_task, spawn_agent, wait_finished, wait_registered};

/// More agents than the server allows consumers on one stream by default.
const AGENTS: usize = 1_200;

/// The names of every consumer on every stream of the server.
async fn consumers(js: &jetstream::Context) -> Vec<String> {
    let mut names = Vec::new();
    let mut streams = js.stream_names();
    while let Some(stream) = streams.next().await {
        let stream = js.get_stream(stream.unwrap()).await.unwrap();
        let mut consumers = stream.consumer_names();
        while let Some(c) = consumers.next().await {
            names.push(c.unwrap());
        }
    }
    names
}

/// Reports `a` completed, as its agent would, once the report is stored.
async fn complete(js: &jetstream::Context, a: &Assignment) {
    let report = AgentReport {
        flow_id: a.flow_id.clone(),
        task_id: a.task_id.clone(),
        attempt: a.attempt,
        agent_id: a.agent_id.clone(),
        kind: ReportKind::Completed { output: json!(1) },
        at_ms: common::now_ms(),
    };
    js.publish(
        subject::report(&a.agent_id),
        serde_json::to_vec(&report).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

#[tokio::test]
async fn an_agent_past_a_thousand_agents_gets_work_without_a_consumer_of_its_own() {
    let sys = System::start().await;
    let js = jetstream::new(sys.nats.clone());
    // One connection listens for all of them, as a pool of agents may.
    let mut assignments = sys.nats.subscribe(subject::ASSIGN_ALL).await.unwrap();
    sys.nats.flush().await.unwrap();
    let registered: Vec<_> = futures::stream::iter(0..AGENTS)
        .map(|i| {
            let client = sys.client.clone();
            async move {
                client
                    .register_agent(&RegisterAgent {
                        agent_id: AgentId::new(format!("many{i}")).unwrap(),
                        capabilities: Vec::new(),
                        labels: [("n".to_string(), i.to_string())].into(),
                        capacity: [("cpu".to_string(), 1.0)].into(),
                        // Silence is not held against them in this test's time.
                        heartbeat_interval_ms: 600_000,
                    })
                    .await
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    assert!(
        registered.iter().all(Result::is_ok),
        "registrations refused"
    );

    // A task only the last agent may take.
    let last = AgentId::new(format!("many{}", AGENTS - 1)).unwrap();
    let id = FlowId::new("past-limit").unwrap();
    let mut task = cpu_task("t", &[]);
    task.requirements.labels = BTreeMap::from([("n".to_string(), (AGENTS - 1).to_string())]);
    let mut spec = FlowSpec::new("past-limit", vec![task]);
    spec.id = Some(id.clone());
    sys.client.create_flow(&spec).await.unwrap();
    let assignment = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let msg = assignments.next().await.unwrap();
            if let Ok(a) = serde_json::from_slice::<Assignment>(&msg.payload) {
                break a;
            }
        }
    })
    .await
    .expect("the task is assigned");
    assert_eq!(assignment.agent_id, last);
    complete(&js, &assignment).await;
    let status = wait_finished(&sys.client, &id, Duration::from_secs(30)).await;
    assert_eq!(status.state, FlowState::Succeeded, "{status:?}");

    // Tasks any of them may take: placed from a window of the pool.
    let open = FlowId::new("anywhere").unwrap();
    let mut spec = FlowSpec::new(
        "anywhere",
        (0..3).map(|i| cpu_task(&format!("t{i}"), &[])).collect(),
    );
    spec.id = Some(open.clone());
    sys.client.create_flow(&spec).await.unwrap();
    let mut done = std::collections::HashSet::new();
    while done.len() < 3 {
        let msg = tokio::time::timeout(Duration::from_secs(60), assignments.next())
            .await
            .expect("the open tasks are assigned")
            .unwrap();
        let Ok(a) = serde_json::from_slice::<Assignment>(&msg.payload) else {
            continue;
        };
        if a.flow_id != open || !done.insert(a.task_id.clone()) {
            continue;
        }
        complete(&js, &a).await;
    }
    let status = wait_finished(&sys.client, &open, Duration::from_secs(30)).await;
    assert_eq!(status.state, FlowState::Succeeded, "{status:?}");
    // No stream stores assignments, and no consumer was made for an agent.
    assert!(js.stream_by_subject(subject::assign(&last)).await.is_err());
    let all = consumers(&js).await;
    assert!(all.len() < 20, "{all:?}");
    assert!(!all.iter().any(|c| c.contains("many")), "{all:?}");
}

/// An agent registered and heartbeating but not listening on its assignment
/// subject gets no task: a flow runs on the agent that listens, and a task's
/// allocation that only it could take is refused, saying why, until it
/// listens.
#[tokio::test]
async fn a_placement_never_targets_an_agent_without_a_work_path() {
    let sys = System::start().await;
    let ghost = AgentId::new("ghost").unwrap();
    sys.client
        .register_agent(&RegisterAgent {
            agent_id: ghost.clone(),
            capabilities: vec!["gpu".into()],
            labels: Default::default(),
            capacity: [("cpu".to_string(), 100.0)].into(),
            heartbeat_interval_ms: 500,
        })
        .await
        .unwrap();
    // It stays alive for the whole test: silence would get it declared lost.
    let nats = sys.nats.clone();
    let beats = tokio::spawn({
        let ghost = ghost.clone();
        async move {
            loop {
                let beat = Heartbeat {
                    agent_id: ghost.clone(),
                    at_ms: common::now_ms(),
                    running: 0,
                };
                let body = serde_json::to_vec(&beat).unwrap();
                let _ = nats
                    .publish(common::subject::heartbeat(&ghost), body.into())
                    .await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });

    // A flow wider than the agent that can take work: every task runs there.
    let _agent = spawn_agent(
        &sys.nats,
        "real",
        1.0,
        |a| async move { Ok(json!(a.task_id)) },
    );
    wait_registered(&sys.client, "real").await;
    let id = FlowId::new("reachable").unwrap();
    let tasks = (0..4).map(|i| cpu_task(&format!("t{i}"), &[])).collect();
    let mut spec = FlowSpec::new("reachable", tasks);
    spec.id = Some(id.clone());
    sys.client.create_flow(&spec).await.unwrap();
    let status = wait_finished(&sys.client, &id, Duration::from_secs(30)).await;
    assert_eq!(status.state, FlowState::Succeeded, "{status:?}");
    for t in &status.tasks {
        assert_eq!(
            t.agent_id.as_ref().map(|a| a.as_str()),
            Some("real"),
            "{t:?}"
        );
    }

    // A task only the agent that does not listen could take.
    let ask = AllocateRequest {
        owner: "gpu-flow/t".into(),
        requirements: Requirements {
            resources: [("cpu".to_string(), 1.0)].into(),
            capabilities: vec!["gpu".into()],
            ..Default::default()
        },
        priority: 0,
        allocation_id: None,
        deadline_ms: None,
        task: Some(TaskRef {
            flow_id: FlowId::new("gpu-flow").unwrap(),
            task_id: TaskId::new("t").unwrap(),
        }),
        ttl_ms: None,
    };
    let refused = sys.client.allocate(&ask).await.unwrap_err();
    assert_eq!(refused.code, ErrorCode::NoCapacity, "{refused:?}");
    assert!(
        refused.message.contains("not listening") && refused.message.contains("ghost"),
        "{}",
        refused.message
    );

    // It listens now, as the agent would: it may be chosen.
    let listener = sys
        .nats
        .subscribe(common::subject::assign(&ghost))
        .await
        .unwrap();
    sys.nats.flush().await.unwrap();
    let placed = eventually(Duration::from_secs(10), "a placement on ghost", || {
        let (client, ask) = (sys.client.clone(), ask.clone());
        async move { client.allocate(&ask).await.ok() }
    })
    .await;
    assert_eq!(placed.agent_id, ghost);
    drop(listener);
    beats.abort();
}
