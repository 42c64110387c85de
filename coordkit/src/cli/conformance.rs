//! `coordctl conformance`: drives a running agent through every rule of the
//! agent contract and says, rule by rule, whether it kept it.
//!
//! The kit is an operator watching from outside: it pins small tasks of kind
//! `conformance` on the agent (their input follows the convention in
//! docs/protocol.md, *Conformance*), listens on the agent's subjects (reports,
//! cancel notices, verdicts, heartbeats) and the `agent.lost` event, and
//! reads flow status and state documents; to check that the agent ignores a
//! repeat, it sends a live attempt's assignment again itself.
//! Rules run one after another, so whatever the agent does meanwhile belongs
//! to the rule running.

mod own;
mod task;
mod whole_run;

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
    RepeatIgnored,
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

const RULES: [(Rule, &str); 17] = [
    (Rule::Success, "success"),
    (Rule::RetryableFailure, "retryable_failure"),
    (Rule::FatalFailure, "fatal_failure"),
    (Rule::ProgressKeepsLease, "progress_keeps_lease"),
    (Rule::HeartbeatTimeout, "heartbeat_timeout"),
    (Rule::Cancel, "cancel"),
    (Rule::RepeatIgnored, "repeat_ignored"),
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
            Rule::RepeatIgnored => kit.repeat_ignored().await,
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
    /// It came in an array with others (its message's id is the array's).
    in_array: bool,
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
    /// after its work would have ended.
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
        Ok(())
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
}

/// The kit's task in a status.
fn task_of(s: &FlowStatus) -> Option<&TaskStatus> {
    s.tasks.iter().find(|t| t.task_id.as_str() == TASK)
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
                    0 => {
                        let msg_id = msg
                            .headers
                            .as_ref()
                            .and_then(|h| h.get("Nats-Msg-Id"))
                            .map(|v| v.to_string());
                        let seen = |body, in_array| SeenReport {
                            at,
                            msg_id: msg_id.clone(),
                            in_array,
                            body,
                        };
                        match common::msg::reports_in(&msg.payload) {
                            Ok(reports) => {
                                let in_array = reports.len() > 1;
                                log.reports
                                    .extend(reports.into_iter().map(|r| seen(Ok(r), in_array)));
                            }
                            Err(e) => log.reports.push(seen(Err(e.to_string()), false)),
                        }
                    }
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
