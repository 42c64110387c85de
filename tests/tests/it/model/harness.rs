//! The system the model test drives: one nats-server, the allocator,
//! synchronizer and monitor in-process, two orchestrator replicas that can be
//! killed like `kill -9`, and agents on runtimes of their own that record
//! every handler run. Also the seeded random source and the watchdog that
//! reads the flows all the time, so that a deadline passing or a ready task
//! left standing is seen whenever it happens, not only between steps.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::msg::{
    Assignment, CapacityRequest, ExplainRequest, FlowListRequest, FlowState, Requirements,
    TaskState,
};
use common::{AgentId, Client, FlowId};
use coordkit::agent::{self, AgentOptions, TaskFailure};
use serde_json::{json, Value};
use testkit::{start_service, wait_for_service, Isolated, NatsServer, Replica, ServiceHandle};
use tokio::sync::watch;

/// How long after its deadline an attempt may still hold its task: the
/// orchestrator's sweep runs every 200 ms, the rest is room for a loaded machine.
pub(super) const TIMEOUT_SLACK_MS: u64 = 4_000;
/// How long a ready task of a running flow, past its back-off, may wait while
/// the allocator says it fits.
pub(super) const STUCK_MS: u64 = 10_000;
/// How long a newer attempt may overlap the one it replaced: the cancel
/// notice to the old agent is on its way.
pub(super) const SUPERSEDE_GRACE: Duration = Duration::from_secs(2);
/// The allocator's reconciliation grace here (30 s by default), so an
/// allocation no task holds is taken back within the test's bounds.
pub(super) const RECONCILE_GRACE_MS: u64 = 2_000;
/// Cpu each agent offers when it starts; the agent runs up to this many tasks.
pub(super) const AGENT_CPU: f64 = 2.0;
const AGENT_CONCURRENCY: usize = 4;

/// SplitMix64: a seed gives the same sequence of actions on every machine.
pub(super) struct Rng(u64);

impl Rng {
    pub(super) fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub(super) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub(super) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub(super) fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    pub(super) fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }

    pub(super) fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        (!items.is_empty()).then(|| &items[self.below(items.len() as u64) as usize])
    }
}

/// One handler run, as the agent that ran it saw it.
#[derive(Clone, Debug)]
pub(super) struct Run {
    pub(super) agent: String,
    pub(super) flow: String,
    pub(super) task: String,
    pub(super) attempt: u32,
    pub(super) start: Instant,
    pub(super) end: Option<Instant>,
}

/// Every handler run of every agent: the agents' side of "no task runs twice at once".
#[derive(Clone, Default)]
pub(super) struct Runs(Arc<Mutex<Vec<Run>>>);

/// Ends its run when the handler returns or is aborted.
struct RunGuard(Runs, usize);

impl Drop for RunGuard {
    fn drop(&mut self) {
        if let Ok(mut runs) = self.0 .0.lock() {
            let run = &mut runs[self.1];
            run.end.get_or_insert_with(Instant::now);
        }
    }
}

impl Runs {
    fn begin(&self, agent: &str, a: &Assignment) -> RunGuard {
        let mut runs = self.0.lock().unwrap();
        runs.push(Run {
            agent: agent.to_owned(),
            flow: a.flow_id.to_string(),
            task: a.task_id.to_string(),
            attempt: a.attempt,
            start: Instant::now(),
            end: None,
        });
        RunGuard(self.clone(), runs.len() - 1)
    }

    /// Ends the runs of a killed agent: its handlers died with it.
    pub(super) fn end_agent(&self, agent: &str) {
        let now = Instant::now();
        for run in self.0.lock().unwrap().iter_mut() {
            if run.agent == agent {
                run.end.get_or_insert(now);
            }
        }
    }

    /// Runs of one task that overlapped: the same attempt twice at once, or
    /// a newer attempt while an older one went on past [`SUPERSEDE_GRACE`].
    pub(super) fn overlaps(&self) -> Vec<String> {
        let now = Instant::now();
        let runs = self.0.lock().unwrap().clone();
        let mut by_task: HashMap<(&str, &str), Vec<&Run>> = HashMap::new();
        for r in &runs {
            by_task
                .entry((r.flow.as_str(), r.task.as_str()))
                .or_default()
                .push(r);
        }
        let mut found = Vec::new();
        for ((flow, task), mut rs) in by_task {
            rs.sort_by_key(|r| r.start);
            for (i, older) in rs.iter().enumerate() {
                for newer in &rs[i + 1..] {
                    let older_end = older.end.unwrap_or(now);
                    if older_end <= newer.start {
                        continue;
                    }
                    let overlap = older_end - newer.start;
                    if older.attempt == newer.attempt || overlap > SUPERSEDE_GRACE {
                        found.push(format!(
                            "task {flow}/{task} ran twice at once: attempt {} on {} and attempt {} on {} overlapped {} ms",
                            older.attempt, older.agent, newer.attempt, newer.agent, overlap.as_millis()
                        ));
                    }
                }
            }
        }
        found
    }
}

/// What a task does on an agent, by its `kind`:
/// - `work`: takes `input.ms` and succeeds;
/// - `flaky`: fails (retryably) on odd attempts, so a re-run fails once more and backs off;
/// - `hang`: never returns (until cancelled), so only its timeout ends it.
///
/// While `hold` is set, work that is done waits before it reports, so a
/// check can read a state that stands still.
async fn handle(
    a: Assignment,
    agent: String,
    runs: Runs,
    mut hold: watch::Receiver<bool>,
) -> Result<Value, TaskFailure> {
    let _run = runs.begin(&agent, &a);
    let ms = a.input["ms"].as_u64().unwrap_or(100);
    match a.kind.as_str() {
        "hang" => std::future::pending().await,
        "flaky" if a.attempt % 2 == 1 => {
            tokio::time::sleep(Duration::from_millis(ms / 2)).await;
            Err(TaskFailure {
                error: format!("flaky on attempt {}", a.attempt),
                retryable: true,
            })
        }
        _ => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            let _ = hold.wait_for(|held| !*held).await;
            Ok(json!({"attempt": a.attempt}))
        }
    }
}

/// The services, the agents and what they recorded.
pub(super) struct Sys {
    pub(super) server: NatsServer,
    _services: Vec<ServiceHandle>,
    orchestrators: Vec<Replica>,
    pub(super) client: Client,
    pub(super) runs: Runs,
    hold: watch::Sender<bool>,
    /// Agents by id: running ones, and drained ones still running.
    pub(super) agents: BTreeMap<String, Isolated>,
    next_agent: usize,
    /// `flow.completed` and `flow.rerun` events as they were published, to
    /// say which flow a count that does not match comes from.
    pub(super) flow_events: Arc<Mutex<Vec<common::msg::Event>>>,
}

impl Sys {
    pub(super) async fn start(agents: usize) -> Sys {
        common::telemetry::init_for_tests();
        let server = NatsServer::start();
        let cfg = server.config();
        let allocator = {
            let cfg = cfg.clone();
            ServiceHandle::spawn("allocator", move |rx| {
                let mut c = allocator::Config::new(cfg);
                c.reconcile_grace_ms = RECONCILE_GRACE_MS;
                allocator::run(c, async move {
                    let _ = rx.await;
                })
            })
        };
        let services = vec![
            allocator,
            start_service("synchronizer", cfg.clone()),
            start_service("monitor", cfg.clone()),
        ];
        let orchestrators = (0..2)
            .map(|_| Replica::start("orchestrator", cfg.clone()))
            .collect();
        let nats = server.connect().await;
        for name in testkit::SERVICES {
            wait_for_service(&nats, name).await;
        }
        let flow_events = Arc::new(Mutex::new(Vec::new()));
        let mut sub = nats.subscribe("coord.events.flow.>").await.unwrap();
        let log = flow_events.clone();
        tokio::spawn(async move {
            use futures::StreamExt;
            while let Some(m) = sub.next().await {
                if let Ok(e) = serde_json::from_slice(&m.payload) {
                    log.lock().unwrap().push(e);
                }
            }
        });
        let client = Client::new(nats).with_timeout(Duration::from_secs(10));
        let (hold, _) = watch::channel(false);
        let mut sys = Sys {
            server,
            _services: services,
            orchestrators,
            client,
            runs: Runs::default(),
            hold,
            agents: BTreeMap::new(),
            next_agent: 0,
            flow_events,
        };
        for _ in 0..agents {
            sys.add_agent().await;
        }
        sys
    }

    /// Starts a fresh agent and waits until the allocator lists it.
    pub(super) async fn add_agent(&mut self) -> String {
        let id = format!("m{}", self.next_agent);
        self.next_agent += 1;
        let (url, runs, hold) = (
            self.server.url().to_owned(),
            self.runs.clone(),
            self.hold.subscribe(),
        );
        let name = id.clone();
        let agent = Isolated::spawn(async move {
            let nats = async_nats::connect(url).await.expect("agent connects");
            let mut opts =
                AgentOptions::new(AgentId::new(&name).unwrap()).capacity("cpu", AGENT_CPU);
            opts.heartbeat_interval = Duration::from_millis(500);
            opts.concurrency = AGENT_CONCURRENCY;
            let handler = move |a: Assignment| handle(a, name.clone(), runs.clone(), hold.clone());
            let _ = agent::run(nats, opts, handler, std::future::pending::<()>()).await;
        });
        self.agents.insert(id.clone(), agent);
        let agent_id = AgentId::new(&id).unwrap();
        testkit::eventually(Duration::from_secs(20), "the agent registered", || async {
            let c = self
                .client
                .capacity(&CapacityRequest::default())
                .await
                .ok()?;
            c.agents.contains_key(&agent_id).then_some(())
        })
        .await;
        id
    }

    /// Kills an agent like `kill -9`; its runs end with it.
    pub(super) fn kill_agent(&mut self, id: &str) {
        if let Some(agent) = self.agents.remove(id) {
            agent.kill();
            self.runs.end_agent(id);
        }
    }

    /// Kills one orchestrator replica like `kill -9` and starts a new one.
    pub(super) async fn restart_orchestrator(&mut self, which: usize) {
        let i = which % self.orchestrators.len();
        let old = self.orchestrators.remove(i);
        old.kill();
        self.orchestrators
            .push(Replica::start("orchestrator", self.server.config()));
    }

    /// Finished work waits before it reports while held (see [`handle`]).
    pub(super) fn hold(&self, held: bool) {
        self.hold.send_replace(held);
    }
}

/// What the watchdog saw go wrong, each once.
#[derive(Clone, Default)]
pub(super) struct Violations(Arc<Mutex<Vec<String>>>);

impl Violations {
    pub(super) fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }

    fn push(&self, v: String) {
        self.0.lock().unwrap().push(v);
    }
}

/// A task in one state and attempt, since when the watchdog has seen it so.
struct Seen {
    state: TaskState,
    attempt: u32,
    since_ms: u64,
    reported: bool,
}

/// Reads every unfinished flow every 250 ms, through `flow.list` and
/// `flow.status`, and records a violation when an attempt still holds its
/// task [`TIMEOUT_SLACK_MS`] after its deadline, or a ready task of a running
/// flow has stood [`STUCK_MS`] past its back-off while the allocator says it
/// fits (checked three times, a second apart, with `flow.explain` quoted).
pub(super) async fn watchdog(client: Client, found: Violations) {
    let mut seen: HashMap<(FlowId, String), Seen> = HashMap::new();
    let cpu = Requirements {
        resources: [("cpu".to_string(), 1.0)].into(),
        ..Default::default()
    };
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let Ok(list) = client.list_flows(&FlowListRequest::default()).await else {
            continue;
        };
        let mut live = HashSet::new();
        for summary in list.flows.iter().filter(|f| !f.state.is_terminal()) {
            let Ok(status) = client.flow_status(&summary.flow_id).await else {
                continue;
            };
            let now = common::now_ms();
            for t in &status.tasks {
                let key = (status.flow_id.clone(), t.task_id.to_string());
                live.insert(key.clone());
                let s = seen.entry(key).or_insert(Seen {
                    state: t.state,
                    attempt: t.attempt,
                    since_ms: now,
                    reported: false,
                });
                if (s.state, s.attempt) != (t.state, t.attempt) {
                    *s = Seen {
                        state: t.state,
                        attempt: t.attempt,
                        since_ms: now,
                        reported: false,
                    };
                }
                if s.reported {
                    continue;
                }
                let flow = &status.flow_id;
                if let (true, Some(deadline)) = (t.state.is_active(), t.deadline_ms) {
                    if now > deadline + TIMEOUT_SLACK_MS {
                        s.reported = true;
                        found.push(format!(
                            "timeout not enforced: task {flow}/{} attempt {} is still {} {} ms after its deadline (flow {})",
                            t.task_id, t.attempt, t.state, now - deadline, status.state
                        ));
                    }
                }
                let past_backoff = t.not_before_ms.is_none_or(|nb| now > nb + STUCK_MS);
                if t.state == TaskState::Ready
                    && status.state == FlowState::Running
                    && past_backoff
                    && now - s.since_ms > STUCK_MS
                {
                    let mut fits = 0;
                    for _ in 0..3 {
                        let req = CapacityRequest {
                            requirements: Some(cpu.clone()),
                            owner: None,
                        };
                        if let Ok(c) = client.capacity(&req).await {
                            fits += usize::from(c.fits == Some(true));
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    let still = client.flow_status(flow).await.ok().and_then(|st| {
                        let same = st.tasks.iter().any(|x| {
                            x.task_id == t.task_id
                                && x.state == TaskState::Ready
                                && x.attempt == t.attempt
                        });
                        (same && st.state == FlowState::Running).then_some(())
                    });
                    if fits == 3 && still.is_some() {
                        s.reported = true;
                        let why = client
                            .explain_flow(&ExplainRequest {
                                flow_id: flow.clone(),
                                task_id: Some(t.task_id.clone()),
                            })
                            .await
                            .map(|e| {
                                e.tasks
                                    .iter()
                                    .flat_map(|x| x.reasons.clone())
                                    .collect::<Vec<_>>()
                                    .join("; ")
                            })
                            .unwrap_or_else(|e| format!("explain failed: {e}"));
                        found.push(format!(
                            "no progress: task {flow}/{} attempt {} has been ready {} ms past its back-off while cpu fits (explain: {why})",
                            t.task_id,
                            t.attempt,
                            common::now_ms() - s.since_ms
                        ));
                    }
                }
            }
        }
        seen.retain(|k, _| live.contains(k));
    }
}
