//! Agents joining, leaving and being deregistered: their records and their
//! work path (whether they listen for assignments).

use common::msg::{AgentInfo, AgentStatus, DeregisterAgent, EventKind, LeaveAgent, RegisterAgent};
use common::nats::{self as bus, Step};
use common::{AgentId, Error, ErrorCode};

use super::ops::invalid;
use super::Allocator;
use crate::machine::{self, AgentRecord};

impl Allocator {
    pub(super) async fn register(&self, req: RegisterAgent) -> Result<AgentInfo, Error> {
        machine::check_amounts(&req.capacity).map_err(invalid)?;
        let now = common::now_ms();
        // Registering with less capacity than is held preempts what no longer fits:
        // the agent's word about itself wins over the ledger.
        let (shrink, revision) = bus::cas_update::<AgentRecord, machine::Shrink, _>(
            &self.agents,
            req.agent_id.as_str(),
            |prev| {
                let rec = AgentRecord::register(&req, prev, now);
                let shrink = machine::shrink_to_fit(&rec, now);
                Ok(Step::Write(shrink.record.clone(), shrink))
            },
        )
        .await?;
        let rec = shrink.record.clone();
        self.cache
            .remember(rec.agent_id.clone(), rec.clone(), revision);
        self.events
            .publish(EventKind::AgentRegistered {
                agent_id: rec.agent_id.clone(),
                capacity: rec.capacity.clone(),
            })
            .await;
        self.forget(&shrink.evicted).await;
        self.preempted(&shrink.evicted, "capacity_reduced").await;
        self.reservations_ended(&shrink.dropped, "capacity_reduced")
            .await;
        Ok(rec.info(0))
    }

    pub(super) async fn deregister(&self, req: DeregisterAgent) -> Result<AgentInfo, Error> {
        let now = common::now_ms();
        let rec = self
            .update_agent(&req.agent_id, |mut rec| {
                if rec.status == AgentStatus::Left {
                    return Err(Error::new(
                        ErrorCode::Conflict,
                        format!("agent {} has left; register again first", rec.agent_id),
                    ));
                }
                if rec.status != AgentStatus::Draining {
                    rec.status = AgentStatus::Draining;
                    rec.status_since_ms = now;
                }
                Ok(Step::Write(rec.clone(), rec))
            })
            .await?;
        self.events
            .publish(EventKind::AgentDeregistered {
                agent_id: rec.agent_id.clone(),
                allocations: rec.allocations.len(),
            })
            .await;
        Ok(rec.info(self.last_beat(&rec.agent_id)))
    }

    /// The agent is done: `left`, what it held released and handed back.
    /// Leaving again is a no-op that answers the same.
    pub(super) async fn leave(&self, req: LeaveAgent) -> Result<AgentInfo, Error> {
        let now = common::now_ms();
        let (rec, released) = self
            .update_agent(&req.agent_id, |mut rec| {
                let released = rec.leave(now);
                Ok(Step::Write(rec.clone(), (rec, released)))
            })
            .await?;
        tracing::info!(agent = %rec.agent_id, released = released.len(), "agent left");
        self.forget(&released).await;
        self.events
            .publish(EventKind::AgentLeft {
                agent_id: rec.agent_id.clone(),
                released,
            })
            .await;
        self.remove_work_path(&rec.agent_id).await;
        Ok(rec.info(self.last_beat(&rec.agent_id)))
    }

    /// Forgets that the agent listens: one that registers again is looked
    /// at afresh before it is placed on.
    pub(super) async fn remove_work_path(&self, agent: &AgentId) {
        self.paths.note(agent, false, common::now_ms());
    }
}
