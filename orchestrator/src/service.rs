//! The orchestrator's NATS adapter.
//!
//! Flows live in the `coord_flows` KV bucket, one entry per flow. Every change is
//! `read → machine step → compare-and-set`, retried from fresh state on a lost
//! race, and its effects (events, dispatches, releases) run only after the write
//! succeeded. That is what lets any number of replicas run side by side: a task
//! attempt is assigned by exactly one of them, and a report is applied once.
//!
//! Replicas share the `$SRV` queue group for requests and one durable consumer
//! on the reports stream. A periodic sweep re-dispatches ready tasks that nobody
//! placed (no capacity yet, or a replica died between its write and its dispatch).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv};
use common::msg::{
    AgentReport, AllocateRequest, Assignment, EventKind, FlowList, FlowListRequest, FlowRef,
    FlowSpec, FlowStatus, ReleaseRequest, TaskState,
};
use common::nats::{self as bus, Bucket, EventPublisher, Step, Stream};
use common::service::Service;
use common::{subject, telemetry, AgentId, AllocationId, Error, ErrorCode, FlowId, TaskId};
use futures::future::BoxFuture;
use futures::StreamExt;
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::machine::{self, Effect, Flow, Rejection};

/// Orchestrator settings.
#[derive(clap::Args, Debug, Clone)]
pub struct Config {
    #[command(flatten)]
    pub nats: common::config::NatsConfig,
    /// How often to sweep for ready tasks nobody placed, in milliseconds.
    #[arg(long, env = "ORCHESTRATOR_SWEEP_MS", default_value_t = 1_000)]
    pub sweep_ms: u64,
    /// Reports applied at once per replica.
    #[arg(long, env = "ORCHESTRATOR_REPORT_CONCURRENCY", default_value_t = 256)]
    pub report_concurrency: usize,
}

impl Config {
    pub fn new(nats: common::config::NatsConfig) -> Self {
        Config {
            nats,
            sweep_ms: 1_000,
            report_concurrency: 256,
        }
    }
}

const NAME: &str = "orchestrator";

struct Orchestrator {
    client: common::Client,
    js: jetstream::Context,
    flows: kv::Store,
    events: EventPublisher,
}

/// Runs the orchestrator until `shutdown` resolves, then drains the connection.
pub async fn run(cfg: Config, shutdown: impl Future) -> anyhow::Result<()> {
    let nats = bus::connect(&cfg.nats, NAME).await?;
    let js = jetstream::new(nats.clone());
    for s in [Stream::Assign, Stream::Reports, Stream::Events] {
        bus::ensure_stream(&js, s, cfg.nats.js_replicas).await?;
    }
    let flows = bus::ensure_bucket(&js, Bucket::Flows, cfg.nats.js_replicas).await?;
    let orch = Arc::new(Orchestrator {
        client: common::Client::new(nats.clone()).with_timeout(cfg.nats.request_timeout()),
        js: js.clone(),
        flows,
        events: EventPublisher::new(nats.clone(), NAME),
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

    let reports = tokio::spawn(orch.clone().consume_reports(cfg.report_concurrency));
    let sweeper = tokio::spawn(
        orch.clone()
            .sweep(Duration::from_millis(cfg.sweep_ms.max(10))),
    );
    tracing::info!(url = %cfg.nats.nats_url, "orchestrator running");

    shutdown.await;
    tracing::info!("orchestrator shutting down");
    service.stop().await;
    reports.abort();
    sweeper.abort();
    nats.drain().await.ok();
    Ok(())
}

fn key(flow: &FlowId) -> &str {
    flow.as_str()
}

impl Orchestrator {
    async fn create(self: &Arc<Self>, spec: FlowSpec) -> Result<FlowStatus, Error> {
        if let Err(problems) = machine::validate(&spec) {
            let summary: Vec<&str> = problems.iter().map(|p| p.message.as_str()).collect();
            return Err(Error::new(
                ErrorCode::ValidationFailed,
                format!("flow is invalid: {}", summary.join("; ")),
            )
            .with_details(serde_json::json!({ "problems": problems })));
        }
        let id = spec.id.clone().unwrap_or_else(FlowId::random);
        let (flow, effects) = Flow::new(id.clone(), spec, common::now_ms());
        let status = flow.status(0);
        let mut fresh = Some(flow);
        let (created, revision) =
            bus::cas_update::<Flow, bool, _>(&self.flows, key(&id), |current| {
                Ok(match (current, fresh.take()) {
                    (None, Some(flow)) => Step::Write(flow, true),
                    _ => Step::Keep(false),
                })
            })
            .await?;
        if !created {
            return Err(Error::new(
                ErrorCode::Conflict,
                format!("flow {id} already exists"),
            ));
        }
        self.run_effects(&id, effects).await;
        Ok(FlowStatus { revision, ..status })
    }

    async fn load(&self, flow: &FlowId) -> Result<(Flow, u64), Error> {
        bus::get_json::<Flow>(&self.flows, key(flow))
            .await?
            .ok_or_else(|| Error::not_found(format!("no flow {flow}")))
    }

    async fn status(&self, flow: &FlowId) -> Result<FlowStatus, Error> {
        let (f, rev) = self.load(flow).await?;
        Ok(f.status(rev))
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
        let keys = self
            .flows
            .keys()
            .await
            .map_err(|e| Error::new(ErrorCode::Unavailable, format!("list flows: {e}")))?;
        Ok(keys
            .filter_map(|k| async move { k.ok().and_then(|k| FlowId::new(k).ok()) })
            .collect()
            .await)
    }

    /// Runs one machine step under compare-and-set. The inner `Err` is the
    /// machine's refusal; the outer one a storage failure or a missing flow.
    async fn step<F>(
        &self,
        flow: &FlowId,
        mut f: F,
    ) -> Result<Result<Vec<Effect>, Rejection>, Error>
    where
        F: FnMut(&mut Flow) -> Result<Vec<Effect>, Rejection>,
    {
        let (outcome, _) = bus::cas_update::<Flow, _, _>(&self.flows, key(flow), |current| {
            let Some(mut flow) = current else {
                return Err(Error::not_found("flow is gone"));
            };
            Ok(match f(&mut flow) {
                Ok(effects) if effects.is_empty() => Step::Keep(Ok(effects)),
                Ok(effects) => Step::Write(flow, Ok(effects)),
                Err(rejection) => Step::Keep(Err(rejection)),
            })
        })
        .await?;
        Ok(outcome)
    }

    /// Carries out a step's effects. Boxed because dispatching runs effects of
    /// its own (the future would otherwise be recursive and not provably `Send`).
    fn run_effects<'a>(
        self: &'a Arc<Self>,
        flow: &'a FlowId,
        effects: Vec<Effect>,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            for effect in effects {
                match effect {
                    Effect::Event(kind) => self.events.publish(kind).await,
                    Effect::Dispatch(task) => {
                        let (o, flow) = (self.clone(), flow.clone());
                        tokio::spawn(
                            async move { o.dispatch(&flow, &task).await }.in_current_span(),
                        );
                    }
                    Effect::Release { agent, allocation } => {
                        let o = self.clone();
                        tokio::spawn(
                            async move { o.release(agent, allocation).await }.in_current_span(),
                        );
                    }
                }
            }
        })
    }

    /// Places a ready task through the allocator, records the assignment, then
    /// sends it on the agent's durable subject.
    async fn dispatch(self: &Arc<Self>, flow_id: &FlowId, task_id: &TaskId) {
        let Ok((flow, _)) = self.load(flow_id).await else {
            return;
        };
        let Some(task) = flow.tasks.get(task_id) else {
            return;
        };
        if flow.state.is_terminal() || task.state != TaskState::Ready {
            return;
        }
        let (kind, input) = (task.spec.kind.clone(), task.spec.input.clone());
        let request = AllocateRequest {
            owner: format!("{flow_id}/{task_id}"),
            requirements: task.spec.requirements.clone(),
            priority: task.spec.priority,
        };
        let allocation = match self.client.allocate(&request).await {
            Ok(a) => a,
            Err(e) => {
                // No capacity yet is normal: the sweep tries again.
                tracing::debug!(flow = %flow_id, task = %task_id, code = %e.code, message = %e.message, "not placed");
                return;
            }
        };
        let now = common::now_ms();
        let mut assigned = 0;
        let outcome = self
            .step(flow_id, |f| {
                f.assign(
                    task_id,
                    &allocation.agent_id,
                    &allocation.allocation_id,
                    now,
                )
                .map(|(attempt, effects)| {
                    assigned = attempt;
                    effects
                })
            })
            .await;
        let effects = match outcome {
            Ok(Ok(effects)) => effects,
            other => {
                // Someone else moved the task first: give the resources back.
                if let Ok(Err(rejection)) = &other {
                    tracing::debug!(flow = %flow_id, task = %task_id, %rejection, "assignment lost");
                }
                self.release(allocation.agent_id, allocation.allocation_id)
                    .await;
                return;
            }
        };
        let assignment = Assignment {
            flow_id: flow_id.clone(),
            task_id: task_id.clone(),
            attempt: assigned,
            agent_id: allocation.agent_id.clone(),
            kind,
            input,
            allocation_id: allocation.allocation_id.clone(),
            resources: allocation.resources.clone(),
            assigned_at_ms: now,
        };
        self.run_effects(flow_id, effects).await;
        if let Err(e) = self.send_assignment(&assignment).await {
            tracing::warn!(flow = %flow_id, task = %task_id, error = %e, "assignment not sent, task goes back to ready");
            if let Ok(Ok(effects)) = self
                .step(flow_id, |f| f.unassign(task_id, assigned, common::now_ms()))
                .await
            {
                self.run_effects(flow_id, effects).await;
            }
        }
    }

    async fn send_assignment(&self, a: &Assignment) -> Result<(), Error> {
        let body = serde_json::to_vec(a).map_err(|e| Error::internal(e.to_string()))?;
        let msg_id = format!("{}.{}.{}", a.flow_id, a.task_id, a.attempt);
        let ack = self
            .js
            .publish_with_headers(
                subject::assign(&a.agent_id),
                bus::dedupe_headers(&msg_id),
                body.into(),
            )
            .await
            .map_err(|e| Error::new(ErrorCode::Unavailable, e.to_string()))?;
        ack.await
            .map_err(|e| Error::new(ErrorCode::Unavailable, e.to_string()))?;
        Ok(())
    }

    async fn release(&self, agent: AgentId, allocation: AllocationId) {
        let req = ReleaseRequest {
            allocation_id: allocation,
            agent_id: agent,
        };
        if let Err(e) = self.client.release(&req).await {
            tracing::warn!(allocation = %req.allocation_id, error = %e, "release failed");
        }
    }

    /// Applies agents' reports from the shared durable consumer.
    async fn consume_reports(self: Arc<Self>, concurrency: usize) {
        loop {
            if let Err(e) = self.clone().consume_reports_once(concurrency).await {
                tracing::warn!(error = %e, "report consumer stopped, restarting");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn consume_reports_once(self: Arc<Self>, concurrency: usize) -> Result<(), Error> {
        let unavailable =
            |e: &dyn std::fmt::Display| Error::new(ErrorCode::Unavailable, e.to_string());
        let stream = self
            .js
            .get_stream(common::nats::STREAM_REPORTS)
            .await
            .map_err(|e| unavailable(&e))?;
        let consumer = stream
            .get_or_create_consumer(
                common::nats::CONSUMER_ORCHESTRATOR,
                consumer::pull::Config {
                    durable_name: Some(common::nats::CONSUMER_ORCHESTRATOR.to_owned()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(30),
                    max_ack_pending: 10_000,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| unavailable(&e))?;
        let mut messages = consumer.messages().await.map_err(|e| unavailable(&e))?;
        let limit = Arc::new(Semaphore::new(concurrency.max(1)));
        while let Some(msg) = messages.next().await {
            let msg = msg.map_err(|e| unavailable(&e))?;
            let Ok(permit) = limit.clone().acquire_owned().await else {
                break;
            };
            let o = self.clone();
            let span = telemetry::message_span("report", &msg.subject, msg.headers.as_ref());
            tokio::spawn(
                async move {
                    o.handle_report(msg).await;
                    drop(permit);
                }
                .instrument(span),
            );
        }
        Ok(())
    }

    async fn handle_report(self: &Arc<Self>, msg: jetstream::Message) {
        let report: AgentReport = match serde_json::from_slice(&msg.payload) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(subject = %msg.subject, error = %e, "unreadable report dropped");
                let _ = msg.ack_with(jetstream::AckKind::Term).await;
                return;
            }
        };
        // Identity comes from the subject the agent may publish on, not from the JSON.
        let sender = subject::agent_of(&msg.subject);
        let outcome = if sender.as_ref() != Some(&report.agent_id) {
            Ok(Err(Rejection::WrongAgent {
                got: report.agent_id.clone(),
            }))
        } else {
            let now = common::now_ms();
            self.step(&report.flow_id, |f| f.report(&report, now)).await
        };
        match outcome {
            Ok(Ok(effects)) => {
                let _ = msg.ack().await;
                self.run_effects(&report.flow_id, effects).await;
            }
            Ok(Err(rejection)) => {
                let _ = msg.ack().await;
                tracing::info!(flow = %report.flow_id, task = %report.task_id, attempt = report.attempt, %rejection, "report rejected");
                self.events
                    .publish(EventKind::ReportRejected {
                        flow_id: report.flow_id.clone(),
                        task_id: report.task_id.clone(),
                        attempt: report.attempt,
                        agent_id: report.agent_id.clone(),
                        reason: rejection.to_string(),
                    })
                    .await;
            }
            Err(e) if e.code == ErrorCode::NotFound => {
                let _ = msg.ack().await;
                self.events
                    .publish(EventKind::ReportRejected {
                        flow_id: report.flow_id.clone(),
                        task_id: report.task_id.clone(),
                        attempt: report.attempt,
                        agent_id: report.agent_id.clone(),
                        reason: format!("no flow {}", report.flow_id),
                    })
                    .await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "report not applied, will be redelivered");
                let _ = msg
                    .ack_with(jetstream::AckKind::Nak(Some(Duration::from_millis(500))))
                    .await;
            }
        }
    }

    /// Re-dispatches ready tasks that have waited longer than one sweep period.
    async fn sweep(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Ok(ids) = self.flow_ids().await else {
                continue;
            };
            let now = common::now_ms();
            for id in ids {
                let Ok((flow, _)) = self.load(&id).await else {
                    continue;
                };
                if flow.state.is_terminal() {
                    continue;
                }
                for task in flow.ready_in_order() {
                    let waited = flow.tasks.get(&task).is_some_and(|t| {
                        now.saturating_sub(t.since_ms) >= every.as_millis() as u64
                    });
                    if waited {
                        self.dispatch(&id, &task).await;
                    }
                }
            }
        }
    }
}
