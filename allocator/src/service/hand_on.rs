//! Handing on: an `allocate` naming a live allocation booked for another
//! task binds it to the task it names instead of booking (see
//! [`AllocateRequest::task`]). The orchestrator hands a finished task's
//! allocation to the next task alike this way, and tells the allocator only
//! when the new holder runs for long (its own `spare` module).

use common::msg::{AllocateRequest, Allocation};
use common::nats::Step;
use common::{Error, ErrorCode};

use super::Allocator;

impl Allocator {
    /// Binds live allocation `a` to the task `req` names, and to its owner
    /// and priority (see [`AllocateRequest::task`]): one compare-and-set on
    /// its agent, nothing booked. Refused when other quotas cover the two
    /// owners (the hand-over would move capacity between quotas); not found
    /// when it went meanwhile (released, preempted, its agent lost).
    pub(super) async fn hand_on(
        &self,
        req: &AllocateRequest,
        a: Allocation,
    ) -> Result<Allocation, Error> {
        if !self.same_quotas(&a.owner, &req.owner).await? {
            return Err(Error::new(
                ErrorCode::Conflict,
                format!(
                    "allocation {} is held by owner {:?}, which other quotas cover than {:?}",
                    a.allocation_id, a.owner, req.owner
                ),
            ));
        }
        let (id, task) = (a.allocation_id.clone(), req.task.clone());
        let (owner, priority) = (req.owner.clone(), req.priority);
        let now = common::now_ms();
        let bound = self
            .book_agent(&a.agent_id, move |rec| {
                let Some(a) = rec.allocations.get_mut(&id) else {
                    return Ok(Step::Keep(None));
                };
                if a.task == task {
                    return Ok(Step::Keep(Some(a.clone())));
                }
                a.task = task.clone();
                a.owner = owner.clone();
                a.priority = priority;
                a.bound_at_ms = Some(now);
                Ok(Step::Write((), Some(a.clone())))
            })
            .await?;
        bound.ok_or_else(|| {
            Error::new(
                ErrorCode::NotFound,
                format!("allocation {} is gone", a.allocation_id),
            )
        })
    }
}
