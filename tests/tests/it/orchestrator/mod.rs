//! Orchestrator behaviour against a real nats-server: retries with back-off,
//! timed-out attempts moving to another agent with the late report fenced off,
//! pause / resume, cancel releasing everything, a 1,000-task random DAG run
//! exactly once, and two replicas with one killed mid-run.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use common::msg::{
    Event, EventKind, FlowSpec, FlowState, FlowStatus, RegisterAgent, Requirements, RetryPolicy,
    TaskSpec, TaskState,
};
use common::{subject, AgentId, Client, FlowId, TaskId};
use coordkit::agent::{self, AgentOptions, TaskFailure};
use futures::StreamExt;
use serde_json::json;
use testkit::{eventually, Isolated, Replica, System};
use tokio::sync::oneshot;

pub(crate) fn tid(s: &str) -> TaskId {
    TaskId::new(s).unwrap()
}

pub(crate) fn cpu_task(id: &str, deps: &[&str]) -> TaskSpec {
    let mut t = TaskSpec::new(tid(id));
    t.kind = "work".into();
    t.requirements = Requirements {
        resources: [("cpu".to_string(), 1.0)].into(),
        ..Default::default()
    };
    t.depends_on = deps.iter().map(|d| tid(d)).collect();
    t
}

/// Runs an agent with `cpu` capacity until the returned sender fires.
pub(crate) fn spawn_agent<H, Fut>(
    nats: &async_nats::Client,
    id: &str,
    cpu: f64,
    handler: H,
) -> (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), common::Error>>,
)
where
    H: Fn(common::msg::Assignment) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<serde_json::Value, TaskFailure>> + Send + 'static,
{
    let mut opts = AgentOptions::new(AgentId::new(id).unwrap()).capacity("cpu", cpu);
    opts.heartbeat_interval = Duration::from_millis(500);
    opts.concurrency = cpu.max(1.0) as usize;
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(agent::run(nats.clone(), opts, handler, async {
        let _ = stopped.await;
    }));
    (stop, handle)
}

/// A running agent: fire the sender to stop it.
pub(crate) type AgentHandle = (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), common::Error>>,
);

/// Every run of a handler, by (flow, task): the agents' side of "exactly once".
#[derive(Clone, Default)]
pub(crate) struct Runs(Arc<Mutex<BTreeMap<(String, String), usize>>>);

impl Runs {
    /// Counts one run of the assignment's task.
    pub(crate) fn count(&self, a: &common::msg::Assignment) {
        *self
            .0
            .lock()
            .unwrap()
            .entry((a.flow_id.to_string(), a.task_id.to_string()))
            .or_insert(0) += 1;
    }

    /// Agents `{prefix}0`… that count each run, wait `work`, and succeed.
    pub(crate) fn agents(
        &self,
        nats: &async_nats::Client,
        prefix: &str,
        count: usize,
        cpu: f64,
        work: Duration,
    ) -> Vec<AgentHandle> {
        (0..count)
            .map(|i| {
                let runs = self.clone();
                spawn_agent(nats, &format!("{prefix}{i}"), cpu, move |a| {
                    let runs = runs.clone();
                    async move {
                        tokio::time::sleep(work).await;
                        runs.count(&a);
                        Ok(json!(a.task_id))
                    }
                })
            })
            .collect()
    }

    /// Each of `tasks` tasks ran, and none twice.
    pub(crate) fn assert_each_once(&self, tasks: usize) {
        let runs = self.0.lock().unwrap().clone();
        assert_eq!(runs.len(), tasks, "tasks run");
        let twice: Vec<_> = runs.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "tasks run more than once: {twice:?}");
    }
}

/// A hand-written agent's assignments: its subscription, and the attempts
/// already taken (an assignment is sent again until it starts).
pub(crate) struct Assignments(tokio::sync::Mutex<(async_nats::Subscriber, Taken)>);

/// The attempts a hand-written agent took: flow, task, attempt.
type Taken = std::collections::HashSet<(String, String, u32)>;

/// Listens on `agent`'s assignment subject, as a hand-written agent does.
pub(crate) async fn assignment_consumer(js: &jetstream::Context, agent: &AgentId) -> Assignments {
    let nats = js.client();
    let sub = nats.subscribe(subject::assign(agent)).await.unwrap();
    nats.flush().await.unwrap();
    Assignments(tokio::sync::Mutex::new((sub, Default::default())))
}

/// Takes the next assignment not taken before, as an agent that then goes
/// its own way (probes and repeats are skipped).
pub(crate) async fn take_assignment(assignments: &Assignments) -> common::msg::Assignment {
    let mut guard = assignments.0.lock().await;
    let (sub, seen) = &mut *guard;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), sub.next())
            .await
            .expect("an assignment within 30 s")
            .expect("the subscription is open");
        let Ok(a) = serde_json::from_slice::<common::msg::Assignment>(&msg.payload) else {
            continue;
        };
        if seen.insert((a.flow_id.to_string(), a.task_id.to_string(), a.attempt)) {
            return a;
        }
    }
}

pub(crate) async fn wait_finished(client: &Client, flow: &FlowId, within: Duration) -> FlowStatus {
    eventually(within, "flow to finish", || async {
        let s = client.flow_status(flow).await.ok()?;
        s.state.is_terminal().then_some(s)
    })
    .await
}

pub(crate) async fn wait_registered(client: &Client, agent: &str) {
    let id = AgentId::new(agent).unwrap();
    eventually(Duration::from_secs(10), "agent registered", || async {
        client
            .capacity(&Default::default())
            .await
            .ok()?
            .agents
            .contains_key(&id)
            .then_some(())
    })
    .await;
}

/// Registers a bare `w1` with `cpu` (no runtime: the test is the agent)
/// and returns its assignments, subscribed before it registers.
pub(crate) async fn bare_agent(sys: &System, cpu: f64) -> async_nats::Subscriber {
    let w1 = AgentId::new("w1").unwrap();
    let assignments = sys.nats.subscribe(subject::assign(&w1)).await.unwrap();
    sys.nats.flush().await.unwrap();
    sys.client
        .register_agent(&RegisterAgent {
            agent_id: w1,
            capabilities: Vec::new(),
            labels: Default::default(),
            capacity: [("cpu".to_string(), cpu)].into(),
            heartbeat_interval_ms: 600_000,
        })
        .await
        .unwrap();
    assignments
}

/// The next assignment on `assignments` (a cancel notice is skipped).
pub(crate) async fn next_assignment(
    assignments: &mut async_nats::Subscriber,
) -> common::msg::Assignment {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), assignments.next())
            .await
            .expect("an assignment")
            .unwrap();
        if let Ok(a) = serde_json::from_slice(&msg.payload) {
            return a;
        }
    }
}

#[tokio::test]
async fn a_flaky_task_is_retried_after_back_off_and_succeeds() {
    let sys = System::start().await;
    let mut events = sys
        .nats
        .subscribe(subject::event::TASK_READY)
        .await
        .unwrap();
    let (stop, agent) = spawn_agent(&sys.nats, "flaky", 1.0, |a| async move {
        if a.attempt == 1 {
            Err(TaskFailure {
                error: "flaky upstream".into(),
                retryable: true,
            })
        } else {
            Ok(json!({"attempt": a.attempt}))
        }
    });
    wait_registered(&sys.client, "flaky").await;
    let mut t = cpu_task("a", &[]);
    t.retry = RetryPolicy {
        max_attempts: 3,
        backoff_base_ms: 300,
        ..Default::default()
    };
    let created = sys
        .client
        .create_flow(&FlowSpec::new("retry", vec![t]))
        .await
        .unwrap();
    let done = wait_finished(&sys.client, &created.flow_id, Duration::from_secs(20)).await;
    assert_eq!(done.state, FlowState::Succeeded);
    let a = &done.tasks[0];
    assert_eq!((a.attempt, a.output.clone()), (2, json!({"attempt": 2})));
    assert_eq!(done.failures, 1);

    // The retry went through ready again, with the reason and the back-off.
    let mut retried = None;
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(2), events.next()).await {
        let e: Event = serde_json::from_slice(&msg.payload).unwrap();
        if let EventKind::TaskTransition {
            from: TaskState::Running,
            reason,
            ..
        } = e.kind
        {
            retried = reason;
            break;
        }
    }
    let reason = retried.expect("a running -> ready transition");
    assert!(
        reason.contains("flaky upstream") && reason.contains("attempt 2 in 300 ms"),
        "{reason}"
    );
    let _ = stop.send(());
    agent.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_timed_out_attempt_moves_to_another_agent_and_the_late_report_is_rejected() {
    let sys = System::start().await;
    let js = jetstream::new(sys.nats.clone());
    let slow = AgentId::new("slow").unwrap();
    let mut rejected = sys
        .nats
        .subscribe(subject::event::REPORT_REJECTED)
        .await
        .unwrap();
    let mut cancels = sys.nats.subscribe(subject::cancel(&slow)).await.unwrap();

    // "slow" is a hand-written agent: it takes the task, says it started, and goes quiet.
    let register = |cpu: f64| RegisterAgent {
        agent_id: slow.clone(),
        capabilities: vec![],
        labels: Default::default(),
        capacity: [("cpu".to_string(), cpu)].into(),
        heartbeat_interval_ms: 60_000,
    };
    sys.client.register_agent(&register(1.0)).await.unwrap();
    let consumer = assignment_consumer(&js, &slow).await;
    let mut t = cpu_task("t", &[]);
    t.timeouts.start_to_close_ms = Some(600);
    t.retry = RetryPolicy {
        max_attempts: 2,
        backoff_base_ms: 10,
        ..Default::default()
    };
    let created = sys
        .client
        .create_flow(&FlowSpec::new("timeout", vec![t]))
        .await
        .unwrap();

    let assignment = take_assignment(&consumer).await;
    assert_eq!((assignment.attempt, &assignment.agent_id), (1, &slow));
    let report = |kind: serde_json::Value| {
        let mut r =
            json!({"flow_id": created.flow_id, "task_id": "t", "attempt": 1, "agent_id": slow});
        r.as_object_mut()
            .unwrap()
            .extend(kind.as_object().unwrap().clone());
        r.to_string()
    };
    js.publish(
        subject::report(&slow),
        report(json!({"type": "started"})).into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    // The slow agent withdraws its capacity; a healthy one joins.
    sys.client.register_agent(&register(0.0)).await.unwrap();
    let (stop, agent) = spawn_agent(&sys.nats, "healthy", 1.0, |a| async move {
        Ok(json!(a.attempt))
    });

    let done = wait_finished(&sys.client, &created.flow_id, Duration::from_secs(20)).await;
    assert_eq!(done.state, FlowState::Succeeded);
    let task = &done.tasks[0];
    assert_eq!(task.attempt, 2);
    assert_eq!(task.agent_id.as_ref().map(AgentId::as_str), Some("healthy"));

    // The slow agent was told to stop, and its late result is fenced off.
    let notice = tokio::time::timeout(Duration::from_secs(5), cancels.next())
        .await
        .unwrap()
        .unwrap();
    let notice: common::msg::CancelNotice = serde_json::from_slice(&notice.payload).unwrap();
    assert_eq!(notice.attempt, 1);
    js.publish(
        subject::report(&slow),
        report(json!({"type": "completed", "output": "late"})).into(),
    )
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
        matches!(&event.kind, EventKind::ReportRejected { attempt: 1, reason, .. } if reason.contains("stale")),
        "{event:?}"
    );
    assert_eq!(
        sys.client
            .flow_status(&created.flow_id)
            .await
            .unwrap()
            .tasks[0]
            .output,
        json!(2)
    );
    let _ = stop.send(());
    agent.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_rerun_of_a_finished_flow_is_swept_again_so_its_timeouts_fire() {
    let sys = System::start().await;
    let js = jetstream::new(sys.nats.clone());
    let agent = AgentId::new("hand").unwrap();
    sys.client
        .register_agent(&RegisterAgent {
            agent_id: agent.clone(),
            capabilities: vec![],
            labels: Default::default(),
            capacity: [("cpu".to_string(), 1.0)].into(),
            heartbeat_interval_ms: 60_000,
        })
        .await
        .unwrap();
    let consumer = assignment_consumer(&js, &agent).await;
    let mut t = cpu_task("t", &[]);
    t.timeouts.start_to_close_ms = Some(1_000);
    t.retry = RetryPolicy {
        max_attempts: 5,
        backoff_base_ms: 10,
        ..Default::default()
    };
    let created = sys
        .client
        .create_flow(&FlowSpec::new("rerun-sweep", vec![t]))
        .await
        .unwrap();
    let report = |attempt: u32, kind: serde_json::Value| {
        let mut r = json!({"flow_id": created.flow_id, "task_id": "t", "attempt": attempt, "agent_id": agent});
        r.as_object_mut()
            .unwrap()
            .extend(kind.as_object().unwrap().clone());
        r.to_string()
    };
    let publish = |body: String| {
        let js = js.clone();
        let subject = subject::report(&agent);
        async move {
            js.publish(subject, body.into())
                .await
                .unwrap()
                .await
                .unwrap()
        }
    };

    // The first run succeeds, so this replica notes the flow finished.
    let first = take_assignment(&consumer).await;
    assert_eq!(first.attempt, 1);
    publish(report(1, json!({"type": "started"}))).await;
    publish(report(1, json!({"type": "completed", "output": 1}))).await;
    let done = wait_finished(&sys.client, &created.flow_id, Duration::from_secs(10)).await;
    assert_eq!(done.state, FlowState::Succeeded);
    // Let a few sweeps pass over the finished flow.
    tokio::time::sleep(Duration::from_millis(500)).await;

    sys.client
        .rerun_task(&common::msg::RerunRequest {
            flow_id: created.flow_id.clone(),
            task_id: tid("t"),
        })
        .await
        .unwrap();
    // The re-run attempt starts and then hangs: only the sweep can end it.
    let hung = take_assignment(&consumer).await;
    assert_eq!(hung.attempt, 2);
    publish(report(2, json!({"type": "started"}))).await;

    // Its 1 s start-to-close timeout fires and the task is retried.
    let retry = take_assignment(&consumer).await;
    assert_eq!((retry.attempt, &retry.agent_id), (3, &agent));
    let status = sys.client.flow_status(&created.flow_id).await.unwrap();
    assert_eq!(status.state, FlowState::Running);
    assert_eq!(status.tasks[0].attempt, 3);
}

#[tokio::test]
async fn a_paused_flow_dispatches_nothing_until_resumed() {
    let sys = System::start().await;
    let (stop, agent) = spawn_agent(&sys.nats, "w", 2.0, |_| async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok(json!("done"))
    });
    wait_registered(&sys.client, "w").await;
    let created = sys
        .client
        .create_flow(&FlowSpec::new(
            "pausable",
            vec![cpu_task("a", &[]), cpu_task("b", &["a"])],
        ))
        .await
        .unwrap();
    let paused = sys
        .client
        .request::<_, FlowStatus>(subject::FLOW_PAUSE, &json!({"flow_id": created.flow_id}))
        .await
        .unwrap();
    assert_eq!(paused.state, FlowState::Paused);

    // Whatever was already running finishes; nothing new starts.
    eventually(Duration::from_secs(10), "a to settle", || async {
        let s = sys.client.flow_status(&created.flow_id).await.ok()?;
        let a = s.tasks.iter().find(|t| t.task_id == tid("a"))?;
        matches!(a.state, TaskState::Succeeded | TaskState::Ready).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let s = sys.client.flow_status(&created.flow_id).await.unwrap();
    assert_eq!(s.state, FlowState::Paused);
    assert!(
        s.tasks.iter().all(|t| !t.state.is_active()),
        "nothing runs while paused: {:?}",
        s.tasks
    );
    let b = s.tasks.iter().find(|t| t.task_id == tid("b")).unwrap();
    assert_eq!(b.attempt, 0, "b was never assigned");

    let resumed = sys
        .client
        .request::<_, FlowStatus>(subject::FLOW_RESUME, &json!({"flow_id": created.flow_id}))
        .await
        .unwrap();
    assert_eq!(resumed.state, FlowState::Running);
    let done = wait_finished(&sys.client, &created.flow_id, Duration::from_secs(20)).await;
    assert_eq!(done.state, FlowState::Succeeded);

    // Pausing a finished flow is a typed error.
    let err = sys
        .client
        .request::<_, FlowStatus>(subject::FLOW_PAUSE, &json!({"flow_id": created.flow_id}))
        .await
        .unwrap_err();
    assert_eq!(err.code, common::ErrorCode::Conflict);
    let _ = stop.send(());
    agent.await.unwrap().unwrap();
}

#[tokio::test]
async fn cancel_stops_the_agents_and_releases_every_allocation() {
    let sys = System::start().await;
    let started = Arc::new(AtomicU32::new(0));
    let s = started.clone();
    let (stop, agent) = spawn_agent(&sys.nats, "busy", 2.0, move |_| {
        let s = s.clone();
        async move {
            s.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(120)).await;
            Ok(json!("never"))
        }
    });
    wait_registered(&sys.client, "busy").await;
    let spec = FlowSpec::new(
        "doomed",
        vec![
            cpu_task("x", &[]),
            cpu_task("y", &[]),
            cpu_task("z", &["x"]),
        ],
    );
    let created = sys.client.create_flow(&spec).await.unwrap();
    eventually(Duration::from_secs(10), "both tasks running", || async {
        let s = sys.client.flow_status(&created.flow_id).await.ok()?;
        (s.counts.get(&TaskState::Running) == Some(&2)).then_some(())
    })
    .await;
    let cap = sys.client.capacity(&Default::default()).await.unwrap();
    assert_eq!(cap.pool["cpu"].allocated, 2.0);

    let cancelled = sys
        .client
        .request::<_, FlowStatus>(subject::FLOW_CANCEL, &json!({"flow_id": created.flow_id}))
        .await
        .unwrap();
    assert_eq!(cancelled.state, FlowState::Cancelled);
    assert!(cancelled
        .tasks
        .iter()
        .all(|t| t.state == TaskState::Cancelled));
    eventually(Duration::from_secs(10), "allocations released", || async {
        let c = sys.client.capacity(&Default::default()).await.ok()?;
        (c.pool["cpu"].allocated == 0.0).then_some(())
    })
    .await;
    // The agent's handlers were aborted: it stops at once instead of after two minutes.
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), agent)
        .await
        .expect("agent stops promptly")
        .unwrap()
        .unwrap();
    assert_eq!(started.load(Ordering::SeqCst), 2);
}

/// A random DAG: task i depends on up to three earlier tasks (deterministic).
pub(crate) fn random_dag(n: usize, seed: u64) -> FlowSpec {
    let mut state = seed;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as usize
    };
    let tasks = (0..n)
        .map(|i| {
            let mut deps: Vec<String> = Vec::new();
            if i > 0 {
                for _ in 0..next() % 4 {
                    let d = format!("t{}", next() % i);
                    if !deps.contains(&d) {
                        deps.push(d);
                    }
                }
            }
            let deps: Vec<&str> = deps.iter().map(String::as_str).collect();
            cpu_task(&format!("t{i}"), &deps)
        })
        .collect();
    FlowSpec::new("random", tasks)
}

/// Counts, from the events, how often each task reached `succeeded`. Read
/// off the subjects, an event may come twice (published again by another
/// replica): it counts once, by its id.
pub(crate) fn count_successes(events: &[Event], flow: &FlowId) -> BTreeMap<String, usize> {
    let mut done = BTreeMap::new();
    let mut seen = std::collections::HashSet::new();
    for e in events.iter().filter(|e| seen.insert(e.event_id.as_str())) {
        if let EventKind::TaskTransition {
            flow_id,
            task_id,
            to: TaskState::Succeeded,
            ..
        } = &e.kind
        {
            if flow_id == flow {
                *done.entry(task_id.to_string()).or_insert(0) += 1;
            }
        }
    }
    done
}

async fn collect_events(nats: &async_nats::Client) -> tokio::sync::mpsc::UnboundedReceiver<Event> {
    let mut sub = nats.subscribe(subject::EVENTS_ALL).await.unwrap();
    nats.flush().await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            if let Ok(e) = serde_json::from_slice::<Event>(&msg.payload) {
                let _ = tx.send(e);
            }
        }
    });
    rx
}

fn drain(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Event>) -> Vec<Event> {
    let mut out = Vec::new();
    while let Ok(e) = rx.try_recv() {
        out.push(e);
    }
    out
}

/// A flow whose stored form would not leave room for its run state under the
/// server's `max_payload` is refused with the sizes, and nothing is stored;
/// a smaller one on the same server is accepted.
#[tokio::test]
async fn a_flow_too_large_to_store_is_refused_with_its_size() {
    let sys = System::start_on(testkit::NatsServer::start_with_config(
        "max_payload: 64KB\n",
    ))
    .await;
    let tasks = |n: usize| {
        (0..n)
            .map(|i| cpu_task(&format!("t{i}"), &[]))
            .collect::<Vec<_>>()
    };
    let mut big = FlowSpec::new("big", tasks(300));
    big.id = Some(FlowId::new("big").unwrap());
    let body = serde_json::to_vec(&big).unwrap();
    assert!(
        body.len() < 64 * 1024,
        "the request itself fits ({} bytes)",
        body.len()
    );
    let err = sys.client.create_flow(&big).await.unwrap_err();
    assert_eq!(err.code, common::ErrorCode::PayloadTooLarge, "{err}");
    let details = err.details.clone();
    assert!(
        details["stored_bytes"].as_u64().unwrap() > 32 * 1024,
        "{details}"
    );
    assert_eq!(details["max_payload"], 64 * 1024);
    let missing = sys
        .client
        .flow_status(&FlowId::new("big").unwrap())
        .await
        .unwrap_err();
    assert_eq!(missing.code, common::ErrorCode::NotFound);
    let small = FlowSpec::new("small", tasks(20));
    sys.client.create_flow(&small).await.unwrap();
}

/// Every consumer on every stream of the server.
async fn consumer_count(js: &jetstream::Context) -> usize {
    let mut streams = js.streams();
    let mut n = 0;
    while let Some(s) = streams.next().await {
        n += s.unwrap().state.consumer_count;
    }
    n
}

/// An agent that comes, works and goes leaves nothing on the server: it
/// takes its assignments through a subscription, not a consumer of its own
/// (agents that come and go would otherwise pile consumers up until the
/// server refuses new ones).
#[tokio::test]
async fn an_agent_coming_and_going_leaves_no_consumer_behind() {
    let sys = System::start().await;
    let js = jetstream::new(sys.nats.clone());
    let before = consumer_count(&js).await;
    let (stop, handle) = spawn_agent(&sys.nats, "leaver", 1.0, |_a| async {
        Ok(json!({"ok": true}))
    });
    let mut spec = FlowSpec::new("leave", vec![cpu_task("a", &[])]);
    spec.id = Some(FlowId::new("leave").unwrap());
    sys.client.create_flow(&spec).await.unwrap();
    let status = eventually(Duration::from_secs(20), "flow done", || async {
        let s = sys
            .client
            .flow_status(&FlowId::new("leave").unwrap())
            .await
            .ok()?;
        (s.state != FlowState::Running).then_some(s)
    })
    .await;
    assert_eq!(status.state, FlowState::Succeeded);
    assert_eq!(
        consumer_count(&js).await,
        before,
        "a consumer while running"
    );
    stop.send(()).unwrap();
    handle.await.unwrap().unwrap();
    assert_eq!(
        consumer_count(&js).await,
        before,
        "a consumer after it left"
    );
}

/// A flow with nowhere to run waits with a growing back-off between asks
/// (each refused task used to go straight back to the allocator, a busy
/// loop over both cores), loses nothing, and runs once an agent comes.
#[tokio::test]
async fn tasks_nobody_can_take_wait_with_back_off_and_run_when_an_agent_comes() {
    let sys = System::start().await;
    let flow = waits_with_back_off(&sys, "nowhere").await;
    let (stop, agent) = spawn_agent(&sys.nats, "late", 4.0, |_| async { Ok(json!(null)) });
    runs_each_task_once(&sys.client, &flow).await;
    let _ = stop.send(());
    agent.await.unwrap().unwrap();
}

/// With the allocator gone, placement waits with back-off as well and loses
/// nothing; once an allocator is back the flow runs.
#[tokio::test]
async fn with_the_allocator_gone_placement_waits_and_loses_nothing() {
    let mut sys = System::start().await;
    let (stop, agent) = spawn_agent(&sys.nats, "steady", 4.0, |_| async { Ok(json!(null)) });
    wait_registered(&sys.client, "steady").await;
    let at = sys
        .services
        .iter()
        .position(|s| s.name == "allocator")
        .unwrap();
    sys.services.remove(at).stop().await.unwrap();
    let flow = waits_with_back_off(&sys, "no-allocator").await;
    sys.services
        .push(testkit::start_service("allocator", sys.server.config()));
    runs_each_task_once(&sys.client, &flow).await;
    let _ = stop.send(());
    agent.await.unwrap().unwrap();
}

/// Creates a flow of 20 tasks that cannot be placed and counts the
/// allocation requests for 5 s: each task is asked for with a back-off
/// doubling from 10 ms (about 9 times), not in a busy loop (thousands), and
/// stays ready.
async fn waits_with_back_off(sys: &System, name: &str) -> FlowId {
    let mut asks = sys.nats.subscribe(subject::ALLOCATE).await.unwrap();
    let tasks: Vec<TaskSpec> = (0..20).map(|i| cpu_task(&format!("t{i}"), &[])).collect();
    let flow = sys
        .client
        .create_flow(&FlowSpec::new(name, tasks))
        .await
        .unwrap()
        .flow_id;
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut asked = 0;
    while let Ok(Some(_)) = tokio::time::timeout_at(until, asks.next()).await {
        asked += 1;
    }
    assert!(
        (20..=20 * 12).contains(&asked),
        "the allocator was asked {asked} times in 5 s for 20 tasks"
    );
    let status = sys.client.flow_status(&flow).await.unwrap();
    assert!(
        status.tasks.iter().all(|t| t.state == TaskState::Ready),
        "{status:?}"
    );
    flow
}

async fn runs_each_task_once(client: &Client, flow: &FlowId) {
    let done = wait_finished(client, flow, Duration::from_secs(30)).await;
    assert_eq!(done.state, FlowState::Succeeded);
    assert!(done.tasks.iter().all(|t| t.attempt == 1), "{done:?}");
}

mod planning;
mod recovery;
