//! Work survives what kills it: a large random DAG run exactly once, a
//! replica killed mid-run, agents killed or lost mid-task, an assignment
//! recorded but never sent.

use super::*;

#[tokio::test]
async fn a_thousand_task_random_dag_runs_every_task_exactly_once() {
    let sys = System::start().await;
    let mut events = collect_events(&sys.nats).await;
    let agents: Vec<_> = (0..4)
        .map(|i| {
            spawn_agent(&sys.nats, &format!("w{i}"), 16.0, |a| async move {
                Ok(json!(a.task_id))
            })
        })
        .collect();
    for i in 0..4 {
        wait_registered(&sys.client, &format!("w{i}")).await;
    }
    let spec = random_dag(1_000, 7);
    let created = sys.client.create_flow(&spec).await.unwrap();
    let (client, flow) = (sys.client.clone(), created.flow_id.clone());
    let progress = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            if let Ok(s) = client.flow_status(&flow).await {
                eprintln!("progress {:.0}% {:?}", s.progress * 100.0, s.counts);
            }
        }
    });
    let done = wait_finished(&sys.client, &created.flow_id, Duration::from_secs(300)).await;
    progress.abort();
    assert_eq!(done.state, FlowState::Succeeded);
    assert!(
        done.tasks.iter().all(|t| t.attempt == 1),
        "no task needed a second attempt"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let successes = count_successes(&drain(&mut events), &created.flow_id);
    assert_eq!(successes.len(), 1_000);
    assert!(
        successes.values().all(|n| *n == 1),
        "a task succeeded twice"
    );
    for (stop, handle) in agents {
        let _ = stop.send(());
        handle.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn with_two_replicas_and_one_killed_every_task_completes_exactly_once() {
    let sys = System::start().await;
    let replica = Replica::start("orchestrator", sys.server.config());
    let mut events = collect_events(&sys.nats).await;
    let runs = Runs::default();
    let agents = runs.agents(&sys.nats, "r", 2, 8.0, Duration::from_millis(20));
    for i in 0..2 {
        wait_registered(&sys.client, &format!("r{i}")).await;
    }
    let flows: Vec<FlowId> = {
        let mut ids = Vec::new();
        for seed in 0..3 {
            ids.push(
                sys.client
                    .create_flow(&random_dag(100, seed))
                    .await
                    .unwrap()
                    .flow_id,
            );
        }
        ids
    };
    // Let both replicas get to work, then kill one mid-run.
    eventually(Duration::from_secs(20), "work under way", || async {
        let s = sys.client.flow_status(&flows[0]).await.ok()?;
        (s.progress > 0.2).then_some(())
    })
    .await;
    replica.kill();
    for f in &flows {
        let done = wait_finished(&sys.client, f, Duration::from_secs(90)).await;
        let failed: Vec<_> = done
            .tasks
            .iter()
            .filter(|t| t.state != TaskState::Succeeded)
            .collect();
        assert_eq!(done.state, FlowState::Succeeded, "flow {f}: {failed:?}");
    }
    // Each task ran once on an agent, and each success is one event (by id).
    runs.assert_each_once(300);
    // The killed replica's last events come from the outbox it left, once
    // the survivor finds them unpublished (seconds later).
    let mut all = Vec::new();
    let started = std::time::Instant::now();
    while !flows.iter().all(|f| count_successes(&all, f).len() == 100) {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "a success without its event"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        all.extend(drain(&mut events));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    all.extend(drain(&mut events));
    for f in &flows {
        let successes = count_successes(&all, f);
        assert!(
            successes.values().all(|n| *n == 1),
            "flow {f}: a task succeeded twice: {successes:?}"
        );
    }
    for (stop, handle) in agents {
        let _ = stop.send(());
        handle.await.unwrap().unwrap();
    }
}

/// The runtime's new run hands back what the killed one held (a leave before
/// it registers): the task runs again at once, as attempt 2, rather than
/// waiting for a lease it has none of.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_task_and_restarted_runs_the_attempt_again_at_once() {
    let sys = System::start().await;
    let start = |hang: bool| {
        let cfg = sys.server.config();
        Isolated::spawn(async move {
            let nats = common::nats::connect(&cfg, "agent-phoenix").await.unwrap();
            let mut opts = AgentOptions::new(AgentId::new("phoenix").unwrap()).capacity("cpu", 1.0);
            opts.heartbeat_interval = Duration::from_secs(1);
            opts.concurrency = 1;
            let handler = move |_| async move {
                if hang {
                    std::future::pending::<()>().await;
                }
                Ok(json!("done"))
            };
            agent::run(nats, opts, handler, std::future::pending::<()>())
                .await
                .unwrap();
        })
    };
    let first = start(true);
    wait_registered(&sys.client, "phoenix").await;
    let created = sys
        .client
        .create_flow(&FlowSpec::new("phoenix", vec![cpu_task("t", &[])]))
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "the task running", || async {
        let s = sys.client.flow_status(&created.flow_id).await.ok()?;
        (s.tasks[0].state == TaskState::Running).then_some(())
    })
    .await;
    first.kill();
    // Back within the heartbeat-loss window: not lost, so only the hand-back
    // frees the attempt.
    let _second = start(false);
    let done = wait_finished(&sys.client, &created.flow_id, Duration::from_secs(20)).await;
    assert_eq!(done.state, FlowState::Succeeded);
    assert_eq!(
        (done.tasks[0].attempt, done.tasks[0].output.clone()),
        (2, json!("done"))
    );
}

#[tokio::test]
async fn a_lost_agents_task_is_requeued_to_another_agent() {
    let sys = System::start().await;
    let js = jetstream::new(sys.nats.clone());
    let ghost = AgentId::new("ghost").unwrap();
    let mut rejected = sys
        .nats
        .subscribe(subject::event::REPORT_REJECTED)
        .await
        .unwrap();
    // "ghost" registers with a short heartbeat interval, takes the task, says it
    // started, and never heartbeats: the allocator declares it lost.
    sys.client
        .register_agent(&RegisterAgent {
            agent_id: ghost.clone(),
            capabilities: vec!["ghostly".into()],
            labels: Default::default(),
            capacity: [("cpu".to_string(), 1.0)].into(),
            heartbeat_interval_ms: 300,
        })
        .await
        .unwrap();
    let consumer = assignment_consumer(&js, &ghost).await;
    let mut t = cpu_task("t", &[]);
    t.retry = RetryPolicy {
        max_attempts: 2,
        backoff_base_ms: 10,
        ..Default::default()
    };
    let created = sys
        .client
        .create_flow(&FlowSpec::new("lost", vec![t]))
        .await
        .unwrap();
    take_assignment(&consumer).await;
    let started = json!({"flow_id": created.flow_id, "task_id": "t", "attempt": 1, "agent_id": ghost, "type": "started"});
    js.publish(subject::report(&ghost), started.to_string().into())
        .await
        .unwrap()
        .await
        .unwrap();
    // A live agent joins; once the ghost is declared lost, the task moves to it.
    let (stop, agent) = spawn_agent(
        &sys.nats,
        "alive",
        1.0,
        |a| async move { Ok(json!(a.attempt)) },
    );
    let done = wait_finished(&sys.client, &created.flow_id, Duration::from_secs(20)).await;
    assert_eq!(done.state, FlowState::Succeeded);
    assert_eq!(done.tasks[0].attempt, 2);
    assert_eq!(
        done.tasks[0].agent_id.as_ref().map(AgentId::as_str),
        Some("alive")
    );
    let late = json!({"flow_id": created.flow_id, "task_id": "t", "attempt": 1, "agent_id": ghost, "type": "completed"});
    js.publish(subject::report(&ghost), late.to_string().into())
        .await
        .unwrap()
        .await
        .unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(5), rejected.next())
        .await
        .unwrap()
        .unwrap();
    let event: Event = serde_json::from_slice(&msg.payload).unwrap();
    assert!(
        matches!(event.kind, EventKind::ReportRejected { attempt: 1, .. }),
        "{event:?}"
    );
    let _ = stop.send(());
    agent.await.unwrap().unwrap();
}

#[tokio::test]
async fn an_assignment_recorded_but_never_sent_is_delivered_by_the_sweep() {
    let sys = System::start().await;
    let (stop, agent) = spawn_agent(&sys.nats, "x", 1.0, |a| async move { Ok(json!(a.attempt)) });
    wait_registered(&sys.client, "x").await;
    // As if a replica booked the task, wrote `assigned`, and died before publishing.
    let allocation = sys
        .client
        .allocate(&common::msg::AllocateRequest {
            owner: "stranded/a".into(),
            requirements: cpu_task("a", &[]).requirements,
            priority: 0,
            allocation_id: None,
            deadline_ms: None,
            task: None,
            ttl_ms: None,
        })
        .await
        .unwrap();
    let id = FlowId::new("stranded").unwrap();
    let now = common::now_ms();
    let (mut flow, _) = orchestrator::machine::Flow::new(
        id.clone(),
        FlowSpec::new("stranded", vec![cpu_task("a", &[])]),
        now - 5_000,
    );
    flow.assign(
        &tid("a"),
        &allocation.agent_id,
        &allocation.allocation_id,
        now - 3_000,
    )
    .unwrap();
    let kv = jetstream::new(sys.nats.clone())
        .get_key_value(common::nats::KV_FLOWS)
        .await
        .unwrap();
    kv.put(id.as_str(), serde_json::to_vec(&flow).unwrap().into())
        .await
        .unwrap();

    let done = wait_finished(&sys.client, &id, Duration::from_secs(15)).await;
    assert_eq!(done.state, FlowState::Succeeded);
    assert_eq!(done.tasks[0].attempt, 1, "delivered, not retried");
    let _ = stop.send(());
    agent.await.unwrap().unwrap();
}
