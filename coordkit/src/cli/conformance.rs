//! `coordctl conformance`: drives a running agent through every rule of the
//! agent contract and says, rule by rule, whether it kept it.
//!
//! The kit is an operator watching from outside: it pins small tasks of kind
//! `conformance` on the agent (their input follows the convention in
//! docs/protocol.md, *Conformance*), listens on the agent's subjects (reports,
//! cancel notices, verdicts, heartbeats) and the `agent.lost` event, and
//! reads flow status, state documents and the agent's assignments consumer.
//! Rules run one after another, so whatever the agent does meanwhile belongs
//! to the rule running.

mod own;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use clap::Args;
use common::msg::{
    AdjustRequest, AgentReport, AgentStatus, CancelCode, CancelNotice, CapacityRequest, FlowSpec,
    FlowState, FlowStatus, Heartbeat, RejectReason, ReportKind, ReportRejected, Requirements,
    RetryPolicy, StatePut, SyncPointInitiate, SyncPointState, SyncPointWait, TaskSpec, TaskState,
    TaskStatus, Timeouts,
};
use common::{subject, AgentId, Client, ErrorCode, FlowId, TaskId};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::time::Instant;

use super::{id, parse_amount, parse_pair, table, Ctx};

/// `coordctl conformance`; the command's help (in `Command`) says what it needs.
#[derive(Args, Debug)]
pub(crate) struct ConformanceArgs {
    /// The agent to check.
    #[arg(long)]
    agent_id: String,
    /// Only these rules, comma-separated (default: all): success,
    /// retryable_failure, fatal_failure, progress_keeps_lease,
    /// heartbeat_timeout, cancel, preemption, stale_attempt, malformed_report,
    /// progress_bounds, progress_valid, state_cas, agent_event, sync_notice,
    /// heartbeats, clean_leave.
    #[arg(long, value_delimiter = ',', value_parser = parse_rule)]
    rules: Vec<Rule>,
    /// A shell command that stops the agent (e.g. `kill -TERM 1234`); run
    /// last, for clean_leave (skipped without it).
    #[arg(long)]
    stop_cmd: Option<String>,
    /// Longest any one rule may wait, in seconds.
    #[arg(long, default_value_t = 30)]
    timeout_s: u64,
    /// A capability the kit's tasks require besides the agent's own (repeatable).
    #[arg(long = "capability")]
    capabilities: Vec<String>,
    /// A label the kit's tasks require besides the agent's own, `name=value` (repeatable).
    #[arg(long = "label", value_parser = parse_pair)]
    labels: Vec<(String, String)>,
    /// What each task holds, `resource=amount` (default: 1 of the agent's
    /// `cpu`, else of its first resource). Preemption takes it away.
    #[arg(long, value_parser = parse_amount)]
    resource: Option<(String, f64)>,
}

/// The rules, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Rule {
    Success,
    RetryableFailure,
    FatalFailure,
    ProgressKeepsLease,
    HeartbeatTimeout,
    Cancel,
    Preemption,
    MalformedReport,
    ProgressBounds,
    StateCas,
    AgentEvent,
    SyncNotice,
    // Judged over everything the agent did in the rules above.
    StaleAttempt,
    ProgressValid,
    Heartbeats,
    // Last: it stops the agent.
    CleanLeave,
}

const RULES: [(Rule, &str); 16] = [
    (Rule::Success, "success"),
    (Rule::RetryableFailure, "retryable_failure"),
    (Rule::FatalFailure, "fatal_failure"),
    (Rule::ProgressKeepsLease, "progress_keeps_lease"),
    (Rule::HeartbeatTimeout, "heartbeat_timeout"),
    (Rule::Cancel, "cancel"),
    (Rule::Preemption, "preemption"),
    (Rule::MalformedReport, "malformed_report"),
    (Rule::ProgressBounds, "progress_bounds"),
    (Rule::StateCas, "state_cas"),
    (Rule::AgentEvent, "agent_event"),
    (Rule::SyncNotice, "sync_notice"),
    (Rule::StaleAttempt, "stale_attempt"),
    (Rule::ProgressValid, "progress_valid"),
    (Rule::Heartbeats, "heartbeats"),
    (Rule::CleanLeave, "clean_leave"),
];

impl Rule {
    fn name(self) -> &'static str {
        RULES
            .iter()
            .find(|(r, _)| *r == self)
            .map_or("?", |(_, n)| n)
    }
}

fn parse_rule(s: &str) -> Result<Rule, String> {
    RULES
        .iter()
        .find(|(_, n)| *n == s.trim())
        .map(|(r, _)| *r)
        .ok_or_else(|| {
            let names: Vec<&str> = RULES.iter().map(|(_, n)| *n).collect();
            format!("no rule `{s}`; the rules are {}", names.join(", "))
        })
}

/// How one rule went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Verdict {
    Pass,
    Fail,
    Skip,
}

/// One row of the report.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RuleResult {
    pub(crate) rule: String,
    pub(crate) result: Verdict,
    /// Why it failed or was skipped; what was seen when it passed.
    pub(crate) detail: String,
}

/// What `--output json` prints.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ConformanceReport {
    pub(crate) agent_id: AgentId,
    /// No rule failed.
    pub(crate) passed: bool,
    pub(crate) rules: Vec<RuleResult>,
}

/// A rule's outcome: `Ok(Pass or Skip)`, or the failure's reason.
#[derive(Clone)]
enum Outcome {
    Pass(String),
    Skip(String),
}

type RuleOutcome = Result<Outcome, String>;

/// The `Nats-Msg-Id` prefix of the reports the kit publishes itself, so they
/// are told apart from the agent's.
const KIT_MSG_ID: &str = "coordctl-conformance";

/// The one task of each of the kit's flows.
const TASK: &str = "t";

/// How long after its `started` report a task is taken away: well inside
/// its work, after the agent has had time to set it going.
const MID_TASK: Duration = Duration::from_millis(500);

pub(crate) async fn run(ctx: &Ctx, args: ConformanceArgs) -> anyhow::Result<()> {
    let agent: AgentId = id(&args.agent_id)?;
    let mut rules = if args.rules.is_empty() {
        RULES.iter().map(|(r, _)| *r).collect()
    } else {
        args.rules.clone()
    };
    rules.sort();
    rules.dedup();
    let kit = Kit::new(ctx.client.clone(), agent.clone(), &args).await?;
    let mut results = Vec::new();
    let mut probes: Option<(RuleOutcome, RuleOutcome)> = None;
    for rule in rules {
        if !ctx.json {
            eprintln!("conformance: {} …", rule.name());
        }
        let outcome = match rule {
            Rule::Success => kit.success().await,
            Rule::RetryableFailure => kit.retryable_failure().await,
            Rule::FatalFailure => kit.fatal_failure().await,
            Rule::ProgressKeepsLease => kit.progress_keeps_lease().await,
            Rule::HeartbeatTimeout => kit.heartbeat_timeout().await,
            Rule::Cancel => kit.cancel().await,
            Rule::Preemption => kit.preemption().await,
            Rule::MalformedReport | Rule::ProgressBounds => {
                // One live attempt serves both.
                let (malformed, bounds) = match &probes {
                    Some(done) => done.clone(),
                    None => {
                        let done = kit.probes().await;
                        probes = Some(done.clone());
                        done
                    }
                };
                if rule == Rule::MalformedReport {
                    malformed
                } else {
                    bounds
                }
            }
            Rule::StateCas => kit.state_cas().await,
            Rule::AgentEvent => kit.agent_event().await,
            Rule::SyncNotice => kit.sync_notice().await,
            Rule::StaleAttempt => kit.stale_attempt(),
            Rule::ProgressValid => kit.progress_valid(),
            Rule::Heartbeats => kit.heartbeats().await,
            Rule::CleanLeave => kit.clean_leave(args.stop_cmd.as_deref()).await,
        };
        let (result, detail) = match outcome {
            Ok(Outcome::Pass(d)) => (Verdict::Pass, d),
            Ok(Outcome::Skip(d)) => (Verdict::Skip, d),
            Err(d) => (Verdict::Fail, d),
        };
        results.push(RuleResult {
            rule: rule.name().to_owned(),
            result,
            detail,
        });
    }
    let failed = results.iter().filter(|r| r.result == Verdict::Fail).count();
    let report = ConformanceReport {
        agent_id: agent.clone(),
        passed: failed == 0,
        rules: results,
    };
    ctx.emit(&report, |r| {
        let rows = r
            .rules
            .iter()
            .map(|x| {
                let verdict = match x.result {
                    Verdict::Pass => "PASS",
                    Verdict::Fail => "FAIL",
                    Verdict::Skip => "SKIP",
                };
                vec![x.rule.clone(), verdict.to_owned(), x.detail.clone()]
            })
            .collect();
        let count = |v: Verdict| r.rules.iter().filter(|x| x.result == v).count();
        format!(
            "{}\n{}: {} passed, {} failed, {} skipped",
            table(&["rule", "result", "detail"], rows),
            r.agent_id,
            count(Verdict::Pass),
            count(Verdict::Fail),
            count(Verdict::Skip)
        )
    });
    if failed > 0 {
        anyhow::bail!("{agent} broke {failed} rule(s) of the agent contract");
    }
    Ok(())
}

/// One report seen on the agent's report subject.
struct SeenReport {
    at: Instant,
    msg_id: Option<String>,
    /// The report, or why it is not one.
    body: Result<AgentReport, String>,
}

impl SeenReport {
    fn by_kit(&self) -> bool {
        self.msg_id
            .as_deref()
            .is_some_and(|m| m.starts_with(KIT_MSG_ID))
    }

    fn is(&self, flow: &FlowId, attempt: u32) -> bool {
        self.body
            .as_ref()
            .is_ok_and(|r| &r.flow_id == flow && r.task_id.as_str() == TASK && r.attempt == attempt)
    }
}

/// Everything seen on the agent's subjects since the kit started.
#[derive(Default)]
struct Log {
    reports: Vec<SeenReport>,
    cancels: Vec<(Instant, CancelNotice)>,
    verdicts: Vec<(Instant, ReportRejected)>,
    heartbeats: Vec<(Instant, Result<Heartbeat, String>)>,
    lost: Vec<Instant>,
}

/// What the allocator keeps about an agent (its `coord_agents` record),
/// the fields the kit needs.
#[derive(Deserialize)]
struct AgentRecord {
    #[serde(default)]
    capabilities: Vec<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    capacity: BTreeMap<String, f64>,
    #[serde(default)]
    heartbeat_interval_ms: u64,
    #[serde(default)]
    status: AgentStatus,
}

struct Kit {
    client: Client,
    js: jetstream::Context,
    agent: AgentId,
    requirements: Requirements,
    /// The resource each task holds, and the agent's capacity of it.
    resource: Option<(String, f64)>,
    heartbeat_ms: u64,
    budget: Duration,
    log: Arc<Mutex<Log>>,
    began: Instant,
}

/// `Err` as the rule's failure reason.
fn because<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{what}: {e}")
}

impl Kit {
    async fn new(client: Client, agent: AgentId, args: &ConformanceArgs) -> anyhow::Result<Kit> {
        let nats = client.nats().clone();
        let js = jetstream::new(nats.clone());
        let kv = js
            .get_key_value(common::nats::KV_AGENTS)
            .await
            .map_err(|e| anyhow::anyhow!("cannot read the agents bucket: {e}"))?;
        let record = kv
            .get(agent.as_str())
            .await
            .map_err(|e| anyhow::anyhow!("cannot read {agent}'s record: {e}"))?
            .ok_or_else(|| anyhow::anyhow!("{agent} is not registered"))?;
        let record: AgentRecord = serde_json::from_slice(&record)
            .map_err(|e| anyhow::anyhow!("unreadable record of {agent}: {e}"))?;
        if record.status != AgentStatus::Active {
            anyhow::bail!(
                "{agent} is {}, not active: start it first",
                super::wire_name(&record.status)
            );
        }
        let resource = match &args.resource {
            Some((r, amount)) => Some((r.clone(), *amount)),
            None => record
                .capacity
                .get_key_value("cpu")
                .filter(|(_, c)| **c > 0.0)
                .or_else(|| record.capacity.iter().find(|(_, c)| **c > 0.0))
                .map(|(r, c)| (r.clone(), c.min(1.0))),
        };
        let mut capabilities = record.capabilities.clone();
        capabilities.extend(args.capabilities.iter().cloned());
        capabilities.sort();
        capabilities.dedup();
        let mut labels = record.labels.clone();
        labels.extend(args.labels.iter().cloned());
        let requirements = Requirements {
            resources: resource.iter().cloned().collect(),
            capabilities,
            labels,
            ..Default::default()
        };
        // Every task must land on the agent, or the kit would judge another.
        let fit = client
            .capacity(&CapacityRequest {
                requirements: Some(requirements.clone()),
                owner: None,
            })
            .await?;
        let others: Vec<&str> = fit
            .eligible
            .iter()
            .filter(|a| **a != agent)
            .map(|a| a.as_str())
            .collect();
        if !others.is_empty() {
            anyhow::bail!(
                "the kit's tasks could also go to {}: give a --capability or --label only {agent} has",
                others.join(", ")
            );
        }
        if !fit.eligible.contains(&agent) {
            anyhow::bail!(
                "{agent} cannot take the kit's tasks, which require {}: check --resource, --capability and --label",
                serde_json::to_string(&requirements).unwrap_or_default()
            );
        }
        let capacity = resource
            .as_ref()
            .and_then(|(r, _)| record.capacity.get(r).map(|c| (r.clone(), *c)));
        let log = Arc::new(Mutex::new(Log::default()));
        watch(&nats, &agent, &log).await?;
        Ok(Kit {
            client,
            js,
            agent,
            requirements,
            resource: capacity,
            heartbeat_ms: record.heartbeat_interval_ms,
            budget: Duration::from_secs(args.timeout_s.max(1)),
            log,
            began: Instant::now(),
        })
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.budget
    }

    /// Submits a one-task flow pinned on the agent, input `{"conformance": conf}`.
    async fn submit(
        &self,
        rule: Rule,
        conf: Value,
        retry: RetryPolicy,
        timeouts: Timeouts,
    ) -> Result<FlowId, String> {
        // An agent gone (lost, left) takes no task: say so rather than wait.
        let cap = self
            .client
            .capacity(&CapacityRequest::default())
            .await
            .map_err(because("agent status"))?;
        match cap.agent_status.get(&self.agent) {
            Some(AgentStatus::Active) => {}
            status => {
                return Err(format!(
                    "{} is {}, so it takes no task",
                    self.agent,
                    status.map_or("unlisted".into(), super::wire_name)
                ))
            }
        }
        let mut task = TaskSpec::new(TaskId::new(TASK).map_err(|e| e.to_string())?);
        task.kind = "conformance".into();
        task.input = json!({ "conformance": conf });
        task.requirements = self.requirements.clone();
        task.retry = retry;
        task.timeouts = timeouts;
        let spec = FlowSpec::new(
            format!("conformance {} {}", rule.name(), self.agent),
            vec![task],
        );
        let status = self
            .client
            .create_flow(&spec)
            .await
            .map_err(because("flow not created"))?;
        Ok(status.flow_id)
    }

    /// Polls the flow until `done` says so, or fails with what was last seen.
    async fn wait_flow<T>(
        &self,
        flow: &FlowId,
        what: &str,
        deadline: Instant,
        mut done: impl FnMut(&FlowStatus) -> Option<T>,
    ) -> Result<T, String> {
        loop {
            let status = self
                .client
                .flow_status(flow)
                .await
                .map_err(because("flow status"))?;
            if let Some(v) = done(&status) {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                let task = task_of(&status).map_or_else(
                    || "no task".to_owned(),
                    |t| format!("task {} attempt {}", super::wire_name(&t.state), t.attempt),
                );
                return Err(format!(
                    "no {what} within {}s (flow {}, {task})",
                    self.budget.as_secs(),
                    super::wire_name(&status.state)
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The flow once it has ended.
    /// The kit's task once its flow ends, which must be in success on this agent.
    async fn succeeded(&self, flow: &FlowId) -> Result<TaskStatus, String> {
        let status = self.finished(flow, self.deadline()).await?;
        let t = task_of(&status).ok_or("the flow has no task")?;
        self.on_agent(t)?;
        if status.state != FlowState::Succeeded {
            return Err(format!(
                "the task ended {} ({})",
                super::wire_name(&t.state),
                t.error.as_deref().unwrap_or("no error")
            ));
        }
        Ok(t.clone())
    }

    async fn finished(&self, flow: &FlowId, deadline: Instant) -> Result<FlowStatus, String> {
        self.wait_flow(flow, "end of the flow", deadline, |s| {
            s.state.is_terminal().then(|| s.clone())
        })
        .await
    }

    /// Waits until the log shows what `seen` looks for.
    async fn wait_log<T>(
        &self,
        what: &str,
        deadline: Instant,
        mut seen: impl FnMut(&Log) -> Option<T>,
    ) -> Result<T, String> {
        loop {
            if let Some(v) = seen(&self.log()) {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                return Err(format!("no {what} within {}s", self.budget.as_secs()));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// When the agent's `started` report for the attempt arrived.
    async fn started(
        &self,
        flow: &FlowId,
        attempt: u32,
        deadline: Instant,
    ) -> Result<Instant, String> {
        self.wait_log(
            &format!("`started` report for attempt {attempt}"),
            deadline,
            |log| {
                log.reports
                    .iter()
                    .filter(|r| !r.by_kit() && r.is(flow, attempt))
                    .find(|r| {
                        matches!(
                            r.body,
                            Ok(AgentReport {
                                kind: ReportKind::Started,
                                ..
                            })
                        )
                    })
                    .map(|r| r.at)
            },
        )
        .await
    }

    /// The cancel notice for the attempt and when it came.
    async fn cancel_notice(
        &self,
        flow: &FlowId,
        attempt: u32,
        deadline: Instant,
    ) -> Result<(Instant, CancelNotice), String> {
        self.wait_log(
            &format!("cancel notice for attempt {attempt}"),
            deadline,
            |log| {
                log.cancels
                    .iter()
                    .find(|(_, n)| {
                        &n.flow_id == flow && n.task_id.as_str() == TASK && n.attempt == attempt
                    })
                    .cloned()
            },
        )
        .await
    }

    /// The agent's reports on the attempt that came at or after `since`.
    fn reports_since(&self, flow: &FlowId, attempt: u32, since: Instant) -> Vec<String> {
        self.log()
            .reports
            .iter()
            .filter(|r| !r.by_kit() && r.is(flow, attempt) && r.at >= since)
            .filter_map(|r| r.body.as_ref().ok().map(|b| b.kind.type_name().to_owned()))
            .collect()
    }

    /// After a cancel notice: the agent stays silent on the attempt until well
    /// after its work would have ended, and has acknowledged (or terminated)
    /// the assignment.
    async fn honours_cancel(
        &self,
        flow: &FlowId,
        attempt: u32,
        notice_at: Instant,
        work_ends: Instant,
    ) -> Result<(), String> {
        // A final report would come when the work ends; give it time to show.
        tokio::time::sleep_until(work_ends + Duration::from_millis(1500)).await;
        let late = self.reports_since(flow, attempt, notice_at);
        if !late.is_empty() {
            return Err(format!(
                "reported {} on attempt {attempt} after its cancel notice",
                late.join(", ")
            ));
        }
        self.no_unacked_assignment().await
    }

    /// The agent's consumer holds no delivered, unacknowledged assignment.
    async fn no_unacked_assignment(&self) -> Result<(), String> {
        let name = common::nats::agent_consumer(&self.agent);
        let stream = self
            .js
            .get_stream(common::nats::STREAM_ASSIGN)
            .await
            .map_err(because("assignments stream"))?;
        let info = stream
            .consumer_info(&name)
            .await
            .map_err(because(&format!("consumer {name}")))?;
        match info.num_ack_pending {
            0 => Ok(()),
            n => Err(format!(
                "{n} assignment(s) left unacknowledged on consumer {name}: a cancelled attempt must be acked (+TERM)"
            )),
        }
    }

    /// Cancels a flow a failed rule left running, so it does not disturb the next.
    async fn tidy(&self, flow: &FlowId) {
        if let Ok(s) = self.client.flow_status(flow).await {
            if !s.state.is_terminal() {
                let _ = self.client.cancel_flow(flow).await;
            }
        }
    }

    /// Runs `rule` on the flow it creates and cancels the flow if it is left running.
    async fn on_flow<F, Fut>(&self, flow: Result<FlowId, String>, body: F) -> RuleOutcome
    where
        F: FnOnce(FlowId) -> Fut,
        Fut: std::future::Future<Output = RuleOutcome>,
    {
        let flow = flow?;
        let outcome = body(flow.clone()).await;
        self.tidy(&flow).await;
        outcome
    }

    fn on_agent(&self, t: &TaskStatus) -> Result<(), String> {
        match &t.agent_id {
            Some(a) if *a == self.agent => Ok(()),
            Some(a) => Err(format!("the task ran on {a}, not {}", self.agent)),
            None => Err("the task was never placed".into()),
        }
    }

    async fn success(&self) -> RuleOutcome {
        let nonce = uuid::Uuid::now_v7().simple().to_string();
        let output = json!({ "conformance": "success", "nonce": nonce });
        let window = Instant::now();
        let conf = json!({ "sleep_ms": 200, "output": output });
        let flow = self
            .submit(
                Rule::Success,
                conf,
                RetryPolicy::default(),
                Timeouts::default(),
            )
            .await;
        self.on_flow(flow, |flow| async move {
            let t = self.succeeded(&flow).await?;
            if t.output != output {
                return Err(format!(
                    "output {} is not the one asked for, {output}",
                    t.output
                ));
            }
            let log = self.log();
            let unreadable: Vec<&String> = log
                .reports
                .iter()
                .filter(|r| !r.by_kit() && r.at >= window)
                .filter_map(|r| r.body.as_ref().err())
                .collect();
            if let Some(e) = unreadable.first() {
                return Err(format!("a report is not valid: {e}"));
            }
            let mine: Vec<&SeenReport> = log
                .reports
                .iter()
                .filter(|r| !r.by_kit() && r.body.as_ref().is_ok_and(|b| b.flow_id == flow))
                .collect();
            let kinds: Vec<&str> = mine
                .iter()
                .filter_map(|r| r.body.as_ref().ok().map(|b| b.kind.type_name()))
                .collect();
            // A task done at once may report only its end.
            if kinds.first() != Some(&"started") && kinds != ["completed"] {
                return Err(format!(
                    "the first report was not `started` (nor the only one `completed`): {}",
                    kinds.join(", ")
                ));
            }
            for r in &mine {
                let Ok(b) = &r.body else { continue };
                if b.agent_id != self.agent {
                    return Err(format!("a report names agent {}", b.agent_id));
                }
                if b.attempt != 1 {
                    return Err(format!("a report names attempt {}, not 1", b.attempt));
                }
                msg_id_ok(r.msg_id.as_deref(), b)?;
            }
            Ok(Outcome::Pass(format!("reports {}", kinds.join(", "))))
        })
        .await
    }

    async fn retryable_failure(&self) -> RuleOutcome {
        self.failure(
            Rule::RetryableFailure,
            "retryable",
            2,
            &[(1, true), (2, true)],
            "attempt 1 failed retryable, attempt 2 ran",
        )
        .await
    }

    async fn fatal_failure(&self) -> RuleOutcome {
        self.failure(
            Rule::FatalFailure,
            "fatal",
            3,
            &[(1, false)],
            "one attempt, failed for good",
        )
        .await
    }

    /// A task told to fail (`fail`) under `max_attempts`: it must end failed
    /// after as many attempts as `want` lists, each reported (attempt, retryable).
    async fn failure(
        &self,
        rule: Rule,
        fail: &str,
        max_attempts: u32,
        want: &[(u32, bool)],
        pass: &str,
    ) -> RuleOutcome {
        let retry = RetryPolicy {
            max_attempts,
            backoff_base_ms: 100,
            ..Default::default()
        };
        let flow = self
            .submit(
                rule,
                json!({ "sleep_ms": 100, "fail": fail }),
                retry,
                Timeouts::default(),
            )
            .await;
        self.on_flow(flow, |flow| async move {
            let status = self.finished(&flow, self.deadline()).await?;
            let t = task_of(&status).ok_or("the flow has no task")?;
            self.on_agent(t)?;
            let attempts = want.len() as u32;
            if t.state != TaskState::Failed || t.attempt != attempts {
                return Err(format!(
                    "the task ended {} after {} attempt(s), not failed after {attempts} ({})",
                    super::wire_name(&t.state),
                    t.attempt,
                    t.error.as_deref().unwrap_or("no error")
                ));
            }
            let failed = self.failed_reports(&flow);
            if failed != want {
                return Err(format!(
                    "failed reports (attempt, retryable) were {failed:?}, not {want:?}"
                ));
            }
            Ok(Outcome::Pass(pass.to_owned()))
        })
        .await
    }

    /// `(attempt, retryable)` of each `failed` report on the flow.
    fn failed_reports(&self, flow: &FlowId) -> Vec<(u32, bool)> {
        self.log()
            .reports
            .iter()
            .filter(|r| !r.by_kit())
            .filter_map(|r| match &r.body {
                Ok(AgentReport {
                    flow_id,
                    attempt,
                    kind: ReportKind::Failed { retryable, .. },
                    ..
                }) if flow_id == flow => Some((*attempt, *retryable)),
                _ => None,
            })
            .collect()
    }

    async fn progress_keeps_lease(&self) -> RuleOutcome {
        let timeouts = Timeouts {
            heartbeat_ms: Some(1000),
            ..Default::default()
        };
        let flow = self
            .submit(
                Rule::ProgressKeepsLease,
                json!({ "sleep_ms": 3000, "progress_every_ms": 300 }),
                RetryPolicy::default(),
                timeouts,
            )
            .await;
        self.on_flow(flow, |flow| async move {
            let mut shown = None;
            let status = self
                .wait_flow(&flow, "end of the flow", self.deadline(), |s| {
                    if let Some(p) = task_of(s).and_then(|t| t.progress) {
                        shown = Some(p);
                    }
                    s.state.is_terminal().then(|| s.clone())
                })
                .await?;
            let t = task_of(&status).ok_or("the flow has no task")?;
            self.on_agent(t)?;
            if status.state != FlowState::Succeeded {
                return Err(format!(
                    "the task ended {} ({}): progress reports must renew the lease",
                    super::wire_name(&t.state),
                    t.error.as_deref().unwrap_or("no error")
                ));
            }
            let sent = self
                .log()
                .reports
                .iter()
                .filter(|r| !r.by_kit() && r.is(&flow, 1))
                .filter(|r| {
                    matches!(
                        r.body,
                        Ok(AgentReport {
                            kind: ReportKind::Progress { .. },
                            ..
                        })
                    )
                })
                .count();
            let Some(shown) = shown.or(t.progress) else {
                return Err(format!(
                    "{sent} progress report(s) sent, none shown in the flow status"
                ));
            };
            Ok(Outcome::Pass(format!(
                "{sent} progress reports over 3 s under a 1 s lease; status showed {shown:.2}"
            )))
        })
        .await
    }

    async fn heartbeat_timeout(&self) -> RuleOutcome {
        let timeouts = Timeouts {
            heartbeat_ms: Some(1000),
            ..Default::default()
        };
        let flow = self
            .submit(
                Rule::HeartbeatTimeout,
                json!({ "sleep_ms": 5000 }),
                RetryPolicy::default(),
                timeouts,
            )
            .await;
        self.on_flow(flow, |flow| async move {
            let deadline = self.deadline();
            let started = self.started(&flow, 1, deadline).await?;
            let (at, notice) = self.cancel_notice(&flow, 1, deadline).await?;
            if notice.code != CancelCode::TimedOut {
                return Err(format!(
                    "cancel notice code {}, not timed_out",
                    super::wire_name(&notice.code)
                ));
            }
            let status = self.finished(&flow, deadline).await?;
            let t = task_of(&status).ok_or("the flow has no task")?;
            if t.state != TaskState::TimedOut {
                return Err(format!(
                    "the task ended {}, not timed_out",
                    super::wire_name(&t.state)
                ));
            }
            self.honours_cancel(&flow, 1, at, started + Duration::from_millis(5000))
                .await?;
            Ok(Outcome::Pass(format!(
                "timed out (\"{}\"), silent after the notice, assignment acked",
                notice.reason
            )))
        })
        .await
    }

    async fn cancel(&self) -> RuleOutcome {
        let flow = self
            .submit(
                Rule::Cancel,
                json!({ "sleep_ms": 3000 }),
                RetryPolicy::default(),
                Timeouts::default(),
            )
            .await;
        self.on_flow(flow, |flow| async move {
            let deadline = self.deadline();
            let started = self.started(&flow, 1, deadline).await?;
            tokio::time::sleep_until(started + MID_TASK).await;
            self.client
                .cancel_flow(&flow)
                .await
                .map_err(because("flow not cancelled"))?;
            let (at, notice) = self.cancel_notice(&flow, 1, deadline).await?;
            if notice.code != CancelCode::FlowCancelled {
                return Err(format!(
                    "cancel notice code {}, not flow_cancelled",
                    super::wire_name(&notice.code)
                ));
            }
            self.honours_cancel(&flow, 1, at, started + Duration::from_millis(3000))
                .await?;
            Ok(Outcome::Pass(
                "notice flow_cancelled, silent after it, assignment acked".into(),
            ))
        })
        .await
    }

    async fn preemption(&self) -> RuleOutcome {
        let Some((resource, capacity)) = self.resource.clone() else {
            return Ok(Outcome::Skip(format!(
                "{} has no capacity the kit's tasks hold, so none can be taken away",
                self.agent
            )));
        };
        let retry = RetryPolicy {
            max_attempts: 2,
            backoff_base_ms: 100,
            ..Default::default()
        };
        let flow = self
            .submit(
                Rule::Preemption,
                json!({ "sleep_ms": 1500 }),
                retry,
                Timeouts::default(),
            )
            .await;
        self.on_flow(flow, |flow| async move {
            let deadline = self.deadline();
            let started = self.started(&flow, 1, deadline).await?;
            tokio::time::sleep_until(started + MID_TASK).await;
            let adjust = |amount: f64, preempt: bool| AdjustRequest {
                agent_id: self.agent.clone(),
                capacity: [(resource.clone(), amount)].into(),
                preempt,
            };
            let taken = self.client.adjust_capacity(&adjust(0.0, true)).await;
            // Whatever happened, the agent gets its capacity back.
            let notice = match taken {
                Ok(_) => self.cancel_notice(&flow, 1, deadline).await,
                Err(e) => Err(format!("capacity not adjusted: {e}")),
            };
            let restored = self.client.adjust_capacity(&adjust(capacity, false)).await;
            let (at, notice) = notice?;
            restored.map_err(because("capacity not restored"))?;
            if notice.code != CancelCode::Preempted {
                return Err(format!(
                    "cancel notice code {}, not preempted",
                    super::wire_name(&notice.code)
                ));
            }
            let status = self.finished(&flow, deadline).await?;
            let t = task_of(&status).ok_or("the flow has no task")?;
            self.on_agent(t)?;
            if status.state != FlowState::Succeeded || t.attempt != 2 {
                return Err(format!(
                    "the task ended {} after {} attempt(s), not succeeded on attempt 2 ({})",
                    super::wire_name(&t.state),
                    t.attempt,
                    t.error.as_deref().unwrap_or("no error")
                ));
            }
            self.honours_cancel(&flow, 1, at, started + Duration::from_millis(1500))
                .await?;
            Ok(Outcome::Pass(
                "notice preempted, attempt 1 silent after it, attempt 2 succeeded".into(),
            ))
        })
        .await
    }

    /// The kit itself reports, as the operator, on a live attempt of the
    /// agent's: a malformed report and a progress of 7.5. Each must be refused
    /// with a typed verdict on the agent's `rejected` subject.
    async fn probes(&self) -> (RuleOutcome, RuleOutcome) {
        let flow = self
            .submit(
                Rule::MalformedReport,
                json!({ "sleep_ms": 2500 }),
                RetryPolicy::default(),
                Timeouts::default(),
            )
            .await;
        let flow = match flow {
            Ok(f) => f,
            Err(e) => return (Err(e.clone()), Err(e)),
        };
        let deadline = self.deadline();
        let outcomes = match self.started(&flow, 1, deadline).await {
            Err(e) => (Err(e.clone()), Err(e)),
            Ok(_) => self.probe_both(&flow, deadline).await,
        };
        let _ = self.finished(&flow, deadline).await;
        self.tidy(&flow).await;
        outcomes
    }

    async fn probe_both(&self, flow: &FlowId, deadline: Instant) -> (RuleOutcome, RuleOutcome) {
        {
            {
                let malformed = self
                    .probe(
                        b"{\"flow_id\": \"not a report".to_vec(),
                        ErrorCode::BadRequest,
                        RejectReason::Malformed,
                        deadline,
                    )
                    .await;
                let task = match TaskId::new(TASK) {
                    Ok(t) => t,
                    Err(e) => return (malformed, Err(e.to_string())),
                };
                let out_of_range = AgentReport {
                    flow_id: flow.clone(),
                    task_id: task,
                    attempt: 1,
                    agent_id: self.agent.clone(),
                    kind: ReportKind::Progress {
                        progress: Some(7.5),
                        message: Some("out of range on purpose".into()),
                    },
                    at_ms: common::now_ms(),
                };
                let bounds = match serde_json::to_vec(&out_of_range) {
                    Ok(body) => {
                        self.probe(
                            body,
                            ErrorCode::BadRequest,
                            RejectReason::ProgressOutOfRange,
                            deadline,
                        )
                        .await
                    }
                    Err(e) => Err(e.to_string()),
                };
                // The refused progress changed nothing.
                let bounds = match (bounds, self.client.flow_status(flow).await) {
                    (Ok(o), Ok(s)) => match task_of(&s).and_then(|t| t.progress) {
                        Some(p) if p > 1.0 => {
                            Err(format!("refused, yet the task shows progress {p}"))
                        }
                        _ => Ok(o),
                    },
                    (other, _) => other,
                };
                (malformed, bounds)
            }
        }
    }

    /// Publishes `body` on the agent's report subject and waits for its verdict.
    async fn probe(
        &self,
        body: Vec<u8>,
        code: ErrorCode,
        reason: RejectReason,
        deadline: Instant,
    ) -> RuleOutcome {
        let msg_id = format!("{KIT_MSG_ID}.{}", uuid::Uuid::now_v7().simple());
        let to = subject::report(&self.agent);
        let ack = self
            .js
            .publish_with_headers(
                to.clone(),
                common::nats::dedupe_headers(&to, &msg_id),
                body.into(),
            )
            .await
            .map_err(because("report not published"))?;
        ack.await.map_err(because("report not stored"))?;
        let verdict = self
            .wait_log(
                &format!("verdict on {}", subject::rejected(&self.agent)),
                deadline,
                |log| {
                    log.verdicts
                        .iter()
                        .find(|(_, v)| v.msg_id.as_deref() == Some(msg_id.as_str()))
                        .map(|(_, v)| v.clone())
                },
            )
            .await?;
        if verdict.code != code || verdict.reason != reason {
            return Err(format!(
                "verdict {}/{}, not {}/{}",
                super::wire_name(&verdict.code),
                super::wire_name(&verdict.reason),
                super::wire_name(&code),
                super::wire_name(&reason)
            ));
        }
        Ok(Outcome::Pass(format!(
            "verdict {}/{}: {}",
            super::wire_name(&code),
            super::wire_name(&reason),
            verdict.message
        )))
    }

    fn stale_attempt(&self) -> RuleOutcome {
        let log = self.log();
        let fenced: Vec<String> = log
            .verdicts
            .iter()
            .filter(|(_, v)| v.code == ErrorCode::Fenced)
            .filter(|(_, v)| {
                !v.msg_id
                    .as_deref()
                    .is_some_and(|m| m.starts_with(KIT_MSG_ID))
            })
            .map(|(_, v)| {
                format!(
                    "{} on {}/{} attempt {} refused: {}",
                    v.report_type.as_deref().unwrap_or("report"),
                    v.flow_id.as_deref().unwrap_or("?"),
                    v.task_id.as_deref().unwrap_or("?"),
                    v.attempt.map_or("?".into(), |a| a.to_string()),
                    super::wire_name(&v.reason)
                )
            })
            .collect();
        if !fenced.is_empty() {
            return Err(format!(
                "{} report(s) fenced: {}",
                fenced.len(),
                fenced.join("; ")
            ));
        }
        let sent = log.reports.iter().filter(|r| !r.by_kit()).count();
        Ok(Outcome::Pass(format!("{sent} reports, none fenced")))
    }

    fn progress_valid(&self) -> RuleOutcome {
        let log = self.log();
        let mut sent = 0;
        for r in log.reports.iter().filter(|r| !r.by_kit()) {
            if let Ok(AgentReport {
                kind: ReportKind::Progress { progress, message },
                ..
            }) = &r.body
            {
                sent += 1;
                if let Some(p) = progress {
                    if !p.is_finite() || !(0.0..=1.0).contains(p) {
                        return Err(format!("a progress report said {p}, outside 0..=1"));
                    }
                }
                if message.as_ref().is_some_and(|m| m.len() > 1024) {
                    return Err("a progress message is over 1,024 bytes".into());
                }
            }
        }
        if sent == 0 {
            return Ok(Outcome::Skip("the agent sent no progress report".into()));
        }
        Ok(Outcome::Pass(format!("{sent} progress reports in 0..=1")))
    }

    async fn heartbeats(&self) -> RuleOutcome {
        let interval = Duration::from_millis(self.heartbeat_ms.max(1));
        let slack = (interval / 2).max(Duration::from_millis(500));
        // Enough beats to judge: three intervals' worth.
        let watched = self.began + interval * 3 + slack;
        if watched > Instant::now() + self.budget {
            return Ok(Outcome::Skip(format!(
                "the interval ({} ms) is too long to judge within --timeout-s",
                interval.as_millis()
            )));
        }
        tokio::time::sleep_until(watched).await;
        let now = Instant::now();
        let log = self.log();
        if !log.lost.is_empty() {
            return Err(format!(
                "{} was declared lost (missed heartbeats)",
                self.agent
            ));
        }
        let mut times = vec![self.began];
        for (at, beat) in &log.heartbeats {
            match beat {
                Ok(b) if b.agent_id == self.agent => times.push(*at),
                Ok(b) => return Err(format!("a heartbeat names agent {}", b.agent_id)),
                Err(e) => return Err(format!("a heartbeat is not valid: {e}")),
            }
        }
        times.push(now);
        let longest = times
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default();
        if longest > interval + slack {
            return Err(format!(
                "{} ms without a heartbeat; registered interval {} ms",
                longest.as_millis(),
                interval.as_millis()
            ));
        }
        let beats = log.heartbeats.len();
        let most = (now - self.began).as_millis() / interval.as_millis() * 2 + 2;
        if beats as u128 > most {
            return Err(format!(
                "{beats} heartbeats in {} ms, far more than one per {} ms",
                (now - self.began).as_millis(),
                interval.as_millis()
            ));
        }
        Ok(Outcome::Pass(format!(
            "{beats} heartbeats, at most {} ms apart (interval {} ms)",
            longest.as_millis(),
            interval.as_millis()
        )))
    }

    async fn clean_leave(&self, stop_cmd: Option<&str>) -> RuleOutcome {
        let Some(cmd) = stop_cmd else {
            return Ok(Outcome::Skip("no --stop-cmd given".into()));
        };
        let since = Instant::now();
        let window = since + Duration::from_secs(5);
        let mut child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .kill_on_drop(true)
            .spawn()
            .map_err(because("the stop command did not start"))?;
        let left = loop {
            let cap = self
                .client
                .capacity(&CapacityRequest::default())
                .await
                .map_err(because("agent status"))?;
            let status = cap.agent_status.get(&self.agent).copied();
            if status == Some(AgentStatus::Left) {
                break Ok(());
            }
            if Instant::now() >= window {
                break Err(format!(
                    "{} is {} 5 s after the stop command, not left",
                    self.agent,
                    status.map_or("unlisted".into(), |s| super::wire_name(&s))
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let exit = tokio::time::timeout_at(window.max(Instant::now()), child.wait()).await;
        left?;
        if let Ok(Ok(status)) = exit {
            if !status.success() {
                return Err(format!("the stop command failed: {status}"));
            }
        }
        let lost = self.log().lost.iter().filter(|at| **at >= since).count();
        if lost > 0 {
            return Err(format!("{} was declared lost while leaving", self.agent));
        }
        Ok(Outcome::Pass(format!(
            "left within {} ms, never lost",
            since.elapsed().as_millis()
        )))
    }
}

/// The kit's task in a status.
fn task_of(s: &FlowStatus) -> Option<&TaskStatus> {
    s.tasks.iter().find(|t| t.task_id.as_str() == TASK)
}

/// The report's `Nats-Msg-Id` is `{flow}.{task}.{attempt}.{type}`, with a
/// suffix for progress (each progress report is new).
fn msg_id_ok(msg_id: Option<&str>, r: &AgentReport) -> Result<(), String> {
    let kind = r.kind.type_name();
    if kind == "unknown" {
        return Err("a report has an unknown type".into());
    }
    let want = format!("{}.{}.{}.{kind}", r.flow_id, r.task_id, r.attempt);
    match msg_id {
        Some(id) if id == want => Ok(()),
        Some(id) if kind == "progress" && id.starts_with(&format!("{want}.")) => Ok(()),
        Some(id) => Err(format!("Nats-Msg-Id `{id}`, not `{want}`")),
        None => Err(format!(
            "a {kind} report has no Nats-Msg-Id (want `{want}`)"
        )),
    }
}

/// Subscribes to everything the agent says and is told, recording it in
/// `log`; returns once the server has every subscription.
async fn watch(
    nats: &async_nats::Client,
    agent: &AgentId,
    log: &Arc<Mutex<Log>>,
) -> anyhow::Result<()> {
    let subjects = [
        subject::report(agent),
        subject::cancel(agent),
        subject::rejected(agent),
        subject::heartbeat(agent),
        subject::event::AGENT_LOST.to_owned(),
    ];
    for (i, s) in subjects.into_iter().enumerate() {
        let mut sub = nats.subscribe(s).await?;
        let (log, agent) = (log.clone(), agent.clone());
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let at = Instant::now();
                let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
                match i {
                    0 => log.reports.push(SeenReport {
                        at,
                        msg_id: msg
                            .headers
                            .as_ref()
                            .and_then(|h| h.get("Nats-Msg-Id"))
                            .map(|v| v.to_string()),
                        body: serde_json::from_slice(&msg.payload).map_err(|e| e.to_string()),
                    }),
                    1 => log
                        .cancels
                        .extend(serde_json::from_slice(&msg.payload).ok().map(|n| (at, n))),
                    2 => log
                        .verdicts
                        .extend(serde_json::from_slice(&msg.payload).ok().map(|v| (at, v))),
                    3 => log.heartbeats.push((
                        at,
                        serde_json::from_slice(&msg.payload).map_err(|e| e.to_string()),
                    )),
                    _ => {
                        let lost = serde_json::from_slice::<common::msg::Event>(&msg.payload)
                            .is_ok_and(|e| {
                                matches!(e.kind, common::msg::EventKind::AgentLost { agent_id, .. } if agent_id == agent)
                            });
                        if lost {
                            log.lost.push(at);
                        }
                    }
                }
            }
        });
    }
    nats.flush().await?;
    Ok(())
}
