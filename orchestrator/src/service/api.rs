//! Request handlers that read flows: status, list, explain, optimize, and
//! the controls handed to a flow's actor.

use super::*;

impl Orchestrator {
    pub(super) async fn load(&self, flow: &FlowId) -> Result<(Flow, u64), Error> {
        store::read(&self.flows, flow)
            .await?
            .map(|(f, rev, _)| (f, rev))
            .ok_or_else(|| Error::not_found(format!("no flow {flow}")))
    }

    pub(super) async fn status(&self, flow: &FlowId) -> Result<FlowStatus, Error> {
        let (f, rev) = self.load(flow).await?;
        Ok(off_worker(store::large(&f), || {
            f.status(rev, common::now_ms())
        }))
    }

    pub(super) async fn list(&self, req: FlowListRequest) -> Result<FlowList, Error> {
        let mut flows = Vec::new();
        for id in self.flow_ids().await? {
            if let Ok((f, _)) = self.load(&id).await {
                if req.state.is_none_or(|s| s == f.state) {
                    flows.push(f.summary());
                }
            }
        }
        Ok(FlowList { flows })
    }

    pub(super) async fn flow_ids(&self) -> Result<Vec<FlowId>, Error> {
        // The stream's subjects, not `kv::Store::keys`: that consumer ends
        // early when an entry it was about to deliver is replaced meanwhile
        // (the bucket keeps one revision), so a busy flow went missing from
        // `flow.list` and from sweeps. The subject counts are the server's
        // own snapshot. Flows are never deleted, so no key here is a tombstone.
        // Stopped at the first error, as a listing polled again after one may
        // panic (async-nats 0.51).
        let prefix = self.flows.prefix.as_str();
        let subjects: Vec<(String, usize)> = self
            .flows
            .stream
            .info_with_subjects(format!("{prefix}>"))
            .await
            .map_err(|e| Error::unavailable("list flows", e))?
            .try_collect()
            .await
            .map_err(|e| Error::unavailable("list flows", e))?;
        // Page keys hold a `.`, which no flow id does.
        let mut ids: Vec<FlowId> = subjects
            .into_iter()
            .filter_map(|(subject, _)| FlowId::new(subject.strip_prefix(prefix)?).ok())
            .collect();
        // The listing asks for a second page after the first whole one, at
        // the offset of what it got: a flow created in between makes that
        // page the sorted tail of a list whose first page came unsorted, so
        // it may repeat a flow already listed.
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    /// Every reason each unfinished task (or the one named) is where it is,
    /// with the allocator's word on tasks that wait for placement.
    pub(super) async fn explain(&self, req: ExplainRequest) -> Result<Explanation, Error> {
        let (flow, _) = self.load(&req.flow_id).await?;
        let now = common::now_ms();
        if let Some(t) = &req.task_id {
            if !flow.tasks.contains_key(t) {
                return Err(Error::not_found(format!(
                    "no task {t} in flow {}",
                    req.flow_id
                )));
            }
        }
        let (mut tasks, placement) = flow.explain(req.task_id.as_ref(), now);
        for id in placement {
            let Some(t) = flow.tasks.get(&id) else {
                continue;
            };
            // A task waiting for a slot does not "fit now", whatever is free.
            let mut slot_full = false;
            if let Some(c) = &t.spec.concurrency {
                if let Ok(holders) = self.slots.holders(&c.key).await {
                    if holders.len() >= c.limit as usize {
                        slot_full = true;
                        let names: Vec<&str> = holders.keys().take(5).map(String::as_str).collect();
                        let reason = format!(
                            "concurrency key {} is at its limit: {} of {} slots held (by {})",
                            c.key,
                            holders.len(),
                            c.limit,
                            names.join(", ")
                        );
                        if let Some(x) = tasks.iter_mut().find(|x| x.task_id == id) {
                            x.reasons.push(reason);
                        }
                    }
                }
            }
            let check = CapacityRequest {
                requirements: Some(t.spec.requirements.clone()),
                owner: Some(flow.allocation_owner(&id)),
            };
            let reason = match self.client.capacity(&check).await {
                Ok(c) if quota_reached(&c, &t.spec.requirements).is_some() => {
                    quota_reached(&c, &t.spec.requirements).unwrap_or_default()
                }
                Ok(c) if c.fits == Some(true) && slot_full => {
                    let on: Vec<&str> = c.candidates.iter().take(3).map(|a| a.as_str()).collect();
                    format!(
                        "once a slot frees it fits on {} (free there now)",
                        on.join(", ")
                    )
                }
                Ok(c) if c.fits == Some(true) => {
                    let on: Vec<&str> = c.candidates.iter().take(3).map(|a| a.as_str()).collect();
                    format!("waiting for placement; it fits now on {}", on.join(", "))
                }
                Ok(c) => match c.no_fit {
                    Some(n) => format!("no agent can take it now: {}", n.message),
                    None => "no agent can take it now".to_owned(),
                },
                Err(e) => format!(
                    "waiting for placement; the allocator did not answer ({})",
                    e.code
                ),
            };
            if let Some(x) = tasks.iter_mut().find(|x| x.task_id == id) {
                x.reasons.push(reason);
            }
        }
        Ok(Explanation {
            flow_id: flow.id.clone(),
            state: flow.state,
            tasks,
        })
    }

    /// A plan for the remaining tasks; with `apply`, its priorities are set
    /// through `modify` against the revision planned from (re-planned if the
    /// flow moved on meanwhile).
    pub(super) async fn optimize(
        self: &Arc<Self>,
        req: FlowOptimizeRequest,
    ) -> Result<FlowPlan, Error> {
        const TRIES: usize = 5;
        for _ in 0..TRIES {
            let (flow, revision) = self.load(&req.flow_id).await?;
            let input = self.plan_input(&flow).await?;
            let now = common::now_ms();
            let mut plan = flow.plan(revision, &input, now);
            if !req.apply {
                return Ok(plan);
            }
            if flow.state.is_terminal() {
                return Err(Error::new(
                    ErrorCode::Conflict,
                    format!("flow {} has finished: nothing to apply", flow.id),
                ));
            }
            if plan.priority_changes.is_empty() {
                plan.applied = true;
                plan.status = Some(flow.status(revision, now));
                return Ok(plan);
            }
            let changes = FlowChanges {
                flow_id: flow.id.clone(),
                expected_revision: revision,
                add: Vec::new(),
                add_dependencies: Vec::new(),
                remove: Vec::new(),
                priorities: plan
                    .priority_changes
                    .iter()
                    .map(|c| (c.task_id.clone(), c.to))
                    .collect(),
                inputs: Default::default(),
            };
            match self
                .control(flow.id.clone(), Control::Modify(Box::new(changes)))
                .await
            {
                Ok(status) => {
                    plan.applied = true;
                    plan.status = Some(status);
                    return Ok(plan);
                }
                // The flow moved on (or a task started): plan again.
                Err(e) if matches!(e.code, ErrorCode::Conflict | ErrorCode::ValidationFailed) => {
                    continue
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::new(
            ErrorCode::Conflict,
            format!(
                "flow {} kept changing while the plan was applied ({TRIES} tries); try again",
                req.flow_id
            ),
        ))
    }

    /// What the agents offer `flow` now: per agent, free capacity plus what the
    /// flow itself holds there; per task not started, the agents that could run it.
    pub(super) async fn plan_input(&self, flow: &Flow) -> Result<machine::PlanInput, Error> {
        let pool = self.client.capacity(&CapacityRequest::default()).await?;
        let mut input = machine::PlanInput::default();
        for (agent, resources) in &pool.agents {
            if pool.agent_status.get(agent) != Some(&common::msg::AgentStatus::Active) {
                continue;
            }
            let mut offer: std::collections::BTreeMap<String, f64> = resources
                .iter()
                .map(|(r, c)| (r.clone(), c.free.max(0.0)))
                .collect();
            for t in flow
                .tasks
                .values()
                .filter(|t| t.state.is_active() && t.agent.as_ref() == Some(agent))
            {
                for (r, amount) in &t.spec.requirements.resources {
                    *offer.entry(r.clone()).or_default() += amount;
                }
            }
            input.capacity.insert(agent.clone(), offer);
        }
        let mut known: Vec<(&common::msg::Requirements, Vec<AgentId>)> = Vec::new();
        for t in flow
            .tasks
            .values()
            .filter(|t| matches!(t.state, TaskState::Blocked | TaskState::Ready))
        {
            let req = &t.spec.requirements;
            let agents = match known.iter().find(|(r, _)| *r == req) {
                Some((_, agents)) => agents.clone(),
                None => {
                    let check = CapacityRequest {
                        requirements: Some(req.clone()),
                        ..Default::default()
                    };
                    let agents = self.client.capacity(&check).await?.eligible;
                    known.push((req, agents.clone()));
                    agents
                }
            };
            input.eligible.insert(t.spec.id.clone(), agents);
        }
        Ok(input)
    }

    pub(super) async fn control(
        self: &Arc<Self>,
        flow: FlowId,
        op: Control,
    ) -> Result<FlowStatus, Error> {
        // Answer "not found" here rather than spinning up an actor for nothing.
        self.load(&flow).await?;
        let (reply, answer) = oneshot::channel();
        self.send(&flow, Cmd::Control { op, reply });
        answer
            .await
            .map_err(|_| Error::new(ErrorCode::Unavailable, "orchestrator is shutting down"))?
    }
}

/// Why a quota covering the owner keeps `needs` back, if one does.
pub(super) fn quota_reached(
    c: &common::msg::CapacityStatus,
    needs: &Requirements,
) -> Option<String> {
    c.quotas.iter().find_map(|(holder, q)| {
        needs.resources.iter().find_map(|(r, need)| {
            let limit = *q.limits.get(r)?;
            let used = q.used.get(r).copied().unwrap_or(0.0);
            (used + need > limit + 1e-9).then(|| {
                format!(
                    "owner {holder}'s quota is reached: {used} of {limit} {r} in use, {need} more needed"
                )
            })
        })
    })
}
