//! The orchestrator's NATS adapter.
//!
//! Flows live in the `coord_flows` KV bucket: one entry per flow, and a large
//! flow's tasks in page entries beside it (`crate::store`). In each replica
//! every flow with work in progress has an *actor*: a task that takes commands
//! (agent reports, placements, timer ticks, pause/resume/cancel) from a queue,
//! applies all that are waiting to the flow in one machine step, and writes the
//! result with one compare-and-set. Under load a single KV write thus carries
//! many task transitions, and no two steps of one replica race each other. Steps
//! of different replicas still may: the loser re-reads and re-applies its batch.
//! So a replica hands a flow's reports to the replica that wrote it last, while
//! that one answers (`forward`).
//! Effects (events, assignments, releases, cancel notices) run only after the
//! write succeeded; the events are stored with the write too (see [`crate::outbox`]).
//!
//! Replicas share the `$SRV` queue group for requests and one durable consumer
//! on the reports stream. A periodic sweep ticks every unfinished flow, which
//! expires attempts past their stored deadlines, ends back-offs and dispatches
//! ready tasks nobody placed — so a restarted or replacement replica picks up
//! every flow from KV alone.
//!
//! Here: start-up and endpoint wiring (`run`) and the types the jobs share.
//! The jobs: `api` (request handlers), `actor` (queue and step), `settle`
//! (after a step's write), `dispatch` (placement, assignment, release),
//! `intake` (reports, stored and early), `forward` (reports handed between
//! replicas), `sweep`, and the events from agents and the allocator
//! (`agent_events`, `allocator_events`).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv};
use common::msg::{
    AgentReport, AllocateRequest, Allocation, Assignment, CancelNotice, CapacityRequest, EventKind,
    ExplainRequest, Explanation, FlowChanges, FlowList, FlowListRequest, FlowOptimizeRequest,
    FlowPlan, FlowRef, FlowSpec, FlowStatus, HeldRequest, RejectReason, ReleaseRequest,
    ReportRejected, Requirements, RerunRequest, TaskSpec,
};
use common::nats::{self as bus, Bucket, EventPublisher, Stream};
use common::now_ms;
use common::service::Service;
use common::{subject, telemetry, AgentId, AllocationId, Error, ErrorCode, FlowId, TaskId};
use futures::{StreamExt, TryStreamExt};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tracing::Instrument;

use common::msg::{FlowState, TaskState};

use crate::machine::{self, Driver, Effect, Executor, Flow, Rejection, Wake};
use crate::outbox::{Cursor, Ledger};
use crate::slots::Slots;
use crate::store::{self, Stored, WriteError};

mod actor;
mod agent_events;
mod allocator_events;
mod api;
mod create;
mod delivery;
mod dispatch;
mod feasible;
mod first;
mod forward;
mod intake;
mod known;
mod replicas;
mod settle;
mod spare;
mod sweep;

use actor::{events_of, Watch};
use dispatch::Exec;
use intake::msg_id;

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
    /// How long the assignments a new flow sends at creation may wait to be
    /// recorded, in ms: they go out before their record, which waits this
    /// long for the agents' first reports so that one write records both
    /// (a one-task flow is then two writes). Zero records them at once.
    #[arg(long, env = "ORCHESTRATOR_FIRST_RECORD_MS", default_value_t = FIRST_RECORD_MS)]
    pub first_record_ms: u64,
    /// How long a new flow's first write may wait for the agents' first
    /// reports, in ms, when the orchestrator chose the flow's id and booked
    /// every ready task at creation: its first assignments go out at once,
    /// and one write then stores the flow with what the agents reported (a
    /// short one-task flow is one write). The creation's reply waits for
    /// that write. Zero writes the creation at once.
    #[arg(long, env = "ORCHESTRATOR_FIRST_WRITE_MS", default_value_t = FIRST_WRITE_MS)]
    pub first_write_ms: u64,
    /// How long a task's allocation is kept after the task succeeded, in
    /// ms, to hand on to the next task placed here with the same owner,
    /// requirements and priority (which then waits on no booking). Zero
    /// gives it back at once.
    #[arg(
        long,
        env = "ORCHESTRATOR_KEEP_ALLOCATION_MS",
        default_value_t = KEEP_ALLOCATION_MS
    )]
    pub keep_allocation_ms: u64,
}

impl Config {
    pub fn new(nats: common::config::NatsConfig) -> Self {
        Config {
            nats,
            sweep_ms: 1_000,
            report_ack_wait_ms: 2_000,
            first_record_ms: FIRST_RECORD_MS,
            first_write_ms: FIRST_WRITE_MS,
            keep_allocation_ms: KEEP_ALLOCATION_MS,
        }
    }
}

const NAME: &str = "orchestrator";
/// See [`Config::first_record_ms`]: longer than an agent's grace before its
/// `started` report (20 ms in the agent runtime), so a short task's record
/// waits for its completion and a longer one's for its `started`.
const FIRST_RECORD_MS: u64 = 50;
/// See [`Config::first_write_ms`]: what a creation's reply may be delayed
/// by when its tasks take longer, below the agent runtime's grace before a
/// `started` report (20 ms).
const FIRST_WRITE_MS: u64 = 10;
/// See [`Config::keep_allocation_ms`]: long enough for a client to read a
/// flow's end and send the next, short enough that capacity others wait
/// for is not held idle for long.
const KEEP_ALLOCATION_MS: u64 = 50;
/// Most commands applied in one step.
const MAX_BATCH: usize = 512;
/// Allocation requests one replica has in flight at most: enough to keep the
/// allocator busy, few enough that a burst of ready tasks does not swamp it.
/// The allocator commits the bookings on one agent in groups, so what is in
/// flight is what fills a group and this window sets the pipelined rate:
/// from 64 to 256, 20 flows of 200 no-op tasks on 4 agents went from about
/// 3,000 to 4,500 tasks/s at the page cache and from 2,600 to 3,700 at an
/// fsync per write (one machine, 2 cores; `BENCHMARKS.md`).
const MAX_PLACING: usize = 256;
/// Tries at one release before leaving it to the agent's loss (see
/// `release_by_id`): with back-off doubling from 100 ms to 10 s, about a minute.
const RELEASE_ATTEMPTS: u32 = 10;
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
        msg: delivery::Delivery,
    },
    /// Record a placement the allocator granted (at `granted_ms`); `sent`:
    /// the attempt whose assignment went out already (a new flow's, see
    /// `create`), which an unrecorded grant takes back from the agent.
    Assign {
        task: TaskId,
        allocation: Box<Allocation>,
        slot: SlotHeld,
        granted_ms: u64,
        sent: Option<u32>,
    },
    /// The allocator did not place the task (it stays ready); `asked_at` is
    /// the replica's freed count when it was asked (see [`machine::Placing`]).
    Unplaced {
        task: TaskId,
        asked_at: u64,
    },
    /// Held-back tasks are due to be placed again.
    Wake,
    Tick,
    /// A timer of the flow is due (see [`Driver::set_alarm`]).
    Due,
    /// The allocator declared the agent lost.
    /// The agent was lost (`false`) or left (`true`) holding attempts.
    AgentGone(AgentId, bool),
    /// The allocator took an allocation back.
    Preempted {
        task: TaskId,
        allocation: AllocationId,
        reason: String,
    },
    /// The allocation an attempt was sent on was not handed on to it.
    NotHandedOn {
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

impl Cmd {
    /// What the machine is to apply for this command.
    fn command(&self) -> machine::Command<'_> {
        use machine::Command as C;
        match self {
            Cmd::Report { report, .. } => C::Report(report),
            Cmd::Assign {
                task,
                allocation,
                granted_ms,
                ..
            } => C::Placed {
                task,
                agent: &allocation.agent_id,
                allocation: &allocation.allocation_id,
                granted_ms: *granted_ms,
            },
            Cmd::Unplaced { .. } | Cmd::Wake => C::Nothing,
            Cmd::Tick => C::Tick,
            Cmd::Due => C::Due,
            Cmd::AgentGone(agent, left) => C::AgentGone { agent, left: *left },
            Cmd::Preempted {
                task,
                allocation,
                reason,
            } => C::Preempted {
                task,
                allocation,
                reason,
            },
            Cmd::NotHandedOn {
                task,
                allocation,
                reason,
            } => C::NotHandedOn {
                task,
                allocation,
                reason,
            },
            Cmd::Event {
                task,
                event,
                stored_ms,
            } => C::Event {
                task,
                event,
                stored_ms: *stored_ms,
            },
            Cmd::Control { op, .. } => match op {
                Control::Pause => C::Pause,
                Control::Resume => C::Resume,
                Control::Cancel => C::Cancel,
                Control::Modify(changes) => C::Modify(changes),
                Control::Rerun(task) => C::Rerun(task),
            },
        }
    }
}

/// A command with the span it was sent from (its cause), so the work it leads
/// to continues the sender's trace although the actor applies it later, in a
/// batch with others.
type Queued = (Cmd, tracing::Span);

struct Orchestrator {
    client: common::Client,
    nats: async_nats::Client,
    js: jetstream::Context,
    /// The outbox's own context: a context bounds the publishes waiting
    /// for their acknowledgement, so a burst of events (thousands at a
    /// wide flow's creation) queues behind its own, never a flow's write.
    events_js: jetstream::Context,
    flows: kv::Store,
    events: EventPublisher,
    /// What this replica published from the flows' outboxes.
    outbox: Arc<Ledger>,
    actors: Mutex<HashMap<FlowId, mpsc::UnboundedSender<Queued>>>,
    /// Every flow's last revision, followed as the flows bucket is written,
    /// and the flows seen finished.
    known: known::Known,
    /// Bounds allocation requests in flight (see [`MAX_PLACING`]).
    placing: Semaphore,
    /// Moves whenever capacity may have freed up (see [`machine::Placing`]):
    /// by one when this replica releases an allocation and again when the
    /// release is answered, by one when it gives a slot back, by
    /// [`machine::FREED_ALL`] when an agent registered or capacity changed.
    freed: AtomicU64,
    slots: Slots,
    /// How often the sweep checks deadlines (told to agents in each lease).
    tick_ms: u64,
    /// See [`Config::first_record_ms`].
    first_record: Duration,
    /// See [`Config::first_write_ms`].
    first_write: Duration,
    /// See [`Config::keep_allocation_ms`].
    keep: Duration,
    /// Allocations kept to hand on (see [`spare`]).
    spares: spare::Spares,
    /// Set once the replica stops: nothing more is kept.
    stopping: AtomicBool,
    /// The event types the wait tasks of each flow with an actor here wait
    /// for: a stored event of one of them ticks the flow at once.
    waiting: Mutex<HashMap<FlowId, HashSet<String>>>,
    /// Registered triggers (`coord_triggers`).
    triggers: kv::Store,
    /// Requirements some registered agent could meet, as the allocator last
    /// said, and until when that is trusted (see [`FEASIBLE_FOR_MS`]).
    feasible: Mutex<HashMap<String, u64>>,
    /// Flows this replica just created, as written: their actor's first
    /// step starts from this copy instead of reading it back, and holds
    /// back the tasks the allocator refused at creation.
    created: Mutex<HashMap<FlowId, Created>>,
    /// Flows this replica is creating, from their first write until their
    /// creation's grants are queued for their actor, each with what closes
    /// when that is done: their actor steps nothing before (a tick reading
    /// the new flow would ask for its tasks again beside the creation's own
    /// bookings, and the first assignments may leave before the write is
    /// stored: see `create`).
    creating: Mutex<HashMap<FlowId, watch::Receiver<()>>>,
    /// Completions this replica applied before the stream delivered them.
    early: intake::Early,
    /// This replica, as a task's `readied_by` names it (see
    /// [`replicas::tag`]): a restarted replica is another.
    replica: u32,
    /// The replicas heard answering the service's ping.
    heard: replicas::Heard,
}

/// A flow as its creation wrote it, with the tasks placed then that the
/// allocator refused (each with the freed count when it was asked: see
/// [`machine::Placing`]).
struct Created {
    stored: Stored,
    refused: Vec<(TaskId, u64)>,
    /// Set when the copy is not written yet: the actor's first step writes
    /// it (see `create::defer`).
    first: Option<First>,
}

/// A new flow whose first write its actor makes, together with the agents'
/// first reports: the creation's events, published first once it is
/// stored, and the creation's caller, waiting for the outcome.
struct First {
    effects: Vec<Effect>,
    cursor: Cursor,
    reply: oneshot::Sender<Result<FlowStatus, Error>>,
    /// The creation's span: its events continue the caller's trace.
    span: tracing::Span,
}

/// How long a "some agent could run this" verdict is reused for creation
/// warnings, unless an agent leaves or its capacity changes first: a
/// stream of small flows then skips a round trip to the allocator each.
/// A warning is advice (an agent may leave just after any check), and a
/// flow that asks to be refused when infeasible is always checked afresh.
const FEASIBLE_FOR_MS: u64 = 1_000;
/// Verdicts kept at most; past that the cache starts over.
const FEASIBLE_KEPT: usize = 256;

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
    for s in [Stream::Reports, Stream::Events] {
        bus::ensure_stream(&js, s, cfg.nats.js_replicas).await?;
    }
    let flows = bus::ensure_bucket(&js, Bucket::Flows, cfg.nats.js_replicas).await?;
    bus::opening(|| bus::allow_atomic_batches(&js, &flows)).await?;
    let slots = bus::ensure_bucket(&js, Bucket::Concurrency, cfg.nats.js_replicas).await?;
    let triggers = bus::ensure_bucket(&js, Bucket::Triggers, cfg.nats.js_replicas).await?;
    // Wait tasks and triggers read the agent events (the synchronizer's
    // stream, made here with its default limits if it is not there yet).
    bus::ensure_stream(&js, Stream::AgentEvents, cfg.nats.js_replicas).await?;
    // Registered first: its id names this replica.
    let mut service = Service::start(
        &nats,
        NAME,
        "Task flows: DAGs of tasks run on external agents",
    )
    .await?;
    let orch = Arc::new(Orchestrator {
        client: common::Client::new(nats.clone()).with_timeout(cfg.nats.request_timeout()),
        nats: nats.clone(),
        js: js.clone(),
        events_js: jetstream::new(nats.clone()),
        flows,
        events: EventPublisher::new(nats.clone(), NAME),
        outbox: Arc::default(),
        actors: Mutex::default(),
        known: known::Known::default(),
        placing: Semaphore::new(MAX_PLACING),
        freed: AtomicU64::new(0),
        slots: Slots::new(slots),
        tick_ms: cfg.sweep_ms.max(10),
        first_record: Duration::from_millis(cfg.first_record_ms),
        first_write: Duration::from_millis(cfg.first_write_ms),
        keep: Duration::from_millis(cfg.keep_allocation_ms),
        spares: Default::default(),
        stopping: AtomicBool::new(false),
        waiting: Mutex::default(),
        triggers,
        feasible: Mutex::default(),
        created: Mutex::default(),
        creating: Mutex::default(),
        early: intake::Early::default(),
        replica: replicas::tag(&service.instance_id().await),
        heard: Mutex::default(),
    });
    let handed = orch.listen_for_handed().await?;

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
    let early_reports = tokio::spawn(orch.clone().take_early_reports());
    let handed = tokio::spawn(orch.clone().take_handed(handed));
    let replicas = tokio::spawn(orch.clone().hear_replicas());
    let follower = tokio::spawn(orch.clone().follow_flows());
    let sweeper = tokio::spawn(
        orch.clone()
            .sweep(Duration::from_millis(cfg.sweep_ms.max(10))),
    );
    tracing::info!(url = %cfg.nats.nats_url, "orchestrator running");

    shutdown.await;
    tracing::info!("orchestrator shutting down");
    service.stop().await;
    orch.release_kept().await;
    reports.abort();
    early_reports.abort();
    handed.abort();
    allocator_events.abort();
    triggered.abort();
    wake_waits.abort();
    capacity.abort();
    sweeper.abort();
    follower.abort();
    replicas.abort();
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
