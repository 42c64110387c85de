//! Agents paused past their lease: their late reports are rejected as
//! stale and the task completes once, elsewhere.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::msg::{EventKind, FlowSpec, FlowState, Requirements, RetryPolicy, TaskSpec, TaskState};
use common::{AgentId, FlowId, TaskId};
use coordkit::agent::{self, AgentOptions};
use futures::StreamExt;
use serde_json::json;
use testkit::{eventually, Process, System};

use crate::kit::*;

/// How long the paused agent is frozen: well past its heartbeat-loss window
/// (3 × 300 ms, checked every 500 ms) and its task's start-to-close lease
/// (3 s, long enough that the loss decides first and the frozen agent,
/// declared lost, is not given the retry).
const PAUSE: Duration = Duration::from_secs(6);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_paused_past_its_lease_has_its_late_reports_rejected() {
    let sys = System::start().await;
    let flow_id = FlowId::new("paused").unwrap();
    let task_id = TaskId::new("t").unwrap();

    // "sleeper" runs on one thread of its own; its handler blocks that thread
    // on the first attempt, which freezes the whole agent (heartbeats, acks,
    // reports) the way SIGSTOP freezes a process.
    let cfg = sys.server.config();
    let (stop_sleeper, sleeper_stopped) = tokio::sync::oneshot::channel::<()>();
    let sleeper = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let nats = common::nats::connect(&cfg, "agent-sleeper").await.unwrap();
            let mut opts = AgentOptions::new(AgentId::new("sleeper").unwrap()).capacity("cpu", 1.0);
            opts.heartbeat_interval = Duration::from_millis(300);
            opts.concurrency = 1;
            // `started` before the handler runs: it is the handler that
            // freezes the thread a grace's timer would need.
            opts.start_grace = Duration::ZERO;
            agent::run(
                nats,
                opts,
                |a| async move {
                    if a.attempt == 1 {
                        std::thread::sleep(PAUSE);
                    }
                    Ok(json!({"by": "sleeper"}))
                },
                async {
                    let _ = sleeper_stopped.await;
                },
            )
            .await
        })
    });
    eventually(Duration::from_secs(10), "sleeper registered", || async {
        let cap = sys.client.capacity(&Default::default()).await.ok()?;
        cap.agents
            .contains_key(&AgentId::new("sleeper").unwrap())
            .then_some(())
    })
    .await;

    let mut t = TaskSpec::new(task_id.clone());
    t.requirements = Requirements {
        resources: [("cpu".to_string(), 1.0)].into(),
        ..Default::default()
    };
    t.timeouts.start_to_close_ms = Some(3_000);
    t.retry = RetryPolicy {
        max_attempts: 5,
        backoff_base_ms: 100,
        ..Default::default()
    };
    let mut spec = FlowSpec::new("paused", vec![t]);
    spec.id = Some(flow_id.clone());
    sys.client.create_flow(&spec).await.unwrap();
    eventually(
        Duration::from_secs(10),
        "the sleeper running it",
        || async {
            let s = sys.client.flow_status(&flow_id).await.ok()?;
            (s.tasks[0].state == TaskState::Running).then_some(())
        },
    )
    .await;

    // While it is frozen, another agent joins and the task moves to it.
    let steady_nats = common::nats::connect(&sys.server.config(), "agent-steady")
        .await
        .unwrap();
    let mut opts = AgentOptions::new(AgentId::new("steady").unwrap()).capacity("cpu", 1.0);
    opts.heartbeat_interval = Duration::from_millis(300);
    let (stop_steady, steady_stopped) = tokio::sync::oneshot::channel::<()>();
    let steady = tokio::spawn(agent::run(
        steady_nats,
        opts,
        |_| async { Ok(json!({"by": "steady"})) },
        async {
            let _ = steady_stopped.await;
        },
    ));
    let done = eventually(PAUSE * 3, "the task done elsewhere", || async {
        let s = sys.client.flow_status(&flow_id).await.ok()?;
        s.state.is_terminal().then_some(s)
    })
    .await;
    assert_eq!(done.state, FlowState::Succeeded);
    let task = &done.tasks[0];
    assert!(task.attempt >= 2, "attempt {}", task.attempt);
    assert_eq!(task.output, json!({"by": "steady"}));

    // Thawed, the sleeper reports attempt 1 completed: rejected as stale.
    let events = eventually(PAUSE * 3, "the late report rejected", || async {
        let events = all_events(&sys.nats).await;
        events
            .iter()
            .any(|e| {
                matches!(&e.kind, EventKind::ReportRejected { attempt: 1, agent_id, .. }
                    if agent_id.as_str() == "sleeper")
            })
            .then_some(events)
    })
    .await;
    let completions: BTreeSet<(u32, Option<String>)> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::TaskTransition {
                to: TaskState::Succeeded,
                attempt,
                agent_id,
                ..
            } => Some((*attempt, agent_id.as_ref().map(|a| a.to_string()))),
            _ => None,
        })
        .collect();
    assert_eq!(
        completions,
        BTreeSet::from([(task.attempt, Some("steady".to_string()))]),
        "completed once, by the agent holding the lease"
    );
    let status = sys.client.flow_status(&flow_id).await.unwrap();
    assert_eq!(status.tasks[0].output, json!({"by": "steady"}));

    let _ = stop_sleeper.send(());
    sleeper.join().unwrap().unwrap();
    let _ = stop_steady.send(());
    steady.await.unwrap().unwrap();
}

/// How long the stopped agent process works on a task: long enough that it is
/// frozen mid-task, whatever the machine's load.
const STOPPED_WORK_MS: u64 = 3_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_process_stopped_past_its_lease_is_told_and_its_late_report_rejected() {
    let sys = System::start().await;
    let mut notices = sys
        .nats
        .subscribe(common::subject::cancel(&AgentId::new("sleeper").unwrap()))
        .await
        .unwrap();
    sys.nats.flush().await.unwrap();
    let flow_id = FlowId::new("stopped").unwrap();
    let work_ms = STOPPED_WORK_MS.to_string();
    // A real process, frozen by SIGSTOP: sockets open, nothing running.
    let mut sleeper = Process::spawn(
        std::path::Path::new(env!("CARGO_BIN_EXE_coord-proc")),
        [
            "--nats-url",
            sys.server.url(),
            "agent",
            "--id",
            "sleeper",
            "--heartbeat-ms",
            "300",
            "--work-ms",
            &work_ms,
        ],
    );
    eventually(Duration::from_secs(20), "sleeper registered", || async {
        let cap = sys.client.capacity(&Default::default()).await.ok()?;
        cap.agents
            .contains_key(&AgentId::new("sleeper").unwrap())
            .then_some(())
    })
    .await;

    let mut t = TaskSpec::new(TaskId::new("t").unwrap());
    t.requirements = Requirements {
        resources: [("cpu".to_string(), 1.0)].into(),
        ..Default::default()
    };
    t.timeouts.start_to_close_ms = Some(3_000);
    t.retry = RetryPolicy {
        max_attempts: 5,
        backoff_base_ms: 100,
        ..Default::default()
    };
    let mut spec = FlowSpec::new("stopped", vec![t]);
    spec.id = Some(flow_id.clone());
    sys.client.create_flow(&spec).await.unwrap();
    eventually(
        Duration::from_secs(10),
        "the sleeper running it",
        || async {
            let s = sys.client.flow_status(&flow_id).await.ok()?;
            (s.tasks[0].state == TaskState::Running).then_some(())
        },
    )
    .await;
    sleeper.stop();
    let stopped = Instant::now();

    // While it is frozen, another agent joins and the task moves to it.
    let steady_nats = common::nats::connect(&sys.server.config(), "agent-steady")
        .await
        .unwrap();
    let mut opts = AgentOptions::new(AgentId::new("steady").unwrap()).capacity("cpu", 1.0);
    opts.heartbeat_interval = Duration::from_millis(300);
    let (stop_steady, steady_stopped) = tokio::sync::oneshot::channel::<()>();
    let steady = tokio::spawn(agent::run(
        steady_nats,
        opts,
        |_| async { Ok(json!({"by": "steady"})) },
        async {
            let _ = steady_stopped.await;
        },
    ));
    let done = eventually(
        Duration::from_secs(30),
        "the task done elsewhere",
        || async {
            let s = sys.client.flow_status(&flow_id).await.ok()?;
            s.state.is_terminal().then_some(s)
        },
    )
    .await;
    assert_eq!(done.state, FlowState::Succeeded);
    let task = &done.tasks[0];
    assert!(task.attempt >= 2, "attempt {}", task.attempt);
    assert_eq!(task.output, json!({"by": "steady"}));
    // Frozen past its lease and its work time, so it wakes with attempt 1 done.
    let frozen = Duration::from_millis(STOPPED_WORK_MS + 1_000);
    tokio::time::sleep(frozen.saturating_sub(stopped.elapsed())).await;
    assert!(sleeper.is_alive(), "the stopped agent exited");
    let frozen_for = stopped.elapsed();
    sleeper.resume();

    // It was told its attempt was taken away (it was lost, or timed out)...
    let notice = tokio::time::timeout(Duration::from_secs(10), notices.next())
        .await
        .expect("a cancel notice for the frozen agent")
        .unwrap();
    let notice: common::msg::CancelNotice = serde_json::from_slice(&notice.payload).unwrap();
    assert_eq!(notice.attempt, 1, "{notice:?}");
    // ...but thawed, it may still report attempt 1 done before it reads the
    // notice (its work timer and the notice are both due): such a report is
    // rejected as stale. Either way, nothing it says counts.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let events = all_events(&sys.nats).await;
    for e in &events {
        if let EventKind::ReportRejected {
            attempt, agent_id, ..
        } = &e.kind
        {
            if agent_id.as_str() == "sleeper" {
                assert_eq!(*attempt, 1, "{e:?}");
            }
        }
    }
    let completions: BTreeSet<(u32, Option<String>)> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::TaskTransition {
                to: TaskState::Succeeded,
                attempt,
                agent_id,
                ..
            } => Some((*attempt, agent_id.as_ref().map(|a| a.to_string()))),
            _ => None,
        })
        .collect();
    assert_eq!(
        completions,
        BTreeSet::from([(task.attempt, Some("steady".to_string()))]),
        "completed once, by the agent holding the lease"
    );
    let status = sys.client.flow_status(&flow_id).await.unwrap();
    assert_eq!(status.tasks[0].output, json!({"by": "steady"}));
    assert_eq!(status.tasks[0].attempt, task.attempt);
    assert!(sleeper.is_alive(), "the resumed agent exited");
    eprintln!(
        "stopped agent: frozen {:.1} s, told ({:?}), task done by steady at attempt {}",
        frozen_for.as_secs_f64(),
        notice.code,
        task.attempt
    );
    let _ = stop_steady.send(());
    steady.await.unwrap().unwrap();
}
