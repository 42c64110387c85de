//! Operators' requests on running flows: modify, re-run, explain,
//! optimise, concurrency keys and the slots they hold.

use super::*;

#[tokio::test]
async fn a_running_flow_is_modified_re_run_explained_and_watched() {
    let sys = System::start().await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    // Tasks of kind "held" wait for the test to let them go.
    let (stop, agent) = spawn_agent(&sys.nats, "m", 4.0, move |a| {
        let g = g.clone();
        async move {
            if a.kind == "held" {
                g.acquire()
                    .await
                    .map_err(|e| TaskFailure::from(e.to_string()))?
                    .forget();
            }
            Ok(json!({"task": a.task_id, "input": a.input}))
        }
    });
    wait_registered(&sys.client, "m").await;
    let mut held = cpu_task("b", &["a"]);
    held.kind = "held".into();
    let spec = FlowSpec::new(
        "modifiable",
        vec![cpu_task("a", &[]), held, cpu_task("c", &["b"])],
    );
    let created = sys.client.create_flow(&spec).await.unwrap();
    let mut watch = sys
        .nats
        .subscribe(subject::flow_watch(&created.flow_id))
        .await
        .unwrap();
    // `b` itself running (not `a` a moment before it finishes).
    let status = eventually(Duration::from_secs(10), "b running", || async {
        let s = sys.client.flow_status(&created.flow_id).await.ok()?;
        let b = s.tasks.iter().find(|t| t.task_id == tid("b"))?;
        (b.state == TaskState::Running).then_some(s)
    })
    .await;

    // Explain: c waits on b, which runs on m.
    let why = sys
        .client
        .explain_flow(&common::msg::ExplainRequest {
            flow_id: created.flow_id.clone(),
            task_id: None,
        })
        .await
        .unwrap();
    let reasons = |id: &str| {
        why.tasks
            .iter()
            .find(|t| t.task_id == tid(id))
            .unwrap()
            .reasons
            .join(" | ")
    };
    assert!(
        reasons("c").contains("waiting on dependency b (running)"),
        "{why:?}"
    );
    assert!(reasons("b").contains("running on agent m"), "{why:?}");

    // Modify: add d after the finished a, remove the pending c — against the revision read.
    let mut d = cpu_task("d", &["a"]);
    d.input = json!("new");
    let changes = common::msg::FlowChanges {
        flow_id: created.flow_id.clone(),
        expected_revision: status.revision,
        add: vec![d],
        add_dependencies: vec![],
        remove: vec![tid("c")],
        priorities: Default::default(),
        inputs: Default::default(),
    };
    let stale = common::msg::FlowChanges {
        expected_revision: status.revision - 1,
        ..changes.clone()
    };
    let err = sys.client.modify_flow(&stale).await.unwrap_err();
    assert_eq!(err.code, common::ErrorCode::Conflict, "{err:?}");
    let modified = sys.client.modify_flow(&changes).await.unwrap();
    assert!(modified.tasks.iter().all(|t| t.task_id != tid("c")));
    assert!(modified.revision > status.revision);
    // Like any client: read the revision, change, and start over on `conflict`.
    let err = loop {
        let now = sys.client.flow_status(&created.flow_id).await.unwrap();
        let bad = common::msg::FlowChanges {
            expected_revision: now.revision,
            remove: vec![tid("b")],
            add: vec![],
            ..changes.clone()
        };
        let err = sys.client.modify_flow(&bad).await.unwrap_err();
        if err.code != common::ErrorCode::Conflict {
            break err;
        }
    };
    assert_eq!(
        err.code,
        common::ErrorCode::ValidationFailed,
        "b is running: {err:?}"
    );
    assert_eq!(err.details["problems"][0]["code"], "task_started");

    gate.add_permits(10);
    let done = wait_finished(&sys.client, &created.flow_id, Duration::from_secs(20)).await;
    assert_eq!(done.state, FlowState::Succeeded);
    let d = done.tasks.iter().find(|t| t.task_id == tid("d")).unwrap();
    assert_eq!(d.output["input"], json!("new"));

    // Re-run from a: everything downstream runs again, with fresh attempts.
    let rerun = sys
        .client
        .rerun_task(&common::msg::RerunRequest {
            flow_id: created.flow_id.clone(),
            task_id: tid("a"),
        })
        .await
        .unwrap();
    assert_eq!(rerun.state, FlowState::Running);
    let again = wait_finished(&sys.client, &created.flow_id, Duration::from_secs(20)).await;
    assert_eq!(again.state, FlowState::Succeeded);
    assert!(
        again.tasks.iter().all(|t| t.attempt == 2),
        "{:?}",
        again.tasks
    );

    // Watchers saw the flow change, ending with it finished.
    let mut last = None;
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(300), watch.next()).await {
        last = Some(serde_json::from_slice::<FlowStatus>(&msg.payload).unwrap());
    }
    assert_eq!(last.expect("watch updates").state, FlowState::Succeeded);
    let _ = stop.send(());
    agent.await.unwrap().unwrap();
}

#[tokio::test]
async fn explain_says_what_the_allocator_lacks() {
    let sys = System::start().await;
    let (stop, agent) = spawn_agent(&sys.nats, "small", 1.0, |_| async { Ok(json!(null)) });
    wait_registered(&sys.client, "small").await;
    let mut big = cpu_task("big", &[]);
    big.requirements.resources.insert("cpu".into(), 8.0);
    let mut gpu = cpu_task("gpu", &[]);
    gpu.requirements.capabilities.push("cuda".into());
    let created = sys
        .client
        .create_flow(&FlowSpec::new("stuck", vec![big, gpu]))
        .await
        .unwrap();
    let why = sys
        .client
        .explain_flow(&common::msg::ExplainRequest {
            flow_id: created.flow_id.clone(),
            task_id: None,
        })
        .await
        .unwrap();
    let reasons = |id: &str| {
        why.tasks
            .iter()
            .find(|t| t.task_id == tid(id))
            .unwrap()
            .reasons
            .join(" | ")
    };
    assert!(
        reasons("big").contains("cpu is short"),
        "{}",
        reasons("big")
    );
    assert!(
        reasons("gpu").contains(
            "no agent can take it now: no agent takes these requirements: 1 lacks capability cuda"
        ),
        "{}",
        reasons("gpu")
    );
    let _ = stop.send(());
    agent.await.unwrap().unwrap();
}

#[tokio::test]
async fn explain_does_not_say_fits_now_while_the_concurrency_key_is_full() {
    let sys = System::start().await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let (stop, agent) = spawn_agent(&sys.nats, "w", 2.0, move |_| {
        let g = g.clone();
        async move {
            let _ = g.acquire().await;
            Ok(json!(null))
        }
    });
    wait_registered(&sys.client, "w").await;
    let limited = |id: &str| {
        let mut t = cpu_task(id, &[]);
        t.concurrency = Some(common::msg::ConcurrencyLimit {
            key: "k".into(),
            limit: 1,
        });
        t
    };
    let created = sys
        .client
        .create_flow(&FlowSpec::new(
            "one-at-a-time",
            vec![limited("one"), limited("two")],
        ))
        .await
        .unwrap();
    // One holds the key's only slot and runs until the gate opens; the
    // other is ready, and the agent has room for it.
    let waiting = eventually(
        Duration::from_secs(10),
        "one running, one ready",
        || async {
            let s = sys.client.flow_status(&created.flow_id).await.ok()?;
            let running = s.tasks.iter().any(|t| t.state == TaskState::Running);
            let ready = s.tasks.iter().find(|t| t.state == TaskState::Ready)?;
            running.then(|| ready.task_id.clone())
        },
    )
    .await;
    let why = sys
        .client
        .explain_flow(&common::msg::ExplainRequest {
            flow_id: created.flow_id.clone(),
            task_id: Some(waiting),
        })
        .await
        .unwrap();
    let reasons = why.tasks[0].reasons.join(" | ");
    assert!(
        reasons.contains("concurrency key k is at its limit"),
        "{reasons}"
    );
    assert!(!reasons.contains("fits now"), "{reasons}");
    assert!(
        reasons.contains("once a slot frees it fits on w"),
        "{reasons}"
    );
    gate.add_permits(2);
    let done = wait_finished(&sys.client, &created.flow_id, Duration::from_secs(20)).await;
    assert_eq!(done.state, FlowState::Succeeded);
    let _ = stop.send(());
    agent.await.unwrap().unwrap();
}

#[tokio::test]
async fn requirements_no_agent_can_meet_are_reported_at_creation() {
    let sys = System::start().await;
    let (stop, agent) = spawn_agent(&sys.nats, "cpu2", 2.0, |_| async { Ok(json!(null)) });
    wait_registered(&sys.client, "cpu2").await;
    let mut huge = cpu_task("huge", &[]);
    huge.requirements.resources.insert("cpu".into(), 64.0);
    let mut exotic = cpu_task("exotic", &[]);
    exotic.requirements.capabilities.push("quantum".into());
    let spec = FlowSpec::new("infeasible", vec![huge, exotic, cpu_task("fine", &[])]);
    let created = sys.client.create_flow(&spec).await.unwrap();
    let codes: Vec<_> = created
        .warnings
        .iter()
        .map(|w| (w.code.as_str(), w.task_id.clone().unwrap()))
        .collect();
    assert_eq!(
        codes,
        [
            ("infeasible_requirements", tid("huge")),
            ("infeasible_requirements", tid("exotic"))
        ]
    );
    let status = sys.client.flow_status(&created.flow_id).await.unwrap();
    assert_eq!(status.warnings.len(), 2, "status keeps saying so");
    let strict = FlowSpec {
        require_feasible: true,
        ..spec
    };
    let err = sys.client.create_flow(&strict).await.unwrap_err();
    assert_eq!(err.code, common::ErrorCode::ValidationFailed);
    assert_eq!(err.details["problems"].as_array().unwrap().len(), 2);
    let _ = stop.send(());
    agent.await.unwrap().unwrap();
}

/// With no allocator to ask, a flow that must be feasible is refused as
/// `unavailable` (retry later) rather than taken on trust; as advice the
/// same flow is created, with no warning (nothing is known).
#[tokio::test]
async fn a_flow_that_must_be_feasible_waits_for_an_allocator_to_say_so() {
    let server = testkit::NatsServer::start();
    let _orchestrator = testkit::start_service("orchestrator", server.config());
    let nats = server.connect().await;
    let client = common::Client::new(nats.clone()).with_timeout(Duration::from_secs(10));
    testkit::wait_for_service(&nats, "orchestrator").await;
    let strict = FlowSpec {
        require_feasible: true,
        ..FlowSpec::new("strict", vec![cpu_task("a", &[])])
    };
    let err = client.create_flow(&strict).await.unwrap_err();
    assert_eq!(err.code, common::ErrorCode::Unavailable, "{err}");
    let advised = FlowSpec::new("advised", vec![cpu_task("a", &[])]);
    let created = client.create_flow(&advised).await.unwrap();
    assert!(created.warnings.is_empty(), "{:?}", created.warnings);
}

/// Registers an agent by hand that listens for assignments (so it may be
/// given work, while the subscription returned lives) but never starts one:
/// what it is given stays assigned, and its capacity stays booked.
async fn register_idle_agent(
    sys: &System,
    id: &str,
    capacity: &[(&str, f64)],
) -> async_nats::Subscriber {
    let agent = AgentId::new(id).unwrap();
    sys.client
        .register_agent(&RegisterAgent {
            agent_id: agent.clone(),
            capabilities: Vec::new(),
            labels: BTreeMap::new(),
            capacity: capacity.iter().map(|(r, v)| (r.to_string(), *v)).collect(),
            heartbeat_interval_ms: 60_000,
        })
        .await
        .unwrap();
    let listens = sys.nats.subscribe(subject::assign(&agent)).await.unwrap();
    sys.nats.flush().await.unwrap();
    listens
}

#[tokio::test]
async fn optimize_plans_the_remaining_work_and_applies_critical_path_priorities() {
    let sys = System::start().await;
    // A gate task holds every other task back; its agent never starts it, so
    // the plan sees the same flow from one call to the next.
    let _gatekeeper = register_idle_agent(&sys, "gatekeeper", &[("gate", 1.0)]).await;
    let _worker = register_idle_agent(&sys, "worker", &[("cpu", 2.0)]).await;
    let mut gate = TaskSpec::new(tid("gate"));
    gate.requirements.resources.insert("gate".into(), 1.0);
    gate.estimated_duration_ms = Some(1);
    let mut tasks = vec![gate];
    for (id, deps, priority) in [
        ("s1", vec!["gate"], 5),
        ("s2", vec!["gate"], 5),
        ("s3", vec!["gate"], 5),
        ("c1", vec!["gate"], 0),
        ("c2", vec!["c1"], 0),
        ("c3", vec!["c2"], 0),
    ] {
        let mut t = cpu_task(id, &deps);
        t.priority = priority;
        t.estimated_duration_ms = Some(100);
        tasks.push(t);
    }
    let mut unrunnable = cpu_task("gpu", &["gate"]);
    unrunnable.requirements.capabilities.push("cuda".into());
    unrunnable.estimated_duration_ms = Some(100);
    tasks.push(unrunnable);
    let created = sys
        .client
        .create_flow(&FlowSpec::new("plan", tasks))
        .await
        .unwrap();
    let flow = created.flow_id.clone();
    eventually(Duration::from_secs(10), "gate assigned", || async {
        let s = sys.client.flow_status(&flow).await.ok()?;
        s.tasks
            .iter()
            .any(|t| t.task_id == tid("gate") && t.state == TaskState::Assigned)
            .then_some(())
    })
    .await;

    let ask = |apply| common::msg::FlowOptimizeRequest {
        flow_id: flow.clone(),
        apply,
    };
    let plan = sys.client.optimize_flow(&ask(false)).await.unwrap();
    assert!(!plan.applied && plan.status.is_none());
    let path: Vec<&str> = plan.critical_path.iter().map(|t| t.as_str()).collect();
    assert_eq!(path, ["gate", "c1", "c2", "c3"]);
    assert_eq!(plan.critical_path_ms, 301);
    assert_eq!(plan.makespan_ms, 401, "{plan:?}");
    assert_eq!(plan.optimized_makespan_ms, 301, "{plan:?}");
    assert_eq!(plan.bottleneck.kind, "critical_path");
    assert!(plan
        .placements
        .iter()
        .all(|p| p.agent_id.as_str() == "worker"));
    let stuck: Vec<&str> = plan
        .unplaceable
        .iter()
        .map(|u| u.task_id.as_str())
        .collect();
    assert_eq!(stuck, ["gpu"]);
    // Planning alone changes nothing.
    let spec = sys.client.flow_get(&flow).await.unwrap();
    assert!(spec
        .tasks
        .iter()
        .any(|t| t.id == tid("s1") && t.priority == 5));

    let applied = sys.client.optimize_flow(&ask(true)).await.unwrap();
    assert!(applied.applied);
    assert!(applied.status.is_some());
    let spec = sys.client.flow_get(&flow).await.unwrap();
    let priority = |id: &str| {
        spec.tasks
            .iter()
            .find(|t| t.id == tid(id))
            .unwrap()
            .priority
    };
    assert!(priority("c1") > priority("s1"), "{spec:?}");
    assert!(priority("c2") > priority("s1"), "{spec:?}");
    // Now the order is the plan's: nothing more to change.
    let again = sys.client.optimize_flow(&ask(false)).await.unwrap();
    assert!(again.priority_changes.is_empty(), "{again:?}");
    assert_eq!(again.makespan_ms, 301);

    let missing = sys
        .client
        .optimize_flow(&common::msg::FlowOptimizeRequest {
            flow_id: FlowId::new("no-such-flow").unwrap(),
            apply: false,
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code, common::ErrorCode::NotFound);
}

fn limited(id: &str, key: &str, limit: u32) -> TaskSpec {
    let mut t = cpu_task(id, &[]);
    t.concurrency = Some(common::msg::ConcurrencyLimit {
        key: key.into(),
        limit,
    });
    t
}

#[tokio::test]
async fn a_concurrency_key_caps_running_tasks_across_flows() {
    let sys = System::start().await;
    let running = Arc::new(AtomicU32::new(0));
    let peak = Arc::new(AtomicU32::new(0));
    let (r, p) = (running.clone(), peak.clone());
    let (stop, agent) = spawn_agent(&sys.nats, "wide", 8.0, move |_| {
        let (r, p) = (r.clone(), p.clone());
        async move {
            let now = r.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(300)).await;
            r.fetch_sub(1, Ordering::SeqCst);
            Ok(json!(null))
        }
    });
    wait_registered(&sys.client, "wide").await;
    let mut flows = Vec::new();
    for f in 0..2 {
        let tasks = (0..4)
            .map(|i| limited(&format!("t{i}"), "api", 2))
            .collect();
        let created = sys
            .client
            .create_flow(&FlowSpec::new(format!("limited-{f}"), tasks))
            .await
            .unwrap();
        flows.push(created.flow_id);
    }
    // While the key is full, explain says so for the tasks left waiting.
    let why = eventually(
        Duration::from_secs(10),
        "a task waiting on the key",
        || async {
            for f in &flows {
                let why = sys
                    .client
                    .explain_flow(&common::msg::ExplainRequest {
                        flow_id: f.clone(),
                        task_id: None,
                    })
                    .await
                    .ok()?;
                let text: Vec<String> = why.tasks.iter().flat_map(|t| t.reasons.clone()).collect();
                if let Some(r) = text.iter().find(|r| r.contains("concurrency key api")) {
                    return Some(r.clone());
                }
            }
            None
        },
    )
    .await;
    assert!(why.contains("2 of 2 slots held"), "{why}");
    for f in &flows {
        let done = wait_finished(&sys.client, f, Duration::from_secs(60)).await;
        assert_eq!(done.state, FlowState::Succeeded);
    }
    assert_eq!(peak.load(Ordering::SeqCst), 2, "two at a time, never more");
    // Every slot is given back: by the step after each attempt ended, in a
    // task of its own, so possibly just after the flow reads as finished.
    let kv = jetstream::new(sys.nats.clone())
        .get_key_value(common::nats::KV_CONCURRENCY)
        .await
        .unwrap();
    testkit::eventually(Duration::from_secs(10), "every api slot given back", || {
        let kv = kv.clone();
        async move {
            let entry = kv.get("api").await.unwrap().unwrap();
            let slots: serde_json::Value = serde_json::from_slice(&entry).unwrap();
            (slots["holders"] == json!({})).then_some(())
        }
    })
    .await;

    // A bad key or a zero limit is refused at creation.
    let bad = sys
        .client
        .create_flow(&FlowSpec::new(
            "bad",
            vec![limited("x", "no.dots", 1), limited("y", "ok", 0)],
        ))
        .await
        .unwrap_err();
    assert_eq!(bad.code, common::ErrorCode::ValidationFailed);
    let problems = bad.details["problems"].as_array().unwrap().len();
    assert_eq!(problems, 2);
    let _ = stop.send(());
    agent.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_slot_left_behind_by_a_dead_replica_is_freed_by_the_sweep() {
    let sys = System::start().await;
    // A holder from long ago whose attempt does not exist: what a replica that
    // died between taking a slot and placing the task leaves behind.
    let kv = jetstream::new(sys.nats.clone())
        .get_key_value(common::nats::KV_CONCURRENCY)
        .await
        .unwrap();
    kv.put("solo", r#"{"holders":{"gone.t.1":0}}"#.into())
        .await
        .unwrap();
    let (stop, agent) = spawn_agent(&sys.nats, "one", 1.0, |_| async { Ok(json!(null)) });
    wait_registered(&sys.client, "one").await;
    let created = sys
        .client
        .create_flow(&FlowSpec::new("solo", vec![limited("only", "solo", 1)]))
        .await
        .unwrap();
    let done = wait_finished(&sys.client, &created.flow_id, Duration::from_secs(40)).await;
    assert_eq!(done.state, FlowState::Succeeded);
    let _ = stop.send(());
    agent.await.unwrap().unwrap();
}
