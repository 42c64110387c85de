//! Model-based operator test: seeded random sequences of what an operator
//! does (create, pause, resume, modify, re-run, cancel, optimise --apply,
//! capacity adjust, agent drain and kill, orchestrator replica kill) against
//! real services with agents, with the invariants checked after every step
//! by reading the services' own answers (`flow.list`, `flow.status`,
//! `flow.explain`, `capacity.check`, `monitor.metrics`), never the model's.
//!
//! The model is only what the operator did: which flows exist, which were
//! paused or cancelled, how many finished flows were re-run. It picks valid
//! and deliberately invalid actions and says what each reply must be (a
//! pause of a finished flow is refused with `conflict`, not applied).
//!
//! A seed fixes the actions, not the timing: the same seed may interleave
//! differently on another run. `COORD_MODEL_SEED=n` runs one seed,
//! `COORD_MODEL_SEEDS=1,2,3` several, `COORD_MODEL_STEPS` sets the steps per
//! seed; a failure prints the seed and the command that runs it again.

mod checks;
mod harness;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use checks::{check, check_booked, finish};
use common::msg::{
    FlowChanges, FlowListRequest, FlowOptimizeRequest, FlowSpec, FlowState, FlowStatus,
    Requirements, RerunRequest, RetryPolicy, TaskSpec, TaskState, Timeouts,
};
use common::{AgentId, ErrorCode, FlowId, TaskId};
use harness::{watchdog, Rng, Sys, Violations};
use serde_json::json;

/// The seeds CI runs, and the steps per seed.
const CI_SEEDS: &[u64] = &[5, 6, 8];
const CI_STEPS: usize = 24;
/// Unfinished flows at most, so that tasks rarely wait on each other for cpu.
const MAX_OPEN_FLOWS: usize = 4;
/// Agents taking placements; a drained or killed one is replaced.
const AGENTS: usize = 3;
/// How long every flow has to finish once the actions stop.
const FINISH_WITHIN: Duration = Duration::from_secs(60);

/// A flow as the operator knows it.
struct MFlow {
    id: FlowId,
    /// Each task's dependencies, for what a re-run resets.
    deps: BTreeMap<TaskId, Vec<TaskId>>,
    paused: bool,
    cancelled: bool,
}

#[derive(Default)]
struct Model {
    flows: Vec<MFlow>,
    /// Re-runs applied (each a `flow.rerun` event), and those of flows that
    /// had finished: each of these makes one more completion.
    reruns: u64,
    reran_finished: u64,
    /// Re-runs of flows read unfinished just before: one may have finished
    /// in between, and then it completes once more.
    reran_maybe_finished: u64,
    /// Succeeded tasks a re-run reset (each completes again), and tasks it
    /// reset that might have succeeded just before it.
    reset_succeeded: u64,
    reset_maybe: u64,
    /// Agents taking placements, and drained ones still running.
    live: Vec<String>,
    drained: Vec<String>,
    next: usize,
}

fn tid(s: &str) -> TaskId {
    TaskId::new(s).unwrap()
}

fn seeds() -> (Vec<u64>, usize) {
    let parse =
        |v: String| -> Vec<u64> { v.split(',').filter_map(|s| s.trim().parse().ok()).collect() };
    let seeds = std::env::var("COORD_MODEL_SEED")
        .ok()
        .map(parse)
        .or_else(|| std::env::var("COORD_MODEL_SEEDS").ok().map(parse))
        .unwrap_or_else(|| CI_SEEDS.to_vec());
    let steps = std::env::var("COORD_MODEL_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(CI_STEPS);
    (seeds, steps)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_random_operator_actions_keep_the_invariants() {
    let (seeds, steps) = seeds();
    for seed in seeds {
        let started = Instant::now();
        let mut history = Vec::new();
        if let Err((step, msg)) = run_seed(seed, steps, &mut history).await {
            let tail: Vec<String> = history.iter().rev().take(12).rev().cloned().collect();
            panic!(
                "model test failed: seed {seed}, step {step} of {steps}: {msg}\n\
                 last actions:\n  {}\n\
                 reproduce: COORD_MODEL_SEED={seed} COORD_MODEL_STEPS={steps} \
                 cargo nextest run -p tests --test it model",
                tail.join("\n  ")
            );
        }
        eprintln!(
            "model seed {seed}: {steps} steps passed in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
}

async fn run_seed(
    seed: u64,
    steps: usize,
    history: &mut Vec<String>,
) -> Result<(), (usize, String)> {
    let mut rng = Rng::new(seed);
    let mut sys = Sys::start(AGENTS).await;
    let mut model = Model {
        live: sys.agents.keys().cloned().collect(),
        ..Default::default()
    };
    let found = Violations::default();
    let dog = tokio::spawn(watchdog(sys.client.clone(), found.clone()));
    let result = async {
        for step in 1..=steps {
            let done = act(&mut sys, &mut model, &mut rng, seed)
                .await
                .map_err(|e| (step, e))?;
            history.push(format!("{step}: {done}"));
            // Time passes between an operator's actions.
            tokio::time::sleep(Duration::from_millis(rng.range(200, 900))).await;
            check(&sys, &model, &found).await.map_err(|e| (step, e))?;
            if step % 8 == 0 {
                check_booked(&sys).await.map_err(|e| (step, e))?;
            }
        }
        finish(&sys, &model, &found)
            .await
            .map_err(|e| (steps, format!("after the last step: {e}")))
    }
    .await;
    dog.abort();
    result
}

/// Checks a reply is refused with one of `codes`, a typed error.
fn refused<T: std::fmt::Debug>(
    what: &str,
    r: Result<T, common::Error>,
    codes: &[ErrorCode],
) -> Result<String, String> {
    match r {
        Err(e) if codes.contains(&e.code) => Ok(format!("{what}: refused ({})", e.code)),
        Err(e) => Err(format!(
            "{what}: refused with {} ({}), expected one of {codes:?}",
            e.code, e.message
        )),
        Ok(v) => Err(format!("{what}: applied, expected a refusal: {v:?}")),
    }
}

fn task(rng: &mut Rng, id: &str, deps: Vec<TaskId>) -> TaskSpec {
    let mut t = TaskSpec::new(tid(id));
    t.requirements = Requirements {
        resources: [("cpu".to_string(), 1.0)].into(),
        ..Default::default()
    };
    t.depends_on = deps;
    t.retry = RetryPolicy {
        max_attempts: 2,
        backoff_base_ms: rng.range(200, 1_500),
        ..Default::default()
    };
    t.input = json!({"ms": rng.range(100, 600)});
    let roll = rng.below(100);
    t.kind = if roll < 25 {
        // Only its timeout ends it; one of the two kinds.
        let limit = rng.range(1_000, 2_500);
        t.timeouts = if rng.percent(50) {
            Timeouts {
                start_to_close_ms: Some(limit),
                ..Default::default()
            }
        } else {
            Timeouts {
                heartbeat_ms: Some(limit),
                ..Default::default()
            }
        };
        t.retry.max_attempts = rng.range(1, 2) as u32;
        "hang"
    } else if roll < 45 {
        t.retry.max_attempts = 3;
        "flaky"
    } else {
        "work"
    }
    .into();
    t
}

/// Picks one action the model allows, applies it and checks the reply.
async fn act(sys: &mut Sys, model: &mut Model, rng: &mut Rng, seed: u64) -> Result<String, String> {
    let open = open_flows(sys).await?;
    let roll = rng.below(100);
    let any = (!model.flows.is_empty()).then(|| rng.below(model.flows.len() as u64) as usize);
    match (roll, any) {
        (0..=21, _) | (_, None) if open < MAX_OPEN_FLOWS => create(sys, model, rng, seed).await,
        (0..=21, _) | (_, None) => sys
            .client
            .metrics()
            .await
            .map(|m| format!("metrics: {} flows created", m.flows_created))
            .map_err(|e| format!("metrics: {e}")),
        (22..=26, _) => {
            let mut t = TaskSpec::new(tid("a"));
            t.depends_on = vec![tid("b")];
            let mut u = TaskSpec::new(tid("b"));
            u.depends_on = vec![tid("a")];
            let spec = FlowSpec::new("cycle", vec![t, u]);
            refused(
                "create a cycle",
                sys.client.create_flow(&spec).await,
                &[ErrorCode::ValidationFailed],
            )
        }
        (27..=34, Some(i)) => pause(sys, model, i).await,
        (35..=42, Some(i)) => resume(sys, model, i).await,
        (43..=48, Some(i)) => modify(sys, model, rng, i).await,
        (49..=62, Some(i)) => rerun(sys, model, rng, i).await,
        (63..=67, Some(i)) => cancel(sys, model, i).await,
        (68..=73, Some(i)) => optimize(sys, model, i).await,
        (74..=79, _) => {
            let agent = rng.pick(&model.live).cloned().unwrap_or_default();
            let cpu = rng.range(1, 3) as f64;
            let preempt = rng.percent(30);
            let req = common::msg::AdjustRequest {
                agent_id: AgentId::new(&agent).unwrap(),
                capacity: [("cpu".to_string(), cpu)].into(),
                preempt,
            };
            let r = sys
                .client
                .adjust_capacity(&req)
                .await
                .map_err(|e| format!("adjust {agent}: {e}"))?;
            Ok(format!(
                "adjust {agent} cpu {cpu} preempt {preempt}: applied {}",
                r.applied
            ))
        }
        (80..=84, _) => {
            let agent = rng.pick(&model.live).cloned().unwrap_or_default();
            let info = sys
                .client
                .deregister_agent(&AgentId::new(&agent).unwrap())
                .await
                .map_err(|e| format!("drain {agent}: {e}"))?;
            model.live.retain(|a| *a != agent);
            model.drained.push(agent.clone());
            // A drained agent runs on until it is killed; few are kept.
            if model.drained.len() > 2 {
                let old = model.drained.remove(0);
                sys.kill_agent(&old);
            }
            let new = sys.add_agent().await;
            model.live.push(new.clone());
            Ok(format!(
                "drain {agent} ({}), start {new}",
                info.status.as_str()
            ))
        }
        (85..=89, _) => {
            let agent = rng.pick(&model.live).cloned().unwrap_or_default();
            sys.kill_agent(&agent);
            model.live.retain(|a| *a != agent);
            let new = sys.add_agent().await;
            model.live.push(new.clone());
            Ok(format!("kill agent {agent}, start {new}"))
        }
        (90..=94, _) => {
            let which = rng.below(2) as usize;
            sys.restart_orchestrator(which).await;
            Ok(format!(
                "kill orchestrator replica {which} and start another"
            ))
        }
        (_, Some(i)) => {
            let unknown = FlowId::new(format!("{}-nope", model.flows[i].id)).unwrap();
            let r = if rng.percent(50) {
                sys.client.pause_flow(&unknown).await
            } else {
                sys.client.cancel_flow(&unknown).await
            };
            refused("an unknown flow", r, &[ErrorCode::NotFound])
        }
    }
}

/// Flows not finished, as `flow.list` has them.
async fn open_flows(sys: &Sys) -> Result<usize, String> {
    let list = sys
        .client
        .list_flows(&FlowListRequest::default())
        .await
        .map_err(|e| format!("flow.list: {e}"))?;
    Ok(list.flows.iter().filter(|f| !f.state.is_terminal()).count())
}

async fn create(sys: &Sys, model: &mut Model, rng: &mut Rng, seed: u64) -> Result<String, String> {
    let n = rng.range(2, 5) as usize;
    let mut tasks = Vec::new();
    for i in 0..n {
        let deps = (0..i)
            .filter(|_| rng.percent(35))
            .map(|d| tid(&format!("t{d}")))
            .collect();
        tasks.push(task(rng, &format!("t{i}"), deps));
    }
    let mut spec = FlowSpec::new("model", tasks.clone());
    let id = FlowId::new(format!("s{seed}-f{}", model.next)).unwrap();
    model.next += 1;
    spec.id = Some(id.clone());
    let status = sys
        .client
        .create_flow(&spec)
        .await
        .map_err(|e| format!("create {id}: {e}"))?;
    if status.state != FlowState::Running {
        return Err(format!("create {id}: the new flow is {}", status.state));
    }
    let kinds: Vec<String> = tasks.iter().map(|t| t.kind.clone()).collect();
    model.flows.push(MFlow {
        id: id.clone(),
        deps: tasks.into_iter().map(|t| (t.id, t.depends_on)).collect(),
        paused: false,
        cancelled: false,
    });
    Ok(format!("create {id} {kinds:?}"))
}

async fn status(sys: &Sys, id: &FlowId) -> Result<FlowStatus, String> {
    sys.client
        .flow_status(id)
        .await
        .map_err(|e| format!("flow.status {id}: {e}"))
}

async fn pause(sys: &Sys, model: &mut Model, i: usize) -> Result<String, String> {
    let id = model.flows[i].id.clone();
    let before = status(sys, &id).await?;
    if before.state.is_terminal() {
        return refused(
            &format!("pause {id} ({})", before.state),
            sys.client.pause_flow(&id).await,
            &[ErrorCode::Conflict],
        );
    }
    let s = sys
        .client
        .pause_flow(&id)
        .await
        .map_err(|e| format!("pause {id} ({}): {e}", before.state))?;
    if s.state != FlowState::Paused {
        return Err(format!("pause {id}: the flow is {} after it", s.state));
    }
    model.flows[i].paused = true;
    Ok(format!("pause {id}"))
}

async fn resume(sys: &Sys, model: &mut Model, i: usize) -> Result<String, String> {
    let id = model.flows[i].id.clone();
    let before = status(sys, &id).await?;
    if before.state.is_terminal() {
        return refused(
            &format!("resume {id} ({})", before.state),
            sys.client.resume_flow(&id).await,
            &[ErrorCode::Conflict],
        );
    }
    let s = sys
        .client
        .resume_flow(&id)
        .await
        .map_err(|e| format!("resume {id} ({}): {e}", before.state))?;
    if s.state == FlowState::Paused || s.state == FlowState::Cancelled {
        return Err(format!("resume {id}: the flow is {} after it", s.state));
    }
    model.flows[i].paused = false;
    Ok(format!("resume {id} ({} before)", before.state))
}

async fn cancel(sys: &Sys, model: &mut Model, i: usize) -> Result<String, String> {
    let id = model.flows[i].id.clone();
    let before = status(sys, &id).await?;
    if before.state.is_terminal() {
        return refused(
            &format!("cancel {id} ({})", before.state),
            sys.client.cancel_flow(&id).await,
            &[ErrorCode::Conflict],
        );
    }
    let s = sys
        .client
        .cancel_flow(&id)
        .await
        .map_err(|e| format!("cancel {id} ({}): {e}", before.state))?;
    if s.state != FlowState::Cancelled {
        return Err(format!("cancel {id}: the flow is {} after it", s.state));
    }
    model.flows[i].paused = false;
    model.flows[i].cancelled = true;
    Ok(format!("cancel {id}"))
}

async fn optimize(sys: &Sys, model: &Model, i: usize) -> Result<String, String> {
    let id = model.flows[i].id.clone();
    let before = status(sys, &id).await?;
    let req = FlowOptimizeRequest {
        flow_id: id.clone(),
        apply: true,
    };
    if before.state.is_terminal() {
        return refused(
            &format!("optimize --apply {id} ({})", before.state),
            sys.client.optimize_flow(&req).await,
            &[ErrorCode::Conflict],
        );
    }
    match sys.client.optimize_flow(&req).await {
        Ok(plan) if plan.applied => Ok(format!(
            "optimize --apply {id}: {} changes",
            plan.priority_changes.len()
        )),
        Ok(_) => Err(format!("optimize --apply {id}: the plan was not applied")),
        // The flow moved on while the plan was made, a typed refusal.
        Err(e) if e.code == ErrorCode::Conflict => {
            Ok(format!("optimize --apply {id}: conflict ({})", e.message))
        }
        Err(e) => Err(format!("optimize --apply {id}: {e}")),
    }
}

async fn modify(sys: &Sys, model: &mut Model, rng: &mut Rng, i: usize) -> Result<String, String> {
    let id = model.flows[i].id.clone();
    let before = status(sys, &id).await?;
    let new = tid(&format!("x{}", model.flows[i].deps.len()));
    let on = rng
        .pick(&before.tasks)
        .map(|t| t.task_id.clone())
        .unwrap_or_else(|| tid("t0"));
    let mut spec = task(rng, new.as_str(), vec![on.clone()]);
    if spec.kind == "hang" {
        spec.kind = "work".into();
        spec.timeouts = Timeouts::default();
    }
    let changes = FlowChanges {
        flow_id: id.clone(),
        expected_revision: before.revision,
        add: vec![spec],
        add_dependencies: vec![],
        remove: vec![],
        priorities: BTreeMap::new(),
        inputs: BTreeMap::new(),
    };
    let r = sys.client.modify_flow(&changes).await;
    if before.state.is_terminal() {
        return refused(
            &format!("modify {id} ({})", before.state),
            r,
            &[ErrorCode::ValidationFailed],
        );
    }
    match r {
        Ok(s) => {
            if !s.tasks.iter().any(|t| t.task_id == new) {
                return Err(format!(
                    "modify {id}: task {new} is not in the flow after it"
                ));
            }
            model.flows[i].deps.insert(new.clone(), vec![on.clone()]);
            Ok(format!("modify {id}: add {new} after {on}"))
        }
        // Changed since it was read: a typed refusal, nothing applied.
        Err(e) if e.code == ErrorCode::Conflict => Ok(format!("modify {id}: conflict")),
        Err(e)
            if e.code == ErrorCode::ValidationFailed
                && status(sys, &id).await?.state.is_terminal() =>
        {
            Ok(format!("modify {id}: refused, it finished meanwhile"))
        }
        Err(e) => Err(format!("modify {id} ({}): {e}", before.state)),
    }
}

async fn rerun(sys: &Sys, model: &mut Model, rng: &mut Rng, i: usize) -> Result<String, String> {
    // Mostly a finished flow: that is what a re-run is for.
    let finished: Vec<usize> = {
        let mut v = Vec::new();
        for (j, f) in model.flows.iter().enumerate() {
            if !f.cancelled && status(sys, &f.id).await?.state.is_terminal() {
                v.push(j);
            }
        }
        v
    };
    let i = match rng.pick(&finished) {
        Some(j) if rng.percent(75) => *j,
        _ => i,
    };
    let id = model.flows[i].id.clone();
    let before = status(sys, &id).await?;
    // Mostly what failed or timed out: what an operator re-runs.
    let failed: Vec<&common::msg::TaskStatus> = before
        .tasks
        .iter()
        .filter(|t| matches!(t.state, TaskState::Failed | TaskState::TimedOut))
        .collect();
    let done: Vec<&common::msg::TaskStatus> = before
        .tasks
        .iter()
        .filter(|t| t.state.is_terminal())
        .collect();
    let pool = if !failed.is_empty() && rng.percent(60) {
        &failed
    } else {
        &done
    };
    let Some(target) = rng.pick(pool).map(|t| t.task_id.clone()) else {
        let req = RerunRequest {
            flow_id: id.clone(),
            task_id: tid("nope"),
        };
        return refused(
            &format!("rerun {id}/nope"),
            sys.client.rerun_task(&req).await,
            &[ErrorCode::ValidationFailed, ErrorCode::NotFound],
        );
    };
    let req = RerunRequest {
        flow_id: id.clone(),
        task_id: target.clone(),
    };
    let r = sys.client.rerun_task(&req).await;
    if model.flows[i].cancelled {
        return refused(
            &format!("rerun {id}/{target} (cancelled)"),
            r,
            &[ErrorCode::ValidationFailed],
        );
    }
    let after = r.map_err(|e| format!("rerun {id}/{target} ({}): {e}", before.state))?;
    let again = after
        .tasks
        .iter()
        .find(|t| t.task_id == target)
        .map(|t| t.state);
    // A task whose dependency did not succeed is skipped again at once, and
    // the flow may finish again with it.
    let skipped = again == Some(TaskState::Skipped);
    if again.is_none_or(|s| s.is_terminal() && !skipped) {
        return Err(format!(
            "rerun {id}/{target}: the task is {again:?} after it"
        ));
    }
    let expect = if model.flows[i].paused {
        FlowState::Paused
    } else {
        FlowState::Running
    };
    if after.state != expect && !(skipped && after.state.is_terminal()) {
        return Err(format!(
            "rerun {id}/{target}: the flow is {} after it, expected {expect}",
            after.state
        ));
    }
    // What it reset: the task and everything downstream of it.
    let deps = &model.flows[i].deps;
    let mut reset = BTreeSet::from([target.clone()]);
    while let Some(more) = deps
        .iter()
        .find(|(t, d)| !reset.contains(*t) && d.iter().any(|x| reset.contains(x)))
        .map(|(t, _)| t.clone())
    {
        reset.insert(more);
    }
    for t in before.tasks.iter().filter(|t| reset.contains(&t.task_id)) {
        match t.state {
            TaskState::Succeeded => model.reset_succeeded += 1,
            s if !s.is_terminal() => model.reset_maybe += 1,
            _ => {}
        }
    }
    model.reruns += 1;
    if before.state.is_terminal() {
        model.reran_finished += 1;
    } else {
        model.reran_maybe_finished += 1;
    }
    Ok(format!(
        "rerun {id}/{target} ({} before, {} reset)",
        before.state,
        reset.len()
    ))
}
