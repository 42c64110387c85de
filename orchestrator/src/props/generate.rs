//! Random flows and random operations on them.

use common::msg::{FailureMode, FlowSpec, RetryPolicy, TaskSpec, Timeouts};
use proptest::prelude::*;

use super::{tid, AGENTS};

/// One task of a generated flow: dependency bits on earlier tasks, attempts allowed,
/// whether it has run-time deadlines.
#[derive(Debug, Clone)]
pub(super) struct GenTask {
    pub(super) deps: u16,
    pub(super) max_attempts: u32,
    pub(super) deadlines: bool,
    pub(super) priority: i32,
}

#[derive(Debug, Clone)]
pub(super) struct GenFlow {
    pub(super) tasks: Vec<GenTask>,
    pub(super) fail_fast: bool,
    pub(super) max_parallelism: Option<u32>,
}

pub(super) fn gen_flow() -> impl Strategy<Value = GenFlow> {
    let task = (
        any::<u16>(),
        any::<u16>(),
        1u32..=3,
        any::<bool>(),
        -1i32..=1,
    )
        .prop_map(|(a, b, max_attempts, deadlines, priority)| GenTask {
            // Two masks ANDed: each earlier task is a dependency with probability 1/4.
            deps: a & b,
            max_attempts,
            deadlines,
            priority,
        });
    (
        prop::collection::vec(task, 1..=12),
        any::<bool>(),
        prop_oneof![3 => Just(None), 1 => (1u32..=3).prop_map(Some)],
    )
        .prop_map(|(tasks, fail_fast, max_parallelism)| GenFlow {
            tasks,
            fail_fast,
            max_parallelism,
        })
}

pub(super) fn spec_of(g: &GenFlow) -> FlowSpec {
    let tasks = g
        .tasks
        .iter()
        .enumerate()
        .map(|(i, gt)| {
            let mut t = TaskSpec::new(tid(i));
            t.kind = "noop".into();
            t.priority = gt.priority;
            t.depends_on = (0..i)
                .filter(|d| gt.deps & (1 << d) != 0)
                .map(tid)
                .collect();
            t.retry = RetryPolicy {
                max_attempts: gt.max_attempts,
                backoff_base_ms: 10,
                backoff_factor: 2.0,
                backoff_max_ms: 50,
                ..RetryPolicy::default()
            };
            if gt.deadlines {
                t.timeouts = Timeouts {
                    schedule_to_start_ms: Some(100),
                    start_to_close_ms: Some(400),
                    heartbeat_ms: Some(150),
                };
            }
            t
        })
        .collect();
    let mut spec = FlowSpec::new("prop", tasks);
    spec.failure_mode = if g.fail_fast {
        FailureMode::FailFast
    } else {
        FailureMode::Continue
    };
    spec.max_parallelism = g.max_parallelism;
    spec
}

#[derive(Debug, Clone)]
pub(super) enum Op {
    /// Assign the `pick`-th dispatchable task (if any) to an agent.
    AssignReady {
        pick: usize,
        agent: usize,
    },
    /// Try to assign any task, ready or not.
    AssignAny {
        task: usize,
        agent: usize,
    },
    /// A report on a task; `attempt_offset` and `from_holder` make it stale or foreign.
    Report {
        task: usize,
        attempt_offset: i8,
        from_holder: bool,
        agent: usize,
        kind: u8,
        retryable: bool,
    },
    /// Send an earlier report again (JetStream redelivers).
    Replay {
        pick: usize,
    },
    Tick {
        advance_ms: u64,
    },
    AgentLost {
        agent: usize,
    },
    /// The allocator takes back an allocation (the task's own, or one it does not hold).
    Preempt {
        task: usize,
        own: bool,
    },
    Unassign {
        task: usize,
        attempt_offset: i8,
    },
    Pause,
    Resume,
    Cancel,
}

pub(super) fn gen_op() -> impl Strategy<Value = Op> {
    let offset = prop_oneof![6 => Just(0i8), 1 => Just(-1i8), 1 => Just(1i8)];
    prop_oneof![
        40 => (any::<usize>(), 0..AGENTS).prop_map(|(pick, agent)| Op::AssignReady { pick, agent }),
        8 => (any::<usize>(), 0..AGENTS).prop_map(|(task, agent)| Op::AssignAny { task, agent }),
        60 => (
            any::<usize>(),
            offset.clone(),
            prop::bool::weighted(0.85),
            0..AGENTS,
            0u8..5,
            any::<bool>(),
        )
            .prop_map(|(task, attempt_offset, from_holder, agent, kind, retryable)| Op::Report {
                task,
                attempt_offset,
                from_holder,
                agent,
                kind,
                retryable,
            }),
        15 => any::<usize>().prop_map(|pick| Op::Replay { pick }),
        20 => (0u64..300).prop_map(|advance_ms| Op::Tick { advance_ms }),
        4 => (0..AGENTS).prop_map(|agent| Op::AgentLost { agent }),
        4 => (any::<usize>(), any::<bool>()).prop_map(|(task, own)| Op::Preempt { task, own }),
        4 => (any::<usize>(), offset).prop_map(|(task, attempt_offset)| Op::Unassign {
            task,
            attempt_offset
        }),
        4 => Just(Op::Pause),
        6 => Just(Op::Resume),
        1 => Just(Op::Cancel),
    ]
}
