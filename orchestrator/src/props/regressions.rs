//! Cases the properties found, kept as plain tests.

use common::msg::{FailureMode, FlowSpec, FlowState, TaskSpec, TaskState};
use common::{AllocationId, FlowId};

use super::{aid, tid};
use crate::machine::{Effect, Flow};

/// Found by the property above: when one step ends several attempts (a tick with
/// two deadlines passed, a lost agent holding two tasks) and the first failure is
/// final in a fail-fast flow, the rest were already cancelled by fail-fast but
/// still went through the failure path: a cancelled task came back as ready (or
/// failed) in a flow that had already ended.
#[test]
fn a_fail_fast_step_does_not_revive_the_tasks_it_cancelled() {
    for lose_agent in [false, true] {
        let mut spec = FlowSpec::new("ff", vec![TaskSpec::new(tid(0)), TaskSpec::new(tid(1))]);
        spec.failure_mode = FailureMode::FailFast;
        for (i, t) in spec.tasks.iter_mut().enumerate() {
            t.retry.max_attempts = i as u32 + 1;
            t.timeouts.schedule_to_start_ms = Some(100);
        }
        let (mut flow, _) = Flow::new(FlowId::new("f").unwrap(), spec, 0);
        let agent = aid(0);
        for i in 0..2 {
            let allocation = AllocationId::new(format!("al-{i}")).unwrap();
            flow.assign_attempt(&tid(i), &agent, &allocation, 0)
                .unwrap();
        }
        let effects = if lose_agent {
            flow.agent_lost(&agent, 50)
        } else {
            flow.tick(100)
        };
        assert_eq!(flow.state, FlowState::Failed);
        assert_eq!(flow.tasks[&tid(1)].state, TaskState::Cancelled);
        let releases = effects
            .iter()
            .filter(|e| matches!(e, Effect::Release { .. }))
            .count();
        assert_eq!(releases, 2);
    }
}
