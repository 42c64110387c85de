//! Orchestrator behaviour against a real nats-server: retries with back-off,
//! timed-out attempts moving to another agent with the late report fenced off,
//! pause / resume, cancel releasing everything, a 1,000-task random DAG run
//! exactly once, and two replicas with one killed mid-run.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
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
                        *runs
                            .0
                            .lock()
                            .unwrap()
                            .entry((a.flow_id.to_string(), a.task_id.to_string()))
                            .or_insert(0) += 1;
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

/// The durable consumer a hand-written agent reads its assignments from.
pub(crate) async fn assignment_consumer(
    js: &jetstream::Context,
    agent: &AgentId,
) -> consumer::Consumer<consumer::pull::Config> {
    js.get_stream(common::nats::STREAM_ASSIGN)
        .await
        .unwrap()
        .create_consumer(consumer::pull::Config {
            durable_name: Some(coordkit::agent::consumer_name(agent)),
            filter_subject: subject::assign(agent),
            ..Default::default()
        })
        .await
        .unwrap()
}

/// Takes (and acks) the next assignment, as an agent that then goes its own way.
pub(crate) async fn take_assignment(
    consumer: &consumer::Consumer<consumer::pull::Config>,
) -> common::msg::Assignment {
    let mut batch = consumer
        .fetch()
        .max_messages(1)
        .expires(Duration::from_secs(10))
        .messages()
        .await
        .unwrap();
    let msg = batch.next().await.expect("an assignment").unwrap();
    msg.ack().await.unwrap();
    serde_json::from_slice(&msg.payload).unwrap()
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

/// Before the runtime re-created its consumer, the killed run's delivery
/// stayed pending for the ack wait (300 s) and filled `max_ack_pending`, so the
/// restarted agent got nothing and this task never finished.
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
    // Back within the heartbeat-loss window: the attempt is still its own.
    let _second = start(false);
    let done = wait_finished(&sys.client, &created.flow_id, Duration::from_secs(20)).await;
    assert_eq!(done.state, FlowState::Succeeded);
    assert_eq!(
        (done.tasks[0].attempt, done.tasks[0].output.clone()),
        (1, json!("done"))
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

/// Registers an agent by hand that never takes its assignments: what it is
/// given stays assigned, and its capacity stays booked.
async fn register_idle_agent(client: &Client, id: &str, capacity: &[(&str, f64)]) {
    client
        .register_agent(&RegisterAgent {
            agent_id: AgentId::new(id).unwrap(),
            capabilities: Vec::new(),
            labels: BTreeMap::new(),
            capacity: capacity.iter().map(|(r, v)| (r.to_string(), *v)).collect(),
            heartbeat_interval_ms: 60_000,
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn optimize_plans_the_remaining_work_and_applies_critical_path_priorities() {
    let sys = System::start().await;
    // A gate task holds every other task back; its agent never starts it, so
    // the plan sees the same flow from one call to the next.
    register_idle_agent(&sys.client, "gatekeeper", &[("gate", 1.0)]).await;
    register_idle_agent(&sys.client, "worker", &[("cpu", 2.0)]).await;
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

/// An agent that stops with nothing waiting for it removes its durable
/// assignment consumer (agents that come and go would otherwise pile them up
/// until the server refuses new ones); the flow it ran is unaffected.
#[tokio::test]
async fn an_agent_stopping_with_nothing_waiting_leaves_no_consumer() {
    let sys = System::start().await;
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
    let js = jetstream::new(sys.nats.clone());
    let stream = js.get_stream(common::nats::STREAM_ASSIGN).await.unwrap();
    let name = coordkit::agent::consumer_name(&AgentId::new("leaver").unwrap());
    assert!(
        stream.consumer_info(&name).await.is_ok(),
        "consumer while running"
    );
    stop.send(()).unwrap();
    handle.await.unwrap().unwrap();
    assert!(
        stream.consumer_info(&name).await.is_err(),
        "the stopped agent's consumer is gone"
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
