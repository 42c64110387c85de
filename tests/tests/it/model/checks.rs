//! The invariants, read back from the services: after every step, with the
//! state held still, and once the actions stop.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::msg::{
    CapacityRequest, EventKind, ExplainRequest, FlowListRequest, FlowState, TaskState,
};
use common::FlowId;

use super::harness::{self, Sys, Violations};
use super::{status, Model, FINISH_WITHIN};

/// After every step: what the watchdog and the agents saw, every flow listed
/// in the state the operator left it in, and `explain` giving a reason for
/// every unfinished task.
pub(super) async fn check(sys: &Sys, model: &Model, found: &Violations) -> Result<(), String> {
    if let Some(v) = found.take().into_iter().next() {
        return Err(v);
    }
    if let Some(v) = sys.runs.overlaps().into_iter().next() {
        return Err(v);
    }
    let list = sys
        .client
        .list_flows(&FlowListRequest::default())
        .await
        .map_err(|e| format!("flow.list: {e}"))?;
    if list.flows.len() != model.flows.len() {
        return Err(format!(
            "flow.list has {} flows, {} were created",
            list.flows.len(),
            model.flows.len()
        ));
    }
    for f in &model.flows {
        let Some(listed) = list.flows.iter().find(|l| l.flow_id == f.id) else {
            return Err(format!("flow {} is not listed", f.id));
        };
        let want = if f.cancelled {
            Some(FlowState::Cancelled)
        } else if f.paused {
            Some(FlowState::Paused)
        } else {
            None
        };
        if want.is_some_and(|w| w != listed.state)
            || (want.is_none() && matches!(listed.state, FlowState::Paused | FlowState::Cancelled))
        {
            return Err(format!(
                "flow {} is {}, the operator left it {}",
                f.id,
                listed.state,
                want.map_or("running", |w| w.as_str())
            ));
        }
        if listed.state.is_terminal() {
            continue;
        }
        let why = sys
            .client
            .explain_flow(&ExplainRequest {
                flow_id: f.id.clone(),
                task_id: None,
            })
            .await
            .map_err(|e| format!("flow.explain {}: {e}", f.id))?;
        if let Some(t) = why
            .tasks
            .iter()
            .find(|t| !t.state.is_terminal() && t.reasons.is_empty())
        {
            return Err(format!(
                "flow.explain {} gives no reason for task {} ({})",
                f.id, t.task_id, t.state
            ));
        }
    }
    Ok(())
}

/// Every agent's booked cpu is exactly what the flows' assigned and running
/// tasks on it hold: nothing booked without an owner, no task without its
/// booking. Finished work is held back meanwhile so the state stands still;
/// a read is used when the flows did not change around the capacity read.
pub(super) async fn check_booked(sys: &Sys) -> Result<(), String> {
    sys.hold(true);
    let r = booked_matches(
        sys,
        Duration::from_secs(20) + Duration::from_millis(harness::RECONCILE_GRACE_MS),
    )
    .await;
    sys.hold(false);
    r
}

async fn booked_matches(sys: &Sys, within: Duration) -> Result<(), String> {
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < within {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Ok((revisions, held)) = holdings(sys).await else {
            continue;
        };
        let Ok(capacity) = sys.client.capacity(&CapacityRequest::default()).await else {
            continue;
        };
        let Ok((again, _)) = holdings(sys).await else {
            continue;
        };
        if again != revisions {
            continue;
        }
        let booked: BTreeMap<String, f64> = capacity
            .agents
            .iter()
            .map(|(a, r)| (a.to_string(), r.get("cpu").map_or(0.0, |c| c.allocated)))
            .filter(|(_, c)| *c > 0.0)
            .collect();
        if booked == held {
            return Ok(());
        }
        last = format!("booked cpu per agent {booked:?}, held by tasks {held:?}");
    }
    Err(format!(
        "allocations do not match the tasks holding them after {within:?}: {last}"
    ))
}

/// Every flow's revision, and the cpu its active tasks hold per agent.
async fn holdings(
    sys: &Sys,
) -> Result<(BTreeMap<FlowId, u64>, BTreeMap<String, f64>), common::Error> {
    let list = sys.client.list_flows(&FlowListRequest::default()).await?;
    let mut revisions = BTreeMap::new();
    let mut held = BTreeMap::new();
    for f in list.flows {
        let s = sys.client.flow_status(&f.flow_id).await?;
        revisions.insert(f.flow_id, s.revision);
        for t in s.tasks.iter().filter(|t| t.state.is_active()) {
            if let Some(a) = &t.agent_id {
                *held.entry(a.to_string()).or_insert(0.0) += 1.0;
            }
        }
    }
    Ok((revisions, held))
}

/// Once the actions stop: every flow finishes (paused ones resumed), nothing
/// stays booked, and the monitor's counts match the flows.
pub(super) async fn finish(sys: &Sys, model: &Model, found: &Violations) -> Result<(), String> {
    for f in model.flows.iter().filter(|f| f.paused) {
        sys.client
            .resume_flow(&f.id)
            .await
            .map_err(|e| format!("resume {}: {e}", f.id))?;
    }
    let started = Instant::now();
    let statuses = loop {
        if let Some(v) = found.take().into_iter().next() {
            return Err(v);
        }
        let mut all = Vec::new();
        for f in &model.flows {
            all.push(status(sys, &f.id).await?);
        }
        if all.iter().all(|s| s.state.is_terminal()) {
            break all;
        }
        if started.elapsed() > FINISH_WITHIN {
            let open: Vec<String> = all
                .iter()
                .filter(|s| !s.state.is_terminal())
                .map(|s| format!("{} {} {:?}", s.flow_id, s.state, s.counts))
                .collect();
            return Err(format!(
                "flows not finished {FINISH_WITHIN:?} after the last step: {open:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    if let Some(v) = sys.runs.overlaps().into_iter().next() {
        return Err(v);
    }
    booked_matches(
        sys,
        Duration::from_secs(15) + Duration::from_millis(harness::RECONCILE_GRACE_MS),
    )
    .await?;
    no_completion_twice(sys)?;
    let created = model.flows.len() as u64;
    let completed = statuses.len() as u64 + model.reran_finished;
    let completed_hi = completed + model.reran_maybe_finished;
    let succeeded: u64 = statuses
        .iter()
        .map(|s| s.counts.get(&TaskState::Succeeded).copied().unwrap_or(0) as u64)
        .sum();
    let lo = succeeded + model.reset_succeeded;
    let hi = lo + model.reset_maybe;
    let started = Instant::now();
    loop {
        let m = sys
            .client
            .metrics()
            .await
            .map_err(|e| format!("metrics: {e}"))?;
        if m.flows_created == created
            && (completed..=completed_hi).contains(&m.flows_completed)
            && (lo..=hi).contains(&m.tasks_completed)
            && m.flows_rerun == model.reruns
        {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(15) {
            return Err(format!(
                "metrics say {} created, {} completed, {} tasks completed, {} re-runs; the flows say \
                 {created} created, {completed}..={completed_hi} completed ({} re-runs of finished flows), \
                 {lo}..={hi} tasks completed, {} re-runs",
                m.flows_created, m.flows_completed, m.tasks_completed, m.flows_rerun,
                model.reran_finished, model.reruns
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A flow completes once per run: no more `flow.completed` events than its
/// creation and the re-runs that found it finished (`was_finished`).
fn no_completion_twice(sys: &Sys) -> Result<(), String> {
    let mut runs: BTreeMap<String, (i64, Vec<String>)> = BTreeMap::new();
    for e in sys.flow_events.lock().unwrap().iter() {
        match &e.kind {
            EventKind::FlowCompleted { flow_id, state } => {
                let r = runs.entry(flow_id.to_string()).or_insert((1, Vec::new()));
                r.0 -= 1;
                r.1.push(format!("completed {state} ({})", e.event_id));
            }
            EventKind::FlowRerun {
                flow_id,
                task_id,
                was_finished,
                ..
            } => {
                let r = runs.entry(flow_id.to_string()).or_insert((1, Vec::new()));
                r.0 += i64::from(*was_finished);
                r.1.push(format!("rerun {task_id} (was finished: {was_finished})"));
            }
            _ => {}
        }
    }
    match runs.into_iter().find(|(_, (open, _))| *open < 0) {
        Some((flow, (_, seen))) => Err(format!(
            "flow {flow} completed more often than it ran: {seen:?}"
        )),
        None => Ok(()),
    }
}
