//! Allocations handed on: a task that succeeded leaves its allocation with
//! its replica for [`Config::keep_allocation_ms`], and the next task placed
//! here with the same owner, requirements and priority runs on it, with
//! nothing booked and nothing released in between.
//!
//! A client that runs one short flow after another (an agent loop) then
//! waits on no booking: the allocate request, its compare-and-set on the
//! agent's record and the quota read all leave the task's path, and the
//! release of the one before with them. An allocation nobody takes in time
//! is released as any other; so is, at once, every one kept for another
//! kind of task than one that finds no capacity.
//!
//! The allocator learns of the new holder from a request sent once the task
//! is placed on it: an allocate with the kept allocation's id and the new
//! task, which binds the allocation to that task (and its owner) with one
//! compare-and-set off the task's path. Until then the task that succeeded
//! vouches for it ([`machine::HAND_ON_VOUCH_MS`]), so the reconciliation
//! does not take it back; and the reconciliation takes an allocation back
//! only while it is still bound to the task it asked about. Should the
//! allocation be gone by then (preempted, its agent lost), or bound where
//! quotas would count it differently, the attempt on it is preempted and
//! placed again as usual. A replica that dies with allocations kept leaves
//! them bound to tasks that ended: the reconciliation takes them back once
//! the vouching is over.

use super::*;

/// Attempts at telling the allocator of a hand-on that gets no answer.
const HAND_ON_ATTEMPTS: u32 = 8;
/// A task still running this long after it took an allocation is bound to
/// it at the allocator; one that ended sooner never is (its allocation is
/// kept again or given back). A short task's path then waits on no write of
/// the agent's record either, not even beside it.
const BIND_AFTER_MS: u64 = 20;
/// A task taking an allocation whose binding at the allocator is to a task
/// that ended this long ago is bound at once: well inside the time that
/// task vouches for it ([`machine::HAND_ON_VOUCH_MS`]), however many short
/// tasks it passed through meanwhile.
const BIND_FLOOR_MS: u64 = 2_000;

/// One allocation kept to hand on.
struct Kept {
    agent: AgentId,
    allocation: AllocationId,
    until_ms: u64,
}

/// An allocation this replica kept or handed on, until it is given back.
struct Handed {
    agent: AgentId,
    /// How many times it was taken: its holder is the last taker.
    takes: u64,
    /// The take the allocator has it bound to (0: the task it was booked for).
    bound: u64,
    /// When that task ended; none while it runs.
    bound_ended_ms: Option<u64>,
    /// Whether it is kept now (its last holder ended).
    kept: bool,
    /// The request that binds it to its last holder.
    bind: Option<AllocateRequest>,
}

/// When to bind an allocation just taken to its new holder.
enum Bind {
    Now(Box<AllocateRequest>, AgentId),
    After(u64),
    Never,
}

#[derive(Default)]
struct Inner {
    /// Kept, by [`spare_key`].
    kept: HashMap<String, Vec<Kept>>,
    handed: HashMap<AllocationId, Handed>,
}

/// The allocations this replica keeps and has handed on.
#[derive(Default)]
pub(super) struct Spares(Mutex<Inner>);

/// What an allocation may be handed on between: the owner its flow names
/// (an allocation owner less its `{flow}/{task}`), the priority and the
/// requirements. `None` if the requirements cannot be told apart.
fn spare_key(owner: &str, requirements: &Requirements, priority: i32) -> Option<String> {
    let flow_owner = owner.rsplitn(3, '/').nth(2).unwrap_or("");
    let requirements = serde_json::to_string(requirements).ok()?;
    Some(format!("{priority}|{flow_owner}|{requirements}"))
}

impl Spares {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `kept`, whose holder ended at `now_ms`.
    fn keep(&self, key: String, kept: Kept, now_ms: u64) {
        let mut inner = self.lock();
        let h = inner
            .handed
            .entry(kept.allocation.clone())
            .or_insert_with(|| Handed {
                agent: kept.agent.clone(),
                takes: 0,
                bound: 0,
                bound_ended_ms: None,
                kept: false,
                bind: None,
            });
        h.kept = true;
        if h.bound == h.takes {
            h.bound_ended_ms = Some(now_ms);
        }
        inner.kept.entry(key).or_default().push(kept);
    }

    /// The most recently kept allocation for `key` still in its time.
    fn take(&self, key: &str, now_ms: u64) -> Option<(AgentId, AllocationId)> {
        let mut inner = self.lock();
        let kept = inner.kept.get_mut(key)?;
        // One out of time stays for its own timer to give back.
        let i = kept.iter().rposition(|k| k.until_ms > now_ms)?;
        let found = kept.remove(i);
        if kept.is_empty() {
            inner.kept.remove(key);
        }
        Some((found.agent, found.allocation))
    }

    /// `bind`'s allocation was taken by its task: when to bind it there.
    fn taken(&self, bind: AllocateRequest, now_ms: u64) -> Bind {
        let Some(id) = bind.allocation_id.clone() else {
            return Bind::Never;
        };
        let mut inner = self.lock();
        let Some(h) = inner.handed.get_mut(&id) else {
            return Bind::Never;
        };
        h.takes += 1;
        h.kept = false;
        h.bind = Some(bind.clone());
        let stale = h
            .bound_ended_ms
            .is_some_and(|ended| now_ms.saturating_sub(ended) >= BIND_FLOOR_MS);
        if stale {
            h.bound = h.takes;
            h.bound_ended_ms = None;
            Bind::Now(Box::new(bind), h.agent.clone())
        } else {
            Bind::After(h.takes)
        }
    }

    /// The binding due for take `take` of `id`, if that taker still holds it.
    fn due(&self, id: &AllocationId, take: u64) -> Option<(AllocateRequest, AgentId)> {
        let mut inner = self.lock();
        let h = inner.handed.get_mut(id)?;
        if h.takes != take || h.kept {
            return None;
        }
        h.bound = take;
        h.bound_ended_ms = None;
        Some((h.bind.clone()?, h.agent.clone()))
    }

    /// Takes `allocation` out of those kept if its time is up at `now_ms`;
    /// false if it was taken, or kept again since (by a later holder that
    /// ended: the timer of that keep gives it back).
    fn remove(&self, key: &str, allocation: &AllocationId, now_ms: u64) -> bool {
        let mut inner = self.lock();
        let Some(kept) = inner.kept.get_mut(key) else {
            return false;
        };
        let before = kept.len();
        kept.retain(|k| &k.allocation != allocation || k.until_ms > now_ms);
        let removed = kept.len() < before;
        if kept.is_empty() {
            inner.kept.remove(key);
        }
        removed
    }

    /// Forgets `allocation` (given back, or not to be handed on again).
    pub(super) fn forget(&self, allocation: &AllocationId) {
        let mut inner = self.lock();
        if inner.handed.remove(allocation).is_some() {
            for kept in inner.kept.values_mut() {
                kept.retain(|k| &k.allocation != allocation);
            }
            inner.kept.retain(|_, kept| !kept.is_empty());
        }
    }

    /// Forgets `allocation` because the allocator took it away, and says
    /// which task holds it, if one does and the allocator may not know
    /// (its binding lags, see [`BIND_AFTER_MS`]).
    fn taken_away(&self, allocation: &AllocationId) -> Option<common::msg::TaskRef> {
        let holder = {
            let inner = self.lock();
            let h = inner.handed.get(allocation)?;
            (!h.kept && h.bound != h.takes)
                .then(|| h.bind.as_ref().and_then(|b| b.task.clone()))
                .flatten()
        };
        self.forget(allocation);
        holder
    }

    /// The allocations on `agent`, forgotten (the agent is gone), with the
    /// tasks holding them that the allocator may not know of.
    fn agent_gone(&self, agent: &AgentId) -> Vec<common::msg::TaskRef> {
        let ids: Vec<AllocationId> = {
            let inner = self.lock();
            inner
                .handed
                .iter()
                .filter(|(_, h)| &h.agent == agent)
                .map(|(id, _)| id.clone())
                .collect()
        };
        ids.iter().filter_map(|id| self.taken_away(id)).collect()
    }

    /// The allocations kept on `agent`, taken out.
    fn take_kept_on(&self, agent: &AgentId) -> Vec<AllocationId> {
        let mut inner = self.lock();
        let mut taken = Vec::new();
        for kept in inner.kept.values_mut() {
            kept.retain(|k| {
                let on = &k.agent == agent;
                if on {
                    taken.push(k.allocation.clone());
                }
                !on
            });
        }
        inner.kept.retain(|_, kept| !kept.is_empty());
        for id in &taken {
            inner.handed.remove(id);
        }
        taken
    }

    /// The allocations kept under any key but `key`, taken out.
    fn take_kept_but(&self, key: Option<&str>) -> Vec<(AgentId, AllocationId)> {
        let mut inner = self.lock();
        let others: Vec<String> = inner
            .kept
            .keys()
            .filter(|k| Some(k.as_str()) != key)
            .cloned()
            .collect();
        let mut taken = Vec::new();
        for k in others {
            taken.extend(inner.kept.remove(&k).into_iter().flatten());
        }
        for k in &taken {
            inner.handed.remove(&k.allocation);
        }
        taken.into_iter().map(|k| (k.agent, k.allocation)).collect()
    }

    /// Every allocation kept, taken out.
    fn drain(&self) -> Vec<(AgentId, AllocationId)> {
        let mut inner = self.lock();
        let kept: Vec<Kept> = inner.kept.drain().flat_map(|(_, kept)| kept).collect();
        for k in &kept {
            inner.handed.remove(&k.allocation);
        }
        kept.into_iter().map(|k| (k.agent, k.allocation)).collect()
    }
}

impl Orchestrator {
    /// Gives an allocation back, or keeps it to hand on when its task
    /// succeeded with it (`hand_on`) and keeping is on.
    pub(super) fn release_or_keep(
        self: &Arc<Self>,
        agent: AgentId,
        allocation: AllocationId,
        hand_on: Option<machine::HandOn>,
    ) {
        let key = hand_on
            .filter(|_| !self.keep.is_zero() && !self.stopping.load(Ordering::Relaxed))
            .and_then(|h| spare_key(&h.owner, &h.requirements, h.priority));
        let Some(key) = key else {
            self.spares.forget(&allocation);
            self.release(agent, allocation);
            return;
        };
        let now = common::now_ms();
        let until_ms = now.saturating_add(self.keep.as_millis() as u64);
        let kept = Kept {
            agent: agent.clone(),
            allocation: allocation.clone(),
            until_ms,
        };
        self.spares.keep(key.clone(), kept, now);
        // A task held back for capacity may take it now.
        self.freed.fetch_add(1, Ordering::Relaxed);
        let o = self.clone();
        let expire = async move {
            tokio::time::sleep(o.keep).await;
            if o.spares.remove(&key, &allocation, common::now_ms()) {
                o.spares.forget(&allocation);
                o.release(agent, allocation);
            }
        };
        tokio::spawn(expire.in_current_span());
    }

    /// `request` found no capacity (or no room in a quota): the allocations
    /// kept for other tasks than its kind are given back at once, so capacity
    /// kept idle never holds back a task that cannot take it. Those kept for
    /// its kind stay: its next try takes one.
    pub(super) fn give_back_spares_for(self: &Arc<Self>, request: &AllocateRequest) {
        let key = spare_key(&request.owner, &request.requirements, request.priority);
        for (agent, allocation) in self.spares.take_kept_but(key.as_deref()) {
            self.release(agent, allocation);
        }
    }

    /// An allocation kept for `request`'s task, as its grant, and the
    /// request that binds it to the task (for [`Self::handed_on`], once the
    /// grant is on its way to the flow's actor). `None` if none is kept for
    /// it. The caller asks only for a task not asked for before: one asked
    /// again must get back the booking it was asked for with (its id).
    pub(super) fn take_spare(
        &self,
        request: &AllocateRequest,
    ) -> Option<(Allocation, AllocateRequest)> {
        request.task.as_ref()?;
        let key = spare_key(&request.owner, &request.requirements, request.priority)?;
        let now = common::now_ms();
        let (agent, id) = self.spares.take(&key, now)?;
        let bind = AllocateRequest {
            allocation_id: Some(id.clone()),
            deadline_ms: None,
            ..request.clone()
        };
        let grant = Allocation {
            allocation_id: id,
            agent_id: agent,
            owner: request.owner.clone(),
            resources: request.requirements.resources.clone(),
            priority: request.priority,
            created_at_ms: now,
            reservation_id: None,
            anti_affinity: None,
            movable: false,
            capabilities: Vec::new(),
            labels: Default::default(),
            gang_id: None,
            pending: false,
            task: request.task.clone(),
            ttl_ms: None,
            expires_at_ms: None,
            bound_at_ms: Some(now),
        };
        Some((grant, bind))
    }

    /// A kept allocation went to the task `bind` names, its grant queued to
    /// the flow's actor: the allocator is told once the task has run for
    /// [`BIND_AFTER_MS`] (see [`BIND_FLOOR_MS`] for when at once).
    pub(super) fn handed_on(self: &Arc<Self>, bind: AllocateRequest) {
        let id = bind.allocation_id.clone();
        match (self.spares.taken(bind, common::now_ms()), id) {
            (Bind::Now(bind, agent), _) => {
                tokio::spawn(self.clone().hand_on(*bind, agent).in_current_span());
            }
            (Bind::After(take), Some(id)) => {
                let o = self.clone();
                let later = async move {
                    tokio::time::sleep(Duration::from_millis(BIND_AFTER_MS)).await;
                    if let Some((bind, agent)) = o.spares.due(&id, take) {
                        o.hand_on(bind, agent).await;
                    }
                };
                tokio::spawn(later.in_current_span());
            }
            _ => {}
        }
    }

    /// Binds a handed-on allocation to its holder at the allocator. If the
    /// allocation is gone, or another agent's booking comes back, or quotas
    /// forbid the hand-over, the attempt on it is taken back uncounted (and
    /// the task placed again) and what was booked is given back.
    async fn hand_on(self: Arc<Self>, bind: AllocateRequest, agent: AgentId) {
        let (Some(id), Some(task)) = (bind.allocation_id.clone(), bind.task.clone()) else {
            return;
        };
        let mut pause = Duration::from_millis(100);
        let why = 'bound: {
            for attempt in 1..=HAND_ON_ATTEMPTS {
                match self.client.allocate(&bind).await {
                    Ok(a) if a.agent_id == agent => return,
                    Ok(a) => {
                        // Gone, and booked anew on another agent: not the one
                        // the attempt was sent to.
                        self.release(a.agent_id, a.allocation_id);
                        break 'bound format!("allocation {id} was gone before it was handed on");
                    }
                    Err(e)
                        if attempt < HAND_ON_ATTEMPTS
                            && matches!(e.code, ErrorCode::Timeout | ErrorCode::Unavailable) =>
                    {
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(10));
                    }
                    Err(e) => {
                        // Still there but not to be handed on (or unknown):
                        // given back.
                        if e.code != ErrorCode::NotFound {
                            self.release(agent.clone(), id.clone());
                        }
                        break 'bound format!("allocation {id} was not handed on: {}", e.message);
                    }
                }
            }
            return;
        };
        self.spares.forget(&id);
        tracing::info!(flow = %task.flow_id, task = %task.task_id, allocation = %id, why, "hand-on refused, placing the task again");
        self.send(
            &task.flow_id,
            Cmd::NotHandedOn {
                task: task.task_id,
                allocation: id,
                reason: why,
            },
        );
    }

    /// The allocator took `allocation` away (preempted): it is not handed on
    /// again, and a task running on it that the allocator does not know of
    /// is told as the one it knows of is.
    pub(super) fn allocation_taken_away(self: &Arc<Self>, allocation: &AllocationId, reason: &str) {
        if let Some(task) = self.spares.taken_away(allocation) {
            let cmd = Cmd::Preempted {
                task: task.task_id,
                allocation: allocation.clone(),
                reason: reason.to_owned(),
            };
            self.send(&task.flow_id, cmd);
        }
    }

    /// `agent` is gone (lost, left): what it held here is not handed on,
    /// and the flows of tasks running on it that the allocator does not
    /// know of are told.
    pub(super) fn agent_taken_away(self: &Arc<Self>, agent: &AgentId, left: bool) {
        for task in self.spares.agent_gone(agent) {
            self.send(&task.flow_id, Cmd::AgentGone(agent.clone(), left));
        }
    }

    /// `agent` drains (deregistered): it takes no new work, so what is kept
    /// on it is given back rather than handed on.
    pub(super) fn agent_draining(self: &Arc<Self>, agent: &AgentId) {
        for id in self.spares.take_kept_on(agent) {
            self.release(agent.clone(), id);
        }
    }

    /// Gives back every allocation kept (the replica is stopping).
    pub(super) async fn release_kept(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        let kept = self.spares.drain();
        futures::future::join_all(
            kept.into_iter()
                .map(|(agent, id)| self.release_by_id(id, Some(agent))),
        )
        .await;
    }
}

#[cfg(test)]
mod tests;
