//! The orchestrator's NATS adapter.
//!
//! Flows live in the `coord_flows` KV bucket, one entry per flow. In each replica
//! every flow with work in progress has an *actor*: a task that takes commands
//! (agent reports, placements, timer ticks, pause/resume/cancel) from a queue,
//! applies all that are waiting to the flow in one machine step, and writes the
//! result with one compare-and-set. Under load a single KV write thus carries
//! many task transitions, and no two steps of one replica race each other. Steps
//! of different replicas still may: the loser re-reads and re-applies its batch.
//! Effects (events, assignments, releases, cancel notices) run only after the
//! write succeeded; the events are stored with the write too (see [`crate::outbox`]).
//!
//! Replicas share the `$SRV` queue group for requests and one durable consumer
//! on the reports stream. A periodic sweep ticks every unfinished flow, which
//! expires attempts past their stored deadlines, ends back-offs and dispatches
//! ready tasks nobody placed — so a restarted or replacement replica picks up
//! every flow from KV alone.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv};
use common::msg::{
    AgentReport, AllocateRequest, Allocation, Assignment, CapacityRequest, EventKind,
    ExplainRequest, Explanation, FlowChanges, FlowList, FlowListRequest, FlowOptimizeRequest,
    FlowPlan, FlowRef, FlowSpec, FlowStatus, HeldRequest, RejectReason, ReleaseRequest,
    ReportRejected, Requirements, RerunRequest, TaskRef, TaskSpec,
};
use common::nats::{self as bus, Bucket, EventPublisher, Stream};
use common::now_ms;
use common::service::Service;
use common::{subject, telemetry, AgentId, AllocationId, Error, ErrorCode, FlowId, TaskId};
use futures::{StreamExt, TryStreamExt};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tracing::Instrument;

use common::msg::{FlowState, TaskState};

use crate::machine::{self, Effect, Flow, Rejection};
use crate::outbox::{Cursor, Ledger};
use crate::placing::Placing;
use crate::slots::Slots;
use crate::store::{self, Stored, WriteError};

mod agent_events;
mod allocator_events;

/// Orchestrator settings.
#[derive(clap::Args, Debug, Clone)]
pub struct Config {
    #[command(flatten)]
    pub nats: common::config::NatsConfig,
    /// How often every unfinished flow is ticked (timeouts, back-offs, unplaced tasks), in ms.
    #[arg(long, env = "ORCHESTRATOR_SWEEP_MS", default_value_t = 1_000)]
    pub sweep_ms: u64,
    /// How long a report taken by a replica may stay unacknowledged before it is
    /// redelivered (to another replica if this one died or stalled), in ms: the
    /// most a stalled replica delays the reports it holds. A report delivered
    /// again after it was applied is acknowledged without effect, so a short
    /// wait costs only the rare second delivery under heavy load. The same
    /// wait applies to the agent events the triggers consume.
    #[arg(long, env = "ORCHESTRATOR_REPORT_ACK_WAIT_MS", default_value_t = 2_000)]
    pub report_ack_wait_ms: u64,
}

impl Config {
    pub fn new(nats: common::config::NatsConfig) -> Self {
        Config {
            nats,
            sweep_ms: 1_000,
            report_ack_wait_ms: 2_000,
        }
    }
}

const NAME: &str = "orchestrator";
/// Most commands applied in one step.
const MAX_BATCH: usize = 512;
/// Allocation requests one replica has in flight at most: enough to keep the
/// allocator busy, few enough that a burst of ready tasks does not swamp it.
const MAX_PLACING: usize = 64;
/// Tries at one release before leaving it to the agent's loss (see
/// `release_by_id`): with back-off doubling from 100 ms to 10 s, about a minute.
const RELEASE_ATTEMPTS: u32 = 10;
/// An assignment not started this long after it was recorded is published again.
const REDELIVER_AFTER_MS: u64 = 2_000;
/// ... but only while the stream's duplicate window (2 min) still recognises it.
const REDELIVER_UNTIL_MS: u64 = 100_000;
/// An actor with nothing to do for this long goes away (its flow stays in KV).
const ACTOR_IDLE: Duration = Duration::from_secs(30);

/// Flow operations that reply with the flow's status.
#[derive(Debug, Clone)]
enum Control {
    Pause,
    Resume,
    Cancel,
    Modify(Box<FlowChanges>),
    Rerun(TaskId),
}

/// What a flow's actor is asked to do.
enum Cmd {
    // Boxed: reports are the most common command and the largest by far.
    Report {
        report: Box<AgentReport>,
        msg: Box<jetstream::Message>,
    },
    /// Record a placement the allocator granted (at `granted_ms`).
    Assign {
        task: TaskId,
        allocation: Box<Allocation>,
        slot: SlotHeld,
        granted_ms: u64,
    },
    /// The allocator did not place the task (it stays ready); `asked_at` is
    /// the replica's freed count when it was asked (see [`Placing`]).
    Unplaced {
        task: TaskId,
        asked_at: u64,
    },
    /// Held-back tasks are due to be placed again.
    Wake,
    /// The assignment message could not be sent.
    Unassign {
        task: TaskId,
        attempt: u32,
    },
    Tick,
    /// The allocator declared the agent lost.
    /// The agent was lost (`false`) or left (`true`) holding attempts.
    AgentGone(AgentId, bool),
    /// The allocator took an allocation back.
    Preempted {
        task: TaskId,
        allocation: AllocationId,
        reason: String,
    },
    Control {
        op: Control,
        reply: oneshot::Sender<Result<FlowStatus, Error>>,
    },
    /// A stored agent event that may be what a waiting task waits for.
    Event {
        task: TaskId,
        event: Box<common::msg::AgentEvent>,
        stored_ms: u64,
    },
}

/// A command with the span it was sent from (its cause), so the work it leads
/// to continues the sender's trace although the actor applies it later, in a
/// batch with others.
type Queued = (Cmd, tracing::Span);

struct Orchestrator {
    client: common::Client,
    nats: async_nats::Client,
    js: jetstream::Context,
    flows: kv::Store,
    events: EventPublisher,
    /// What this replica published from the flows' outboxes.
    outbox: Arc<Ledger>,
    actors: Mutex<HashMap<FlowId, mpsc::UnboundedSender<Queued>>>,
    /// Flows known to be finished, so the sweep does not load them again. Not
    /// final: a re-run or a change makes a flow run again, so an entry is
    /// dropped when this replica's actor steps the flow back to running, and
    /// checked against the stored revision every [`FINISHED_RECHECK_MS`] in
    /// case another replica did it (and is gone before it sweeps the flow).
    finished: Mutex<HashMap<FlowId, Finished>>,
    /// Bounds allocation requests in flight (see [`MAX_PLACING`]).
    placing: Semaphore,
    /// Moves whenever capacity may have freed up: this replica released an
    /// allocation or a slot, or an agent registered or changed capacity.
    freed: AtomicU64,
    slots: Slots,
    /// How often the sweep checks deadlines (told to agents in each lease).
    tick_ms: u64,
    /// The event types the wait tasks of each flow with an actor here wait
    /// for: a stored event of one of them ticks the flow at once.
    waiting: Mutex<HashMap<FlowId, HashSet<String>>>,
    /// Registered triggers (`coord_triggers`).
    triggers: kv::Store,
}

/// A flow this replica saw finished: at which revision, and when last checked.
#[derive(Clone, Copy)]
struct Finished {
    revision: u64,
    checked_ms: u64,
}

/// How often the sweep checks that a flow it skips as finished is still at
/// the revision it finished at.
const FINISHED_RECHECK_MS: u64 = 10_000;

/// A concurrency slot taken for a placement: the key and its holder.
type SlotHeld = Option<(String, String)>;

/// Runs the orchestrator until `shutdown` resolves, then drains the connection.
pub async fn run(cfg: Config, shutdown: impl Future) -> anyhow::Result<()> {
    // NATS may not be up yet: wait for it, unless asked to stop first.
    tokio::pin!(shutdown);
    let Some(nats) = bus::connect_until(&cfg.nats, NAME, shutdown.as_mut()).await? else {
        return Ok(());
    };
    let js = jetstream::new(nats.clone());
    for s in [Stream::Assign, Stream::Reports, Stream::Events] {
        bus::ensure_stream(&js, s, cfg.nats.js_replicas).await?;
    }
    let flows = bus::ensure_bucket(&js, Bucket::Flows, cfg.nats.js_replicas).await?;
    store::allow_batches(&js, &flows).await?;
    let slots = bus::ensure_bucket(&js, Bucket::Concurrency, cfg.nats.js_replicas).await?;
    let triggers = bus::ensure_bucket(&js, Bucket::Triggers, cfg.nats.js_replicas).await?;
    // Wait tasks and triggers read the agent events (the synchronizer's
    // stream, made here with its default limits if it is not there yet).
    bus::ensure_stream(&js, Stream::AgentEvents, cfg.nats.js_replicas).await?;
    let orch = Arc::new(Orchestrator {
        client: common::Client::new(nats.clone()).with_timeout(cfg.nats.request_timeout()),
        nats: nats.clone(),
        js: js.clone(),
        flows,
        events: EventPublisher::new(nats.clone(), NAME),
        outbox: Arc::default(),
        actors: Mutex::default(),
        finished: Mutex::default(),
        placing: Semaphore::new(MAX_PLACING),
        freed: AtomicU64::new(0),
        slots: Slots::new(slots),
        tick_ms: cfg.sweep_ms.max(10),
        waiting: Mutex::default(),
        triggers,
    });

    let mut service = Service::start(
        &nats,
        NAME,
        "Task flows: DAGs of tasks run on external agents",
    )
    .await?;
    let o = orch.clone();
    service
        .serve(subject::FLOW_CREATE, move |spec: FlowSpec| {
            let o = o.clone();
            async move { o.create(spec).await }
        })
        .await?;
    let o = orch.clone();
    service
        .serve(subject::FLOW_STATUS, move |r: FlowRef| {
            let o = o.clone();
            async move { o.status(&r.flow_id).await }
        })
        .await?;
    let o = orch.clone();
    service
        .serve(subject::FLOW_GET, move |r: FlowRef| {
            let o = o.clone();
            async move { o.load(&r.flow_id).await.map(|(f, _)| f.spec()) }
        })
        .await?;
    let o = orch.clone();
    service
        .serve(subject::FLOW_LIST, move |r: FlowListRequest| {
            let o = o.clone();
            async move { o.list(r).await }
        })
        .await?;
    for (subject, op) in [
        (subject::FLOW_PAUSE, Control::Pause),
        (subject::FLOW_RESUME, Control::Resume),
        (subject::FLOW_CANCEL, Control::Cancel),
    ] {
        let o = orch.clone();
        service
            .serve(subject, move |r: FlowRef| {
                let (o, op) = (o.clone(), op.clone());
                async move { o.control(r.flow_id, op).await }
            })
            .await?;
    }
    let o = orch.clone();
    service
        .serve(subject::FLOW_MODIFY, move |c: FlowChanges| {
            let o = o.clone();
            async move {
                o.control(c.flow_id.clone(), Control::Modify(Box::new(c)))
                    .await
            }
        })
        .await?;
    let o = orch.clone();
    service
        .serve(subject::FLOW_RERUN, move |r: RerunRequest| {
            let o = o.clone();
            async move { o.control(r.flow_id, Control::Rerun(r.task_id)).await }
        })
        .await?;
    let o = orch.clone();
    service
        .serve(subject::FLOW_EXPLAIN, move |r: ExplainRequest| {
            let o = o.clone();
            async move { o.explain(r).await }
        })
        .await?;
    let o = orch.clone();
    service
        .serve(subject::FLOW_OPTIMIZE, move |r: FlowOptimizeRequest| {
            let o = o.clone();
            async move { o.optimize(r).await }
        })
        .await?;

    let flows = orch.flows.clone();
    service
        .serve(subject::ALLOCATIONS_HELD, move |r: HeldRequest| {
            let flows = flows.clone();
            async move { crate::held::held(&flows, r).await }
        })
        .await?;

    agent_events::serve_triggers(&orch, &mut service).await?;
    let allocator_events = tokio::spawn(orch.clone().consume_allocator_events());
    let triggered = tokio::spawn(
        orch.clone()
            .consume_triggers(Duration::from_millis(cfg.report_ack_wait_ms.max(100))),
    );
    let wake_waits = tokio::spawn(orch.clone().wake_waiting());
    let capacity = tokio::spawn(orch.clone().count_capacity_changes());
    let reports = tokio::spawn(
        orch.clone()
            .consume_reports(Duration::from_millis(cfg.report_ack_wait_ms.max(100))),
    );
    let sweeper = tokio::spawn(
        orch.clone()
            .sweep(Duration::from_millis(cfg.sweep_ms.max(10))),
    );
    tracing::info!(url = %cfg.nats.nats_url, "orchestrator running");

    shutdown.await;
    tracing::info!("orchestrator shutting down");
    service.stop().await;
    reports.abort();
    allocator_events.abort();
    triggered.abort();
    wake_waits.abort();
    capacity.abort();
    sweeper.abort();
    nats.drain().await.ok();
    Ok(())
}

/// Runs what takes seconds on a large flow (validating, laying out, a status
/// of a million tasks) without holding up the other tasks queued on this
/// worker: on a two-core host those include agents' heartbeats, which an
/// allocator in the same process would miss.
fn off_worker<T>(large: bool, work: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if large && h.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

/// Why a command changed nothing.
#[derive(Debug)]
enum Refusal {
    Rejected(Rejection),
    Invalid(machine::Problems),
    /// A modification made from an older revision of the flow.
    Stale {
        expected: u64,
        current: u64,
    },
    /// A placement granted too long ago to be used: the allocator's
    /// reconciliation may have taken it back meanwhile.
    LateGrant {
        age_ms: u64,
    },
}

/// How old a grant may be when its step applies it. Longer, and the
/// allocator's reconciliation (which asks after a grace of 30 s by default)
/// might already have found the allocation unheld and taken it back.
const GRANT_MAX_AGE_MS: u64 = 10_000;

impl From<Rejection> for Refusal {
    fn from(r: Rejection) -> Self {
        Refusal::Rejected(r)
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Rejected(r) => write!(f, "{r}"),
            Refusal::Invalid(problems) => {
                let all: Vec<&str> = problems.iter().map(|p| p.message.as_str()).collect();
                write!(f, "{}", all.join("; "))
            }
            Refusal::Stale { expected, current } => {
                write!(
                    f,
                    "the flow is at revision {current}, not {expected}: read it again"
                )
            }
            Refusal::LateGrant { age_ms } => {
                write!(
                    f,
                    "the placement was granted {age_ms} ms ago; placing again"
                )
            }
        }
    }
}

fn refusal_error(r: &Refusal) -> Error {
    match r {
        Refusal::Rejected(rejection) => {
            let code = match rejection {
                Rejection::UnknownTask(_) => ErrorCode::NotFound,
                Rejection::StaleAttempt { .. } | Rejection::WrongAgent { .. } => ErrorCode::Fenced,
                _ => ErrorCode::Conflict,
            };
            Error::new(code, r.to_string())
        }
        Refusal::Invalid(problems) => Error::new(ErrorCode::ValidationFailed, r.to_string())
            .with_details(serde_json::json!({ "problems": problems })),
        Refusal::Stale { current, .. } => Error::new(ErrorCode::Conflict, r.to_string())
            .with_details(serde_json::json!({ "current_revision": current })),
        Refusal::LateGrant { .. } => Error::new(ErrorCode::Conflict, r.to_string()),
    }
}

/// Placements one flow has waiting at once (beside [`MAX_PLACING`] in
/// flight per replica): a wide flow's ready tasks are taken a batch at a
/// time, as grants come back, rather than all 100,000 queueing here at once.
const MAX_PLACING_PER_FLOW: usize = 1_024;

/// A large flow's watch updates are this far apart at least, and 1 ms more
/// per [`WATCH_TASKS_PER_MS`] tasks.
const WATCH_EVERY_MS: u64 = 250;
const WATCH_TASKS_PER_MS: usize = 40;

/// The watch updates of one flow. A status is a scan of every task (and its
/// critical path): a large (paged) flow's is sent at most every
/// [`WATCH_EVERY_MS`] or, larger still, at intervals growing with its size
/// (2.5 s at 100,000 tasks), so that it costs a bounded share of the
/// orchestrator's time; a change of the flow's own state is sent at once,
/// and the last change by the first tick after the interval.
#[derive(Debug, Default)]
struct Watch {
    pending: bool,
    last_ms: u64,
    last_state: Option<FlowState>,
}

impl Watch {
    fn due(&self, flow: &Flow, now: u64) -> bool {
        self.pending
            && (flow.pages.is_none()
                || self.last_state != Some(flow.state)
                || now.saturating_sub(self.last_ms)
                    >= WATCH_EVERY_MS.max((flow.tasks.len() / WATCH_TASKS_PER_MS) as u64))
    }
}

/// Infeasible-requirement warnings listed one by one; more are counted.
const MAX_WARNINGS: usize = 100;

impl Orchestrator {
    async fn create(self: &Arc<Self>, spec: FlowSpec) -> Result<FlowStatus, Error> {
        self.create_from(spec, None).await
    }

    /// Creates a flow; `origin` names the trigger and event that started it.
    async fn create_from(
        self: &Arc<Self>,
        mut spec: FlowSpec,
        origin: Option<common::msg::FlowOrigin>,
    ) -> Result<FlowStatus, Error> {
        if let Some(name) = spec.tasks_object.take() {
            spec.tasks = self.uploaded_tasks(&name, !spec.tasks.is_empty()).await?;
        }
        let large = spec.tasks.len() > store::PAGE_TASKS;
        if let Err(problems) = off_worker(large, || machine::validate(&spec)) {
            let summary: Vec<&str> = problems.iter().map(|p| p.message.as_str()).collect();
            return Err(Error::new(
                ErrorCode::ValidationFailed,
                format!("flow is invalid: {}", summary.join("; ")),
            )
            .with_details(serde_json::json!({ "problems": problems })));
        }
        let warnings = self.infeasible(&spec).await;
        if spec.require_feasible && !warnings.is_empty() {
            let summary: Vec<&str> = warnings.iter().map(|p| p.message.as_str()).collect();
            return Err(Error::new(
                ErrorCode::ValidationFailed,
                format!(
                    "flow cannot run on the registered agents: {}",
                    summary.join("; ")
                ),
            )
            .with_details(serde_json::json!({ "problems": warnings })));
        }
        let id = spec.id.clone().unwrap_or_else(FlowId::random);
        let now = common::now_ms();
        let trace = telemetry::traceparent();
        let (flow, effects, encoded, status) = off_worker(large, || {
            let (mut flow, effects) = Flow::new(id.clone(), spec, now);
            flow.warnings = warnings;
            flow.started_by = origin;
            flow.trace = trace;
            let (cursor, _) = self.outbox.stage(&mut flow, events_of(&effects), now);
            store::lay_out(&mut flow);
            let encoded = store::encode(&mut flow, None).map(|(e, _)| e);
            let status = flow.status(0, now);
            (flow, (effects, cursor), encoded, status)
        });
        let encoded = encoded?;
        self.fits_in_entries(&flow, &encoded)?;
        let revision = match store::create(&self.flows, &flow, encoded).await {
            Ok((revision, _)) => revision,
            Err(WriteError::Conflict) => {
                return Err(Error::new(
                    ErrorCode::Conflict,
                    format!("flow {id} already exists"),
                ))
            }
            Err(WriteError::Failed(e)) => return Err(e),
        };
        // A large flow's creation is many events (each root becomes ready):
        // the reply does not wait for them, and dispatch starts after them.
        let o = self.clone();
        tokio::spawn(
            async move {
                #[cfg(feature = "failpoints")]
                crate::failpoints::after_write(&id).await;
                let (effects, mut cursor) = effects;
                o.run_effects(effects, &mut cursor).await;
                o.outbox.sent(cursor, common::now_ms());
                o.send(&id, Cmd::Tick);
            }
            .in_current_span(),
        );
        Ok(FlowStatus { revision, ..status })
    }

    /// The tasks a client uploaded ahead of a spec too large for one message;
    /// the upload is deleted once read.
    async fn uploaded_tasks(&self, name: &str, inline_too: bool) -> Result<Vec<TaskSpec>, Error> {
        if inline_too {
            return Err(Error::new(
                ErrorCode::BadRequest,
                "a spec with `tasks_object` must leave `tasks` empty",
            ));
        }
        let uploads = bus::ensure_uploads(&self.js).await?;
        let mut object = uploads.get(name).await.map_err(|e| {
            Error::new(
                ErrorCode::BadRequest,
                format!("no uploaded tasks {name:?} ({e}); uploads are kept for an hour"),
            )
        })?;
        let mut body = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut object, &mut body)
            .await
            .map_err(|e| {
                Error::new(
                    ErrorCode::Unavailable,
                    format!("uploaded tasks {name:?}: {e}"),
                )
            })?;
        let tasks = serde_json::from_slice(&body).map_err(|e| {
            Error::new(
                ErrorCode::BadRequest,
                format!("uploaded tasks {name:?} are not a JSON array of tasks: {e}"),
            )
        });
        if let Err(e) = uploads.delete(name).await {
            tracing::debug!(error = %e, name, "upload not deleted; it expires");
        }
        tasks
    }

    /// Each entry of a flow (the flow, or its header and pages) grows as it
    /// runs (outputs, errors, attempt history): one that would start above
    /// half the server's `max_payload` is refused up front, with the figures,
    /// rather than failing its first write or a later one.
    fn fits_in_entries(&self, flow: &Flow, encoded: &store::Encoded) -> Result<(), Error> {
        let size = encoded
            .pages
            .iter()
            .map(|p| p.len() + 64)
            .chain([encoded.header.len()])
            .max()
            .unwrap_or(0);
        let limit = self.nats.server_info().max_payload;
        if limit > 0 && size > limit / 2 {
            return Err(Error::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "the flow would be stored in entries of up to {size} bytes, more than \
                     half the server's max_payload of {limit} bytes (room is kept for its run \
                     state); make task inputs smaller, split the flow or raise max_payload"
                ),
            )
            .with_details(serde_json::json!({
                "stored_bytes": size,
                "max_payload": limit,
                "tasks": flow.tasks.len(),
            })));
        }
        Ok(())
    }

    /// Tasks whose requirements no registered agent could satisfy even when
    /// idle: no agent has the capabilities and labels, or none has the
    /// capacity at all. Each distinct requirement is asked about once.
    async fn infeasible(&self, spec: &FlowSpec) -> Vec<common::msg::ValidationProblem> {
        let mut verdicts: Vec<(&common::msg::Requirements, Option<String>)> = Vec::new();
        let mut out = Vec::new();
        for t in &spec.tasks {
            let known = verdicts
                .iter()
                .find(|(r, _)| *r == &t.requirements)
                .map(|(_, v)| v.clone());
            let verdict = match known {
                Some(v) => v,
                None => {
                    let v = self.never_fits(&t.requirements).await;
                    verdicts.push((&t.requirements, v.clone()));
                    v
                }
            };
            if let Some(why) = verdict {
                out.push(common::msg::ValidationProblem {
                    code: "infeasible_requirements".into(),
                    message: format!("task {}: {why}", t.id),
                    task_id: Some(t.id.clone()),
                    path: Vec::new(),
                });
            }
        }
        // Stored with the flow and sent in every status: a large flow's
        // warnings are summed up past the first few.
        if out.len() > MAX_WARNINGS {
            let more = out.len() - MAX_WARNINGS;
            out.truncate(MAX_WARNINGS);
            out.push(common::msg::ValidationProblem {
                code: "infeasible_requirements".into(),
                message: format!("and {more} more tasks no registered agent could run"),
                task_id: None,
                path: Vec::new(),
            });
        }
        out
    }

    async fn never_fits(&self, req: &common::msg::Requirements) -> Option<String> {
        let check = CapacityRequest {
            requirements: Some(req.clone()),
            ..Default::default()
        };
        // Without an answer nothing is known: no warning rather than a false one.
        let status = self.client.capacity(&check).await.ok()?;
        if status.fits == Some(true) {
            return None;
        }
        let Some(best) = status
            .no_fit
            .as_ref()
            .and_then(|n| n.best_candidate.clone())
        else {
            return Some(match status.no_fit {
                Some(n) => format!(
                    "no registered agent has the capabilities and labels it needs ({})",
                    n.message
                ),
                None => "no registered agent has the capabilities and labels it needs".to_owned(),
            });
        };
        let totals = status.agents.get(&best)?;
        let short: Vec<String> = req
            .resources
            .iter()
            .filter(|(r, need)| totals.get(*r).map(|c| c.capacity).unwrap_or(0.0) < **need)
            .map(|(r, need)| format!("{r} {need}"))
            .collect();
        (!short.is_empty()).then(|| {
            format!(
                "needs {} but no suitable agent has that much in all",
                short.join(", ")
            )
        })
    }

    async fn load(&self, flow: &FlowId) -> Result<(Flow, u64), Error> {
        store::read(&self.flows, flow)
            .await?
            .map(|(f, rev, _)| (f, rev))
            .ok_or_else(|| Error::not_found(format!("no flow {flow}")))
    }

    async fn status(&self, flow: &FlowId) -> Result<FlowStatus, Error> {
        let (f, rev) = self.load(flow).await?;
        Ok(off_worker(f.pages.is_some(), || {
            f.status(rev, common::now_ms())
        }))
    }

    async fn list(&self, req: FlowListRequest) -> Result<FlowList, Error> {
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

    async fn flow_ids(&self) -> Result<Vec<FlowId>, Error> {
        let unavailable = |e: &dyn std::fmt::Display| {
            Error::new(ErrorCode::Unavailable, format!("list flows: {e}"))
        };
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
            .map_err(|e| unavailable(&e))?
            .try_collect()
            .await
            .map_err(|e| unavailable(&e))?;
        // Page keys hold a `.`, which no flow id does.
        let mut ids: Vec<FlowId> = subjects
            .into_iter()
            .filter_map(|(subject, _)| FlowId::new(subject.strip_prefix(prefix)?).ok())
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Every reason each unfinished task (or the one named) is where it is,
    /// with the allocator's word on tasks that wait for placement.
    async fn explain(&self, req: ExplainRequest) -> Result<Explanation, Error> {
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
    async fn optimize(self: &Arc<Self>, req: FlowOptimizeRequest) -> Result<FlowPlan, Error> {
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
    async fn plan_input(&self, flow: &Flow) -> Result<machine::PlanInput, Error> {
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

    async fn control(self: &Arc<Self>, flow: FlowId, op: Control) -> Result<FlowStatus, Error> {
        // Answer "not found" here rather than spinning up an actor for nothing.
        self.load(&flow).await?;
        let (reply, answer) = oneshot::channel();
        self.send(&flow, Cmd::Control { op, reply });
        answer
            .await
            .map_err(|_| Error::new(ErrorCode::Unavailable, "orchestrator is shutting down"))?
    }

    /// Queues a command for the flow's actor, starting one if needed. The
    /// current span goes with it as the command's cause.
    fn send(self: &Arc<Self>, flow: &FlowId, cmd: Cmd) {
        let mut cmd = (cmd, tracing::Span::current());
        // An actor goes idle between our lookup and our send at most once in
        // a while; a fresh one that is gone at once means the runtime is
        // shutting down.
        for _ in 0..3 {
            let tx = {
                let Ok(mut actors) = self.actors.lock() else {
                    return;
                };
                actors
                    .entry(flow.clone())
                    .or_insert_with(|| {
                        let (tx, rx) = mpsc::unbounded_channel();
                        // No span: the actor outlives its first sender; each
                        // step runs in a span of the commands it applies.
                        tokio::spawn(self.clone().actor(flow.clone(), rx));
                        tx
                    })
                    .clone()
            };
            match tx.send(cmd) {
                Ok(()) => return,
                // The actor went idle in between: start a fresh one.
                Err(mpsc::error::SendError(back)) => {
                    cmd = back;
                    if let Ok(mut actors) = self.actors.lock() {
                        if actors.get(flow).is_some_and(|t| t.same_channel(&tx)) {
                            actors.remove(flow);
                        }
                    }
                }
            }
        }
        tracing::debug!(%flow, "command dropped: the runtime is shutting down");
    }

    async fn actor(self: Arc<Self>, flow: FlowId, mut rx: mpsc::UnboundedReceiver<Queued>) {
        let mut placing = Placing::default();
        let mut resent: HashMap<(TaskId, u32), u64> = HashMap::new();
        // The flow as this actor last wrote it, with its revision.
        let mut cache: Option<Stored> = None;
        let mut watch = Watch::default();
        // How far into the agent events each wait was looked for.
        let mut looked = agent_events::Looked::default();
        loop {
            let first = match tokio::time::timeout(ACTOR_IDLE, rx.recv()).await {
                Ok(Some(cmd)) => cmd,
                Ok(None) => return,
                Err(_) => {
                    // Idle: leave, unless a command slipped in meanwhile.
                    let Ok(mut actors) = self.actors.lock() else {
                        return;
                    };
                    match rx.try_recv() {
                        Ok(cmd) => cmd,
                        Err(_) => {
                            actors.remove(&flow);
                            self.outbox.forget(&flow);
                            self.note_waiting(&flow, None);
                            return;
                        }
                    }
                }
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(cmd) => batch.push(cmd),
                    Err(_) => break,
                }
            }
            let ticked = batch.iter().any(|(c, _)| matches!(c, Cmd::Tick));
            if ticked {
                // Events a wait task waits for go first, before the tick
                // could time it out.
                let found = self.events_for_waits(&flow, &mut cache, &mut looked).await;
                let span = tracing::Span::current();
                batch.splice(0..0, found.into_iter().map(|c| (c, span.clone())));
            }
            let (batch, causes): (Vec<Cmd>, Vec<tracing::Span>) = batch.into_iter().unzip();
            let finished = self
                .apply_batch(&flow, batch, causes, &mut placing, &mut cache, &mut watch)
                .await;
            self.note_waiting(&flow, cache.as_ref().map(|(f, _, _)| f));
            if ticked {
                if let Some((f, rev, _)) = &cache {
                    let now = common::now_ms();
                    self.redeliver(f, now, &mut resent);
                    self.outbox.republish(&self.js, f, now).await;
                    if watch.due(f, now) {
                        self.publish_watch(f, *rev, now, &mut watch).await;
                    }
                }
            }
            // Any step that leaves the flow unfinished (a re-run, a change)
            // must put it back under the sweep: timeouts and back-offs need it.
            if let Ok(mut done) = self.finished.lock() {
                match (finished, &cache) {
                    (true, Some((_, revision, _))) => {
                        let checked_ms = common::now_ms();
                        done.insert(
                            flow.clone(),
                            Finished {
                                revision: *revision,
                                checked_ms,
                            },
                        );
                    }
                    (true, None) => {}
                    (false, _) => {
                        done.remove(&flow);
                    }
                }
            }
        }
    }

    /// Applies a batch of commands in one step. Returns whether the flow is finished.
    ///
    /// The step starts from the flow as this actor last wrote it, which saves a
    /// read while one replica drives the flow: the compare-and-set proves the
    /// copy was current. A step that writes nothing proves nothing, so it is
    /// redone on a fresh read before anything (a rejection, say) is settled,
    /// unless the flow is large and its header shows it unchanged since.
    ///
    /// The step's span continues the trace of the first command that has one
    /// and links to the others' (see [`step_span`]).
    async fn apply_batch(
        self: &Arc<Self>,
        flow_id: &FlowId,
        batch: Vec<Cmd>,
        causes: Vec<tracing::Span>,
        placing: &mut Placing,
        cache: &mut Option<Stored>,
        watch: &mut Watch,
    ) -> bool {
        let now = common::now_ms();
        for _ in 0..bus::CAS_ATTEMPTS {
            let cached = cache.take();
            let from_cache = cached.is_some();
            let (mut flow, revision, stored) = match cached {
                Some(c) => c,
                None => match store::read(&self.flows, flow_id).await {
                    Ok(Some(found)) => found,
                    Ok(None) => {
                        self.settle_missing(flow_id, batch).await;
                        return true;
                    }
                    Err(e) => {
                        self.settle_failed(flow_id, batch, &e, placing).await;
                        return false;
                    }
                },
            };
            let outcomes: Vec<Result<(u32, Vec<Effect>), Refusal>> = batch
                .iter()
                .map(|cmd| step(&mut flow, cmd, revision, now))
                .collect();
            // The step's events go into the record with it (the outbox).
            let outbox_before = flow.outbox.clone();
            let (mut cursor, outbox_changed) = self.outbox.stage(
                &mut flow,
                outcomes.iter().flatten().flat_map(|(_, e)| events_of(e)),
                now,
            );
            // The encoding tells whether the step changed anything: it is
            // needed for the write anyway, and keeping a copy of a large
            // flow to compare against cost more than the step itself.
            let (body, dirty) = match store::encode(&mut flow, Some(&stored)) {
                Ok(encoded) => encoded,
                Err(err) => {
                    self.settle_failed(flow_id, batch, &err, placing).await;
                    return false;
                }
            };
            let changed = outbox_changed
                || store::before_outbox(&body.header) != store::before_outbox(&stored.header);
            if !changed {
                flow.outbox = outbox_before;
            }
            if !changed && from_cache && !self.still_current(&flow, revision).await {
                continue;
            }
            let span = step_span(&flow, changed, &causes, placing, now);
            let revision = if !changed {
                revision
            } else {
                match store::write(&self.flows, &self.nats, &flow, &body, &dirty, revision)
                    .instrument(span.clone())
                    .await
                {
                    Ok(rev) => rev,
                    Err(WriteError::Conflict) => continue,
                    Err(WriteError::Failed(err)) => {
                        self.settle_failed(flow_id, batch, &err, placing).await;
                        return false;
                    }
                }
            };
            #[cfg(feature = "failpoints")]
            if changed {
                crate::failpoints::after_write(flow_id).await;
            }
            watch.pending |= changed;
            if watch.due(&flow, now) {
                self.publish_watch(&flow, revision, now, watch)
                    .instrument(span.clone())
                    .await;
            }
            // Each command's outcome in its cause's span (the step's when it
            // has none): a report's transitions and the assignment a
            // placement leads to continue the trace they came from.
            for ((cmd, outcome), cause) in batch.into_iter().zip(outcomes).zip(causes) {
                let span = if cause.is_disabled() {
                    span.clone()
                } else {
                    cause
                };
                let cursor = &mut cursor;
                async {
                    let effects = self
                        .settle(&flow, revision, now, cmd, outcome, placing)
                        .await;
                    self.run_effects(effects, cursor).await;
                }
                .instrument(span)
                .await;
            }
            self.outbox.sent(cursor, now);
            span.in_scope(|| self.dispatch(&flow, now, placing));
            // Finished once its last events are known to be stored too.
            let finished = flow.state.is_terminal() && flow.outbox.is_empty();
            *cache = Some((flow, revision, body));
            return finished;
        }
        let err = Error::new(ErrorCode::Conflict, "too much contention on the flow");
        self.settle_failed(flow_id, batch, &err, placing).await;
        false
    }

    /// Whether a large flow's stored header is still at `revision`, so the
    /// copy this actor holds is current without reading every page again
    /// (a tick that changes nothing would otherwise read the whole flow).
    async fn still_current(&self, flow: &Flow, revision: u64) -> bool {
        if flow.pages.is_none() {
            return false;
        }
        matches!(
            self.flows.entry(flow.id.as_str()).await,
            Ok(Some(e)) if e.revision == revision && e.operation == kv::Operation::Put
        )
    }

    /// After a successful write: acknowledge and answer; returns the
    /// command's effects to carry out.
    async fn settle(
        self: &Arc<Self>,
        flow: &Flow,
        revision: u64,
        now: u64,
        cmd: Cmd,
        outcome: Result<(u32, Vec<Effect>), Refusal>,
        placing: &mut Placing,
    ) -> Vec<Effect> {
        let mut effects = Vec::new();
        match (cmd, outcome) {
            (Cmd::Report { msg, .. }, Ok((_, e))) => {
                let _ = msg.ack().await;
                effects.extend(e);
            }
            (Cmd::Report { msg, .. }, Err(Refusal::Rejected(Rejection::AlreadyApplied))) => {
                tracing::debug!(subject = %msg.subject, "report delivered again after it was applied");
                let _ = msg.ack().await;
            }
            (Cmd::Report { report, msg }, Err(rejection)) => {
                let _ = msg.ack().await;
                let (code, reason) = match &rejection {
                    Refusal::Rejected(r) => r.verdict(),
                    _ => (ErrorCode::Fenced, RejectReason::Other),
                };
                self.reject(&report, &msg, code, reason, rejection.to_string())
                    .await;
            }
            (
                Cmd::Assign {
                    task, allocation, ..
                },
                Ok((attempt, e)),
            ) => {
                placing.placed(&task);
                effects.extend(e);
                self.send_assignment(
                    flow,
                    &task,
                    attempt,
                    allocation.agent_id,
                    allocation.allocation_id,
                    now,
                );
            }
            (
                Cmd::Assign {
                    task,
                    allocation,
                    slot,
                    ..
                },
                Err(rejection),
            ) => {
                placing.remove(&task);
                tracing::debug!(flow = %flow.id, %task, %rejection, "placement not used");
                self.release(allocation.agent_id, allocation.allocation_id);
                self.free_slot(slot);
            }
            (Cmd::Unplaced { task, asked_at }, _) => {
                placing.refused(task, asked_at, self.freed.load(Ordering::Relaxed), now);
            }
            (Cmd::Control { reply, .. }, Ok((_, e))) => {
                effects.extend(e);
                let _ = reply.send(Ok(flow.status(revision, now)));
            }
            (Cmd::Control { reply, .. }, Err(rejection)) => {
                let _ = reply.send(Err(refusal_error(&rejection)));
            }
            (_, Ok((_, e))) => effects.extend(e),
            (_, Err(_)) => {}
        }
        effects
    }

    /// Tells watchers of the flow what it looks like now (counts and progress,
    /// not every task: a watcher that wants those asks for the status).
    async fn publish_watch(&self, flow: &Flow, revision: u64, now: u64, watch: &mut Watch) {
        *watch = Watch {
            pending: false,
            last_ms: now,
            last_state: Some(flow.state),
        };
        let status = off_worker(flow.pages.is_some(), || flow.overview(revision, now));
        if let Ok(body) = serde_json::to_vec(&status) {
            if let Err(e) = self
                .nats
                .publish(subject::flow_watch(&flow.id), body.into())
                .await
            {
                tracing::debug!(error = %e, "watch update not sent");
            }
        }
    }

    /// The flow is gone: nothing in the batch can apply.
    async fn settle_missing(self: &Arc<Self>, flow_id: &FlowId, batch: Vec<Cmd>) {
        for cmd in batch {
            match cmd {
                Cmd::Report { report, msg } => {
                    let _ = msg.ack().await;
                    self.reject(
                        &report,
                        &msg,
                        ErrorCode::NotFound,
                        RejectReason::UnknownFlow,
                        format!("no flow {flow_id}"),
                    )
                    .await;
                }
                Cmd::Assign {
                    allocation, slot, ..
                } => {
                    self.release(allocation.agent_id, allocation.allocation_id);
                    self.free_slot(slot);
                }
                Cmd::Control { reply, .. } => {
                    let _ = reply.send(Err(Error::not_found(format!("no flow {flow_id}"))));
                }
                _ => {}
            }
        }
    }

    /// Storage failed: reports are redelivered later, placements given back
    /// unless the write landed after all, and the tasks may be placed again.
    async fn settle_failed(
        self: &Arc<Self>,
        flow_id: &FlowId,
        batch: Vec<Cmd>,
        err: &Error,
        placing: &mut Placing,
    ) {
        tracing::warn!(error = %err, "flow step not applied");
        for cmd in batch {
            match cmd {
                Cmd::Report { msg, .. } => {
                    let _ = msg
                        .ack_with(jetstream::AckKind::Nak(Some(Duration::from_millis(500))))
                        .await;
                }
                Cmd::Assign {
                    task,
                    allocation,
                    slot,
                    ..
                } => {
                    placing.remove(&task);
                    self.release_unless_held(flow_id.clone(), task, *allocation, slot);
                }
                Cmd::Unplaced { task, .. } => {
                    placing.remove(&task);
                }
                Cmd::Control { reply, .. } => {
                    let _ = reply.send(Err(err.clone()));
                }
                _ => {}
            }
        }
    }

    /// A report changed nothing: the agent hears why on its own subject, and
    /// the rejection is an event.
    async fn reject(
        &self,
        report: &AgentReport,
        msg: &jetstream::Message,
        code: ErrorCode,
        why: RejectReason,
        reason: String,
    ) {
        tracing::info!(flow = %report.flow_id, task = %report.task_id, attempt = report.attempt, %reason, "report rejected");
        if let Some(agent) = subject::agent_of(&msg.subject) {
            self.tell_rejected(
                &agent,
                ReportRejected {
                    flow_id: Some(report.flow_id.to_string()),
                    task_id: Some(report.task_id.to_string()),
                    attempt: Some(report.attempt),
                    report_type: Some(report.kind.type_name().to_owned()),
                    code,
                    reason: why,
                    message: reason.clone(),
                    msg_id: msg_id(msg),
                    at_ms: now_ms(),
                    event_type: None,
                    event_id: None,
                },
            )
            .await;
        }
        self.events
            .publish(EventKind::ReportRejected {
                flow_id: report.flow_id.clone(),
                task_id: report.task_id.clone(),
                attempt: report.attempt,
                agent_id: report.agent_id.clone(),
                reason,
            })
            .await;
    }

    /// Publishes a verdict on the agent's `rejected` subject (core NATS: an
    /// agent that is not listening loses nothing but the explanation).
    async fn tell_rejected(&self, agent: &AgentId, verdict: ReportRejected) {
        if let Ok(body) = serde_json::to_vec(&verdict) {
            if let Err(e) = self
                .nats
                .publish_with_headers(
                    subject::rejected(agent),
                    telemetry::producer_headers(&subject::rejected(agent)),
                    body.into(),
                )
                .await
            {
                tracing::warn!(agent = %agent, error = %e, "rejection not sent");
            }
        }
    }

    /// Carries out a step's effects; its events are published under the
    /// numbers `cursor` gives them (those the step stored them under).
    async fn run_effects(self: &Arc<Self>, effects: Vec<Effect>, cursor: &mut Cursor) {
        for effect in effects {
            match effect {
                Effect::Event(kind) => self.outbox.publish(&self.js, cursor, kind).await,
                Effect::Release { agent, allocation } => self.release(agent, allocation),
                Effect::FreeSlot { key, holder } => self.free_slot(Some((key, holder))),
                Effect::Cancel { agent, notice } => {
                    if let Ok(body) = serde_json::to_vec(&notice) {
                        let to = subject::cancel(&agent);
                        let headers = telemetry::producer_headers(&to);
                        if let Err(e) = self
                            .nats
                            .publish_with_headers(to, headers, body.into())
                            .await
                        {
                            tracing::warn!(agent = %agent, error = %e, "cancel notice not sent");
                        }
                    }
                }
            }
        }
    }

    /// Asks the allocator to place every task that is due and not being placed
    /// already; each grant comes back to the actor as an `Assign`.
    fn dispatch(self: &Arc<Self>, flow: &Flow, now: u64, placing: &mut Placing) {
        placing.refresh(self.freed.load(Ordering::Relaxed));
        self.dispatch_due(flow, now, placing);
        if let Some(wait) = placing.wake_in(now) {
            let (o, flow_id) = (self.clone(), flow.id.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(wait)).await;
                o.send(&flow_id, Cmd::Wake);
            });
        }
    }

    fn dispatch_due(self: &Arc<Self>, flow: &Flow, now: u64, placing: &mut Placing) {
        // A wide flow refills its placements in batches, once half of them
        // have come back, rather than after every grant.
        if placing.len() > MAX_PLACING_PER_FLOW / 2 {
            return;
        }
        let budget = match flow.max_parallelism {
            Some(max) => (max as usize).saturating_sub(flow.active() + placing.len()),
            None => usize::MAX,
        }
        .min(MAX_PLACING_PER_FLOW.saturating_sub(placing.len()));
        if budget == 0 {
            return;
        }
        // Per concurrency key: slots this flow is taking already.
        let mut taking: HashMap<&str, usize> = HashMap::new();
        for t in placing.iter().filter_map(|t| flow.tasks.get(t)) {
            if let Some(c) = &t.spec.concurrency {
                *taking.entry(c.key.as_str()).or_default() += 1;
            }
        }
        let mut due = Vec::new();
        // Held-back tasks keep their place in the budget (a flow with nowhere
        // to run would otherwise go on to try every task it has); tasks
        // skipped for a full concurrency key do not hide the others.
        let mut held = 0;
        flow.visit_dispatchable(now, |t| {
            let id = &t.spec.id;
            if placing.contains(id) {
                return true;
            }
            if placing.held_back(id, now) {
                held += 1;
            } else if let Some(c) = &t.spec.concurrency {
                let n = taking.entry(c.key.as_str()).or_default();
                if *n < c.limit as usize && !self.slots.known_full(&c.key, now) {
                    *n += 1;
                    due.push(id.clone());
                }
            } else {
                due.push(id.clone());
            }
            due.len() + held < budget
        });
        for task in due {
            let Some(t) = flow.tasks.get(&task) else {
                continue;
            };
            placing.insert(task.clone());
            let slot = t.spec.concurrency.clone().map(|c| {
                let holder = machine::slot_holder(&flow.id, &task, t.attempt + 1);
                (c, holder)
            });
            let request = AllocateRequest {
                owner: flow.allocation_owner(&task),
                requirements: t.spec.requirements.clone(),
                priority: t.spec.priority,
                allocation_id: Some(AllocationId::random()),
                deadline_ms: None,
                task: Some(TaskRef {
                    flow_id: flow.id.clone(),
                    task_id: task.clone(),
                }),
                ttl_ms: None,
            };
            let (o, flow_id) = (self.clone(), flow.id.clone());
            // The grant goes back to the actor with this span as its cause,
            // so the assignment it leads to continues the same trace.
            let span = tracing::info_span!("place", flow = %flow.id, task = %task);
            tokio::spawn(
                async move {
                    let asked_at = o.freed.load(Ordering::Relaxed);
                    if let Some((limit, holder)) = &slot {
                        let now = common::now_ms();
                        match o.slots.acquire(limit, holder, &flow_id, now).await {
                            Ok(true) => {}
                            Ok(false) => {
                                o.send(&flow_id, Cmd::Unplaced { task, asked_at });
                                return;
                            }
                            Err(e) => {
                                tracing::warn!(key = %limit.key, error = %e, "concurrency slot not taken");
                                o.send(&flow_id, Cmd::Unplaced { task, asked_at });
                                return;
                            }
                        }
                    }
                    let slot = slot.map(|(limit, holder)| (limit.key, holder));
                    let cmd = match o.place(&request).await {
                        Some(allocation) => Cmd::Assign {
                            task,
                            allocation: Box::new(allocation),
                            slot,
                            granted_ms: common::now_ms(),
                        },
                        None => {
                            o.free_slot(slot);
                            Cmd::Unplaced { task, asked_at }
                        }
                    };
                    o.send(&flow_id, cmd);
                }
                .instrument(span),
            );
        }
    }

    /// One placement through the allocator, with at most [`MAX_PLACING`] in
    /// flight per replica. A request that got no answer may still have been
    /// booked, so its (caller-chosen) allocation id is released, now and once
    /// more a little later in case the booking lands after the first release.
    async fn place(self: &Arc<Self>, request: &AllocateRequest) -> Option<Allocation> {
        let _slot = self.placing.acquire().await.ok()?;
        match self.client.allocate(request).await {
            Ok(allocation) => Some(allocation),
            Err(e) => {
                // No capacity yet is normal: the next tick tries again.
                tracing::debug!(owner = %request.owner, code = %e.code, message = %e.message, "not placed");
                if let (ErrorCode::Timeout | ErrorCode::Unavailable, Some(id)) =
                    (e.code, &request.allocation_id)
                {
                    let (o, id) = (self.clone(), id.clone());
                    tokio::spawn(async move {
                        o.release_by_id(id.clone(), None).await;
                        tokio::time::sleep(Duration::from_secs(10)).await;
                        o.release_by_id(id, None).await;
                    });
                }
                None
            }
        }
    }

    /// Publishes again the assignments that are still not started a while after
    /// they were recorded. The replica that recorded one may have died before
    /// publishing it; the `Nats-Msg-Id` makes a repeat of one that did get
    /// through a no-op, as long as it falls inside the stream's duplicate window.
    fn redeliver(
        self: &Arc<Self>,
        flow: &Flow,
        now: u64,
        resent: &mut HashMap<(TaskId, u32), u64>,
    ) {
        resent.retain(|(task, attempt), _| {
            flow.tasks
                .get(task)
                .is_some_and(|t| t.state == TaskState::Assigned && t.attempt == *attempt)
        });
        for t in flow
            .tasks
            .values()
            .filter(|t| t.state == TaskState::Assigned)
        {
            let Some(assigned) = t.assigned_ms else {
                continue;
            };
            let age = now.saturating_sub(assigned);
            if !(REDELIVER_AFTER_MS..REDELIVER_UNTIL_MS).contains(&age) {
                continue;
            }
            let key = (t.spec.id.clone(), t.attempt);
            if resent
                .get(&key)
                .is_some_and(|last| now.saturating_sub(*last) < REDELIVER_AFTER_MS)
            {
                continue;
            }
            let (Some(agent), Some(allocation)) = (t.agent.clone(), t.allocation.clone()) else {
                continue;
            };
            resent.insert(key, now);
            // In the flow's trace: the sweep that got here has none of its own.
            let span =
                tracing::info_span!(parent: None, "redeliver", flow = %flow.id, task = %t.spec.id);
            telemetry::join_causes(&span, &[], flow.trace.as_deref());
            span.in_scope(|| {
                tracing::debug!(attempt = t.attempt, "assignment published again");
                self.send_assignment(flow, &t.spec.id, t.attempt, agent, allocation, assigned)
            });
        }
    }

    /// Publishes an assignment on the agent's durable subject; if JetStream
    /// refuses it, the task goes back to ready. If JetStream does not answer,
    /// the assignment may be stored and on its way to the agent, so the task
    /// stays assigned and [`Orchestrator::redeliver`] publishes it again under
    /// the same message id: taking it back would run the task twice.
    fn send_assignment(
        self: &Arc<Self>,
        flow: &Flow,
        task: &TaskId,
        attempt: u32,
        agent: AgentId,
        allocation: AllocationId,
        assigned_at_ms: u64,
    ) {
        let Some(t) = flow.tasks.get(task) else {
            return;
        };
        let assignment = Assignment {
            flow_id: flow.id.clone(),
            task_id: task.clone(),
            attempt,
            agent_id: agent,
            kind: t.spec.kind.clone(),
            input: t.spec.input.clone(),
            allocation_id: allocation,
            resources: t.spec.requirements.resources.clone(),
            assigned_at_ms,
            lease: t.lease(assigned_at_ms, self.tick_ms),
        };
        let o = self.clone();
        tokio::spawn(
            async move {
                match o.publish_assignment(&assignment).await {
                    Ok(()) => {}
                    Err(e) if e.code == ErrorCode::Timeout => {
                        tracing::warn!(flow = %assignment.flow_id, task = %assignment.task_id, error = %e, "assignment unconfirmed, publishing it again later");
                    }
                    Err(e) => {
                        tracing::warn!(flow = %assignment.flow_id, task = %assignment.task_id, error = %e, "assignment not sent");
                        o.send(&assignment.flow_id, Cmd::Unassign { task: assignment.task_id.clone(), attempt });
                    }
                }
            }
            .in_current_span(),
        );
    }

    async fn publish_assignment(&self, a: &Assignment) -> Result<(), Error> {
        let body = serde_json::to_vec(a).map_err(|e| Error::internal(e.to_string()))?;
        let msg_id = format!("{}.{}.{}", a.flow_id, a.task_id, a.attempt);
        let to = subject::assign(&a.agent_id);
        let ack = self
            .js
            .publish_with_headers(to.clone(), bus::dedupe_headers(&to, &msg_id), body.into())
            .await
            .map_err(|e| Error::new(ErrorCode::Unavailable, e.to_string()))?;
        ack.await.map_err(|e| {
            // No answer is not a refusal: the server may have stored it and
            // gone away before acknowledging (a restart, a lost connection).
            let code = match e.kind() {
                jetstream::context::PublishErrorKind::TimedOut => ErrorCode::Timeout,
                _ => ErrorCode::Unavailable,
            };
            Error::new(code, e.to_string())
        })?;
        Ok(())
    }

    /// Gives a concurrency slot back, then wakes this replica's flows that
    /// found its key full.
    fn free_slot(self: &Arc<Self>, slot: SlotHeld) {
        let Some((key, holder)) = slot else {
            return;
        };
        self.freed.fetch_add(1, Ordering::Relaxed);
        let o = self.clone();
        tokio::spawn(
            async move {
                for flow in o.slots.free(&key, &holder).await {
                    o.send(&flow, Cmd::Tick);
                }
            }
            .in_current_span(),
        );
    }

    fn release(self: &Arc<Self>, agent: AgentId, allocation: AllocationId) {
        self.freed.fetch_add(1, Ordering::Relaxed);
        let o = self.clone();
        tokio::spawn(
            async move { o.release_by_id(allocation, Some(agent)).await }.in_current_span(),
        );
    }

    /// Releases an allocation a failed step was to record, once the flow can
    /// be read and does not hold it. A write that timed out may have been
    /// stored (the server went away before answering): releasing at once
    /// would leave an assigned task on capacity the allocator thinks is free.
    fn release_unless_held(
        self: &Arc<Self>,
        flow_id: FlowId,
        task: TaskId,
        allocation: Allocation,
        slot: SlotHeld,
    ) {
        let o = self.clone();
        tokio::spawn(
            async move {
                let mut pause = Duration::from_millis(200);
                let held = loop {
                    match store::read(&o.flows, &flow_id).await {
                        Ok(flow) => {
                            break flow.is_some_and(|(f, _, _)| {
                                f.tasks.get(&task).is_some_and(|t| {
                                    t.allocation.as_ref() == Some(&allocation.allocation_id)
                                })
                            })
                        }
                        Err(e) if pause < Duration::from_secs(60) => {
                            tracing::debug!(error = %e, "flow unreadable, checking the allocation later");
                            tokio::time::sleep(pause).await;
                            pause *= 2;
                        }
                        // Still unknown after a minute: give it back rather
                        // than hold it for ever.
                        Err(_) => break false,
                    }
                };
                if !held {
                    o.free_slot(slot);
                    o.release_by_id(allocation.allocation_id, Some(allocation.agent_id))
                        .await;
                }
            }
            .in_current_span(),
        );
    }

    /// Releases are idempotent, and a lost one holds the agent's capacity
    /// until the agent itself is lost, so one that gets no answer (or an
    /// unavailable store) is tried again with back-off, for about a minute.
    async fn release_by_id(&self, allocation: AllocationId, agent: Option<AgentId>) {
        let req = ReleaseRequest {
            allocation_id: allocation,
            agent_id: agent,
        };
        let mut pause = Duration::from_millis(100);
        for attempt in 1..=RELEASE_ATTEMPTS {
            match self.client.release(&req).await {
                Ok(_) => {
                    self.freed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(e)
                    if attempt < RELEASE_ATTEMPTS
                        && matches!(e.code, ErrorCode::Timeout | ErrorCode::Unavailable) =>
                {
                    tracing::debug!(allocation = %req.allocation_id, error = %e, attempt, "release unanswered, trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(10));
                }
                Err(e) => {
                    tracing::warn!(allocation = %req.allocation_id, error = %e, "release failed");
                    return;
                }
            }
        }
    }

    /// Opens (creating it if needed) a durable pull consumer and its messages.
    async fn durable_messages(
        &self,
        stream: &str,
        config: consumer::pull::Config,
    ) -> Result<consumer::pull::Stream, Error> {
        let unavailable =
            |e: &dyn std::fmt::Display| Error::new(ErrorCode::Unavailable, e.to_string());
        let name = config.durable_name.clone().unwrap_or_default();
        let stream = self
            .js
            .get_stream(stream)
            .await
            .map_err(|e| unavailable(&e))?;
        // Create or update: a consumer made by an older build gets this
        // build's filters (the allocator events grew `agent.left`).
        let consumer: consumer::PullConsumer = match stream.create_consumer(config.clone()).await {
            Ok(c) => c,
            Err(_) => stream
                .get_or_create_consumer(&name, config)
                .await
                .map_err(|e| unavailable(&e))?,
        };
        consumer.messages().await.map_err(|e| unavailable(&e))
    }

    /// Hands agents' reports from the shared durable consumer to the flows' actors.
    async fn consume_reports(self: Arc<Self>, ack_wait: Duration) {
        keep_running("reports", || self.clone().consume_reports_once(ack_wait)).await;
    }

    async fn consume_reports_once(self: Arc<Self>, ack_wait: Duration) -> Result<(), Error> {
        let mut messages = self
            .durable_messages(
                common::nats::STREAM_REPORTS,
                consumer::pull::Config {
                    durable_name: Some(common::nats::CONSUMER_ORCHESTRATOR.to_owned()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait,
                    max_ack_pending: 20_000,
                    ..Default::default()
                },
            )
            .await?;
        let unavailable =
            |e: &dyn std::fmt::Display| Error::new(ErrorCode::Unavailable, e.to_string());
        while let Some(msg) = messages.next().await {
            let msg = msg.map_err(|e| unavailable(&e))?;
            let report: AgentReport = match serde_json::from_slice(&msg.payload) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(subject = %msg.subject, error = %e, "unreadable report dropped");
                    let _ = msg.ack_with(jetstream::AckKind::Term).await;
                    if let Some(agent) = subject::agent_of(&msg.subject) {
                        self.tell_rejected(&agent, malformed(&msg, &e)).await;
                    }
                    continue;
                }
            };
            // Identity comes from the subject the agent may publish on, not from the JSON.
            if subject::agent_of(&msg.subject).as_ref() != Some(&report.agent_id) {
                let _ = msg.ack().await;
                self.reject(
                    &report,
                    &msg,
                    ErrorCode::BadRequest,
                    RejectReason::AgentMismatch,
                    format!(
                        "report names agent {} but was published on another agent's subject, {}",
                        report.agent_id, msg.subject
                    ),
                )
                .await;
                continue;
            }
            // The agent's trace goes with the report into the flow's actor.
            let span = telemetry::consumer_span(&msg.subject, msg.headers.as_ref());
            let flow = report.flow_id.clone();
            span.in_scope(|| {
                self.send(
                    &flow,
                    Cmd::Report {
                        report: Box::new(report),
                        msg: Box::new(msg),
                    },
                )
            });
        }
        Ok(())
    }

    /// Whether the sweep may skip `id` as finished. Every
    /// [`FINISHED_RECHECK_MS`] the stored revision (the header's only) is
    /// compared with the one the flow finished at: another replica may have
    /// re-run or changed it, and this one must sweep it should that one go.
    async fn still_finished(&self, id: &FlowId, now: u64) -> bool {
        let known = self.finished.lock().ok().and_then(|d| d.get(id).copied());
        let Some(known) = known else {
            return false;
        };
        if now.saturating_sub(known.checked_ms) < FINISHED_RECHECK_MS {
            return true;
        }
        let same = match self.flows.entry(id.as_str()).await {
            Ok(Some(e)) => e.revision == known.revision,
            Ok(None) => false,
            // Checked again on the next sweep.
            Err(_) => return true,
        };
        if let Ok(mut done) = self.finished.lock() {
            if same {
                done.insert(
                    id.clone(),
                    Finished {
                        checked_ms: now,
                        ..known
                    },
                );
            } else {
                done.remove(id);
            }
        }
        same
    }

    /// Ticks every unfinished flow: deadlines, back-offs, unplaced tasks.
    async fn sweep(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_reconcile = 0;
        loop {
            tick.tick().await;
            let now = common::now_ms();
            if now.saturating_sub(last_reconcile) >= crate::slots::GRACE_MS / 3 {
                last_reconcile = now;
                let load = |id: FlowId| {
                    let flows = self.flows.clone();
                    async move { Ok(store::read(&flows, &id).await?.map(|(f, _, _)| f)) }
                };
                if let Err(e) = self.slots.reconcile(now, load).await {
                    tracing::warn!(error = %e, "concurrency slots not reconciled");
                }
            }
            let Ok(ids) = self.flow_ids().await else {
                continue;
            };
            for id in ids {
                if self.still_finished(&id, now).await {
                    continue;
                }
                // A flow with an actor here is ticked without a read: the
                // actor holds it current and notes when it is finished.
                let live = self
                    .actors
                    .lock()
                    .map(|a| a.contains_key(&id))
                    .unwrap_or(false);
                if live {
                    self.send(&id, Cmd::Tick);
                    continue;
                }
                match self.load(&id).await {
                    // Its last events still in its outbox: ticked until stored.
                    Ok((flow, revision)) if flow.state.is_terminal() && flow.outbox.is_empty() => {
                        if let Ok(mut done) = self.finished.lock() {
                            let checked_ms = now;
                            done.insert(
                                id,
                                Finished {
                                    revision,
                                    checked_ms,
                                },
                            );
                        }
                    }
                    Ok(_) => self.send(&id, Cmd::Tick),
                    Err(_) => {}
                }
            }
        }
    }
}

/// Runs a consumer loop for ever, starting it again (after a pause) whenever it
/// ends: a server restart or a deleted consumer ends it, and it must come back.
async fn keep_running<F, Fut>(what: &'static str, mut run: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), Error>>,
{
    loop {
        if let Err(e) = run().await {
            tracing::warn!(error = %e, consumer = what, "consumer stopped, restarting");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A report's `Nats-Msg-Id` header, if it had one.
fn msg_id(msg: &jetstream::Message) -> Option<String> {
    msg.headers
        .as_ref()
        .and_then(|h| h.get("Nats-Msg-Id"))
        .map(|v| v.to_string())
}

/// The verdict on a report that is not an `AgentReport`: whatever of its ids
/// can be read is echoed, so the agent can tell which report it was.
fn malformed(msg: &jetstream::Message, e: &serde_json::Error) -> ReportRejected {
    let body: Option<serde_json::Map<String, Value>> = serde_json::from_slice(&msg.payload).ok();
    let text = |k: &str| {
        body.as_ref()
            .and_then(|b| b.get(k))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    ReportRejected {
        flow_id: text("flow_id"),
        task_id: text("task_id"),
        attempt: body
            .as_ref()
            .and_then(|b| b.get("attempt"))
            .and_then(Value::as_u64)
            .and_then(|a| u32::try_from(a).ok()),
        report_type: text("type"),
        code: ErrorCode::BadRequest,
        reason: RejectReason::Malformed,
        message: format!("not a report: {e}"),
        msg_id: msg_id(msg),
        at_ms: now_ms(),
        event_type: None,
        event_id: None,
    }
}

/// Why a quota covering the owner keeps `needs` back, if one does.
fn quota_reached(c: &common::msg::CapacityStatus, needs: &Requirements) -> Option<String> {
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

/// The span of one step (one write) of a flow's actor. It continues the
/// trace of the first command that has one and links the others'; a step
/// driven only by the sweep continues the flow's own trace. A sweep's step that
/// changes nothing and places nothing gets no span, else every unfinished flow
/// would add one to its trace every sweep.
fn step_span(
    flow: &Flow,
    changed: bool,
    causes: &[tracing::Span],
    placing: &HashSet<TaskId>,
    now: u64,
) -> tracing::Span {
    let caused = causes.iter().any(|c| !c.is_disabled());
    // Only asked when nothing else says the step matters.
    let places = || {
        let room = flow
            .max_parallelism
            .is_none_or(|max| (max as usize) > flow.active() + placing.len());
        room && flow
            .dispatchable_up_to(now, placing.len() + 1)
            .iter()
            .any(|t| !placing.contains(t))
    };
    if !caused && !changed && !places() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        parent: None,
        "flow step",
        flow = %flow.id,
        commands = causes.len()
    );
    telemetry::join_causes(&span, causes, flow.trace.as_deref());
    span
}

/// The events among a step's effects.
fn events_of(effects: &[Effect]) -> impl Iterator<Item = &EventKind> {
    effects.iter().filter_map(|e| match e {
        Effect::Event(kind) => Some(kind),
        _ => None,
    })
}

/// One command applied to the flow. `Ok` carries the attempt number for an
/// assignment (0 otherwise) and the step's effects.
fn step(
    flow: &mut Flow,
    cmd: &Cmd,
    revision: u64,
    now: u64,
) -> Result<(u32, Vec<Effect>), Refusal> {
    Ok(match cmd {
        Cmd::Report { report, .. } => (0, flow.report(report, now)?),
        Cmd::Assign {
            task,
            allocation,
            granted_ms,
            ..
        } => {
            let age_ms = now.saturating_sub(*granted_ms);
            if age_ms > GRANT_MAX_AGE_MS {
                return Err(Refusal::LateGrant { age_ms });
            }
            flow.assign(task, &allocation.agent_id, &allocation.allocation_id, now)?
        }
        Cmd::Unplaced { .. } | Cmd::Wake => (0, Vec::new()),
        Cmd::Unassign { task, attempt } => (0, flow.unassign(task, *attempt, now)?),
        Cmd::Tick => (0, flow.tick(now)),
        Cmd::AgentGone(agent, left) => (0, flow.agent_gone(agent, *left, now)),
        Cmd::Preempted {
            task,
            allocation,
            reason,
        } => (0, flow.preempted(task, allocation, reason, now)),
        Cmd::Event {
            task,
            event,
            stored_ms,
        } => {
            let whole = serde_json::to_value(event.as_ref()).unwrap_or(Value::Null);
            let seen = machine::AgentEventRef {
                event_type: &event.event_type,
                agent_id: &event.agent_id,
                data: &event.data,
                whole: &whole,
            };
            (0, flow.event_arrived(task, &seen, *stored_ms, now)?)
        }
        Cmd::Control { op, .. } => match op {
            Control::Pause => (0, flow.pause()?),
            Control::Resume => (0, flow.resume(now)?),
            Control::Cancel => (0, flow.cancel(now)?),
            Control::Modify(changes) => {
                if changes.expected_revision != revision {
                    return Err(Refusal::Stale {
                        expected: changes.expected_revision,
                        current: revision,
                    });
                }
                (0, flow.modify(changes, now).map_err(Refusal::Invalid)?)
            }
            Control::Rerun(task) => (0, flow.rerun(task, now).map_err(Refusal::Invalid)?),
        },
    })
}
