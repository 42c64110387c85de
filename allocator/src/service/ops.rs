//! The request checks shared by the handlers, and the capacity handlers:
//! check, reserve, cancel a reservation, adjust, optimise.

use common::msg::{
    AdjustReply, AdjustRequest, CancelReply, CancelReservation, CapacityRequest, CapacityStatus,
    EventKind, OptimizePlan, OptimizeRequest, QuotaExceeded, Requirements, Reservation,
    ReserveRequest,
};
use common::nats::Step;
use common::{Error, ErrorCode, ReservationId};

use super::Allocator;
use crate::machine::{self, Draw, NoFit};

/// Placement decisions retried from fresh state before giving up on contention.
pub(super) const PLACE_ATTEMPTS: usize = 16;
/// Agents that fit looked at per placement in a large pool (see
/// [`machine::sample`]).
pub(super) const PLACEMENT_SAMPLE: usize = 64;
/// Default most moves one optimisation plans.
pub(super) const DEFAULT_MAX_MOVES: usize = 100;

pub(super) fn invalid(m: String) -> Error {
    Error::new(ErrorCode::ValidationFailed, m)
}

pub(super) fn check_requirements(req: &Requirements) -> Result<(), Error> {
    machine::check_amounts(&req.resources).map_err(invalid)
}

pub(super) fn check_owner(owner: &str) -> Result<(), Error> {
    if owner.trim().is_empty() || owner.len() > 256 {
        return Err(invalid("owner must be 1 to 256 characters".into()));
    }
    Ok(())
}

pub(super) fn no_capacity(nofit: &NoFit) -> Error {
    Error::new(ErrorCode::NoCapacity, nofit.message.clone()).with_details(nofit)
}

pub(super) fn quota_exceeded(over: &QuotaExceeded) -> Error {
    Error::new(
        ErrorCode::QuotaExceeded,
        format!(
            "quota of {} exceeded on {}: {} in use, {} asked, limit {}",
            over.quota_owner, over.resource, over.in_use, over.requested, over.limit
        ),
    )
    .with_details(over)
}

/// The longest lease an allocation may ask for: a year.
pub(super) const MAX_TTL_MS: u64 = 365 * 24 * 3_600_000;

pub(super) fn check_ttl(ttl_ms: Option<u64>) -> Result<(), Error> {
    match ttl_ms {
        Some(t) if t == 0 || t > MAX_TTL_MS => Err(invalid(format!(
            "ttl_ms must be between 1 and {MAX_TTL_MS}, not {t}"
        ))),
        _ => Ok(()),
    }
}

/// Refuses a request whose caller has stopped waiting for it: carried out
/// late, it would book behind the caller's back (see `AllocateRequest`).
pub(super) fn past_deadline(deadline_ms: Option<u64>) -> Result<(), Error> {
    let now = common::now_ms();
    match deadline_ms {
        Some(d) if now > d => Err(Error::new(
            ErrorCode::Timeout,
            format!(
                "the request's deadline passed {} ms ago; nothing was booked",
                now - d
            ),
        )),
        _ => Ok(()),
    }
}

pub(super) fn contention() -> Error {
    Error::new(
        ErrorCode::Conflict,
        "too much contention on the agents, gave up",
    )
}

impl Allocator {
    pub(super) async fn capacity(&self, req: CapacityRequest) -> Result<CapacityStatus, Error> {
        if let Some(r) = &req.requirements {
            check_requirements(r)?;
        }
        // Read in place: nothing here writes, and at ten thousand agents a
        // copy of every record per request (the monitor asks every few
        // seconds) is work for nothing.
        let records = self.shared_records();
        let mut status = machine::capacity_status(
            records.iter().map(|r| &**r),
            req.requirements.as_ref(),
            req.owner.as_deref(),
            common::now_ms(),
        );
        status.last_heartbeat_ms = records
            .iter()
            .map(|r| (r.agent_id.clone(), self.last_beat(&r.agent_id)))
            .filter(|(_, at)| *at > 0)
            .collect();
        status.quotas = self.read_quotas().await?.0.report(req.owner.as_deref());
        Ok(status)
    }

    pub(super) async fn reserve(&self, req: ReserveRequest) -> Result<Reservation, Error> {
        check_owner(&req.owner)?;
        check_requirements(&req.requirements)?;
        let now = common::now_ms();
        if req.end_ms <= req.start_ms {
            return Err(invalid("end_ms must be after start_ms".into()));
        }
        if req.end_ms <= now {
            return Err(invalid("the window is already over".into()));
        }
        for _ in 0..PLACE_ATTEMPTS {
            let now = common::now_ms();
            let records = self.records();
            let agent = match &req.agent_id {
                Some(id) => {
                    let rec = records
                        .iter()
                        .find(|r| &r.agent_id == id)
                        .ok_or_else(|| Error::not_found(format!("no agent {id}")))?;
                    machine::place_reservation(
                        [rec],
                        &req.requirements,
                        req.start_ms,
                        req.end_ms,
                        now,
                    )
                }
                None => machine::place_reservation(
                    &records,
                    &req.requirements,
                    req.start_ms,
                    req.end_ms,
                    now,
                ),
            }
            .map_err(|n| no_capacity(&n))?
            .agent_id
            .clone();
            let reservation = Reservation {
                reservation_id: ReservationId::random(),
                agent_id: agent.clone(),
                owner: req.owner.clone(),
                resources: req.requirements.resources.clone(),
                start_ms: req.start_ms,
                end_ms: req.end_ms,
                created_at_ms: now,
            };
            let booked = self
                .update_agent(&agent, |mut rec| {
                    if rec
                        .fit_reservation(&req.requirements, req.start_ms, req.end_ms, now)
                        .is_err()
                    {
                        return Ok(Step::Keep(false));
                    }
                    rec.reservations
                        .insert(reservation.reservation_id.clone(), reservation.clone());
                    Ok(Step::Write(rec, true))
                })
                .await?;
            if booked {
                self.events
                    .publish(EventKind::ReservationMade {
                        reservation_id: reservation.reservation_id.clone(),
                        agent_id: agent,
                        owner: reservation.owner.clone(),
                        start_ms: reservation.start_ms,
                        end_ms: reservation.end_ms,
                        resources: reservation.resources.clone(),
                    })
                    .await;
                return Ok(reservation);
            }
        }
        Err(contention())
    }

    pub(super) async fn cancel_reservation(
        &self,
        req: CancelReservation,
    ) -> Result<CancelReply, Error> {
        let agent = req.agent_id.clone().or_else(|| {
            self.records()
                .into_iter()
                .find(|r| r.reservations.contains_key(&req.reservation_id))
                .map(|r| r.agent_id)
        });
        let none = CancelReply {
            cancelled: false,
            released: vec![],
        };
        let Some(agent) = agent else {
            return Ok(none);
        };
        let outcome = self
            .update_agent(&agent, |mut rec| {
                Ok(match rec.cancel_reservation(&req.reservation_id) {
                    Some(out) => Step::Write(rec, Some(out)),
                    None => Step::Keep(None),
                })
            })
            .await;
        let (reservation, drawn) = match outcome {
            Ok(Some(out)) => out,
            Ok(None) => return Ok(none),
            Err(e) if e.code == ErrorCode::NotFound => return Ok(none),
            Err(e) => return Err(e),
        };
        self.forget(&drawn).await;
        self.reservations_ended(std::slice::from_ref(&reservation), "cancelled")
            .await;
        self.preempted(&drawn, "reservation_ended").await;
        Ok(CancelReply {
            cancelled: true,
            released: drawn,
        })
    }

    pub(super) async fn adjust(&self, req: AdjustRequest) -> Result<AdjustReply, Error> {
        machine::check_amounts(&req.capacity).map_err(invalid)?;
        let now = common::now_ms();
        let reply = self
            .update_agent(&req.agent_id, |rec| {
                let shrink = machine::shrink_to_fit(&rec.with_capacity(&req.capacity), now);
                let overflow = !shrink.evicted.is_empty() || !shrink.dropped.is_empty();
                let mut reply = AdjustReply {
                    applied: req.preempt || !overflow,
                    capacity: shrink.record.capacity.clone(),
                    no_longer_fit: shrink.evicted.clone(),
                    reservations_no_longer_fit: shrink.dropped.clone(),
                    preempted: vec![],
                };
                if !reply.applied {
                    reply.capacity = rec.capacity.clone();
                    return Ok(Step::Keep(reply));
                }
                reply.preempted = shrink.evicted.clone();
                Ok(Step::Write(shrink.record, reply))
            })
            .await?;
        if reply.applied {
            self.events
                .publish(EventKind::CapacityAdjusted {
                    agent_id: req.agent_id.clone(),
                    capacity: reply.capacity.clone(),
                })
                .await;
            self.forget(&reply.preempted).await;
            self.preempted(&reply.preempted, "capacity_reduced").await;
            self.reservations_ended(&reply.reservations_no_longer_fit, "capacity_reduced")
                .await;
        }
        Ok(reply)
    }

    pub(super) async fn optimize(&self, req: OptimizeRequest) -> Result<OptimizePlan, Error> {
        let now = common::now_ms();
        let max_moves = req.max_moves.unwrap_or(DEFAULT_MAX_MOVES).min(10_000);
        let (moves, before, mut after) = machine::plan(&self.records(), max_moves, now);
        let mut applied = Vec::new();
        if req.apply {
            for m in &moves {
                if self.apply_move(m, now).await? {
                    applied.push(m.allocation_id.clone());
                }
            }
            after = machine::utilisation(&self.records(), common::now_ms());
        }
        Ok(OptimizePlan {
            moves,
            before,
            after,
            applied,
        })
    }

    /// Moves one allocation: books it on the destination first, then removes it
    /// from the source (so it is never held nowhere); if the source no longer
    /// has it (released meanwhile), the destination copy is removed again.
    pub(super) async fn apply_move(&self, m: &common::msg::Move, now: u64) -> Result<bool, Error> {
        let Some((src, _)) = self.cache.get(&m.from) else {
            return Ok(false);
        };
        let Some(original) = src.allocations.get(&m.allocation_id).cloned() else {
            return Ok(false);
        };
        if !original.movable || original.pending || original.reservation_id.is_some() {
            return Ok(false);
        }
        let req = machine::requirements_of(&original);
        let booked = self
            .update_agent(&m.to, |mut rec| {
                if rec.fit(&req, None, now) != Ok(Draw::General) {
                    return Ok(Step::Keep(false));
                }
                let mut moved = original.clone();
                moved.agent_id = rec.agent_id.clone();
                rec.allocations.insert(moved.allocation_id.clone(), moved);
                Ok(Step::Write(rec, true))
            })
            .await?;
        if !booked {
            return Ok(false);
        }
        let removed = self
            .update_agent(&m.from, |mut rec| {
                Ok(match rec.allocations.remove(&m.allocation_id) {
                    Some(_) => Step::Write(rec, true),
                    None => Step::Keep(false),
                })
            })
            .await
            .unwrap_or(false);
        if !removed {
            self.update_agent(&m.to, |mut rec| {
                Ok(match rec.allocations.remove(&m.allocation_id) {
                    Some(_) => Step::Write(rec, ()),
                    None => Step::Keep(()),
                })
            })
            .await?;
            return Ok(false);
        }
        self.events
            .publish(EventKind::AllocationMoved {
                allocation_id: m.allocation_id.clone(),
                owner: m.owner.clone(),
                from: m.from.clone(),
                to: m.to.clone(),
            })
            .await;
        Ok(true)
    }
}
