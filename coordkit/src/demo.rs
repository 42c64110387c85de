//! The demo shown by the README's run command: a demo agent, the three-task
//! flow `a → b, a → c`, live progress until it completes, and a look at state
//! and metrics.

use std::fmt::Write as _;
use std::time::Duration;

use common::msg::{
    Assignment, FlowSpec, FlowState, FlowStatus, Requirements, StatePut, TaskSpec, TaskState,
};
use common::{AgentId, Client, Error, ErrorCode, TaskId};
use serde_json::{json, Value};

use crate::agent::{self, AgentOptions};

/// The demo agent's id.
pub const DEMO_AGENT: &str = "demo-agent";

/// The demo flow: `a` fans out to `b` and `c`.
pub fn demo_flow() -> Result<FlowSpec, Error> {
    let task = |id: &str, deps: &[&str], text: &str| -> Result<TaskSpec, Error> {
        let mut t = TaskSpec::new(TaskId::new(id)?);
        t.kind = "echo".into();
        t.input = json!({ "text": text });
        t.requirements = Requirements {
            resources: [("cpu".to_string(), 1.0)].into(),
            capabilities: vec!["demo".into()],
            ..Default::default()
        };
        t.depends_on = deps
            .iter()
            .map(|d| TaskId::new(*d))
            .collect::<Result<_, _>>()?;
        Ok(t)
    };
    Ok(FlowSpec::new(
        "demo: a -> b, a -> c",
        vec![
            task("a", &[], "fetch")?,
            task("b", &["a"], "summarise")?,
            task("c", &["a"], "translate")?,
        ],
    ))
}

/// Options of the demo agent: two CPUs, the `demo` capability.
pub fn demo_agent_options() -> Result<AgentOptions, Error> {
    let mut opts = AgentOptions::new(AgentId::new(DEMO_AGENT)?)
        .capacity("cpu", 2.0)
        .capability("demo");
    opts.heartbeat_interval = Duration::from_secs(1);
    opts.concurrency = 2;
    Ok(opts)
}

/// Runs the demo agent until `shutdown`: each task takes `work` and echoes its input.
pub async fn run_demo_agent(
    nats: async_nats::Client,
    work: Duration,
    shutdown: impl std::future::Future,
) -> Result<(), Error> {
    run_echo_agent(nats, AgentId::new(DEMO_AGENT)?, work, shutdown).await
}

/// Runs an agent with the demo agent's options under another id, so several echo
/// agents can serve one system.
pub async fn run_echo_agent(
    nats: async_nats::Client,
    agent_id: AgentId,
    work: Duration,
    shutdown: impl std::future::Future,
) -> Result<(), Error> {
    let mut opts = demo_agent_options()?;
    opts.agent_id = agent_id;
    run_echo_agent_with(nats, opts, work, shutdown).await
}

/// An echo agent with options of its own (another heartbeat interval, say).
/// A task whose input has a `conformance` object is run as that object says
/// (see [`run_conformance_task`]), so `coordctl conformance` can drive it.
pub async fn run_echo_agent_with(
    nats: async_nats::Client,
    opts: agent::AgentOptions,
    work: Duration,
    shutdown: impl std::future::Future,
) -> Result<(), Error> {
    let client = Client::new(nats.clone());
    agent::run(
        nats,
        opts,
        move |task| {
            let client = client.clone();
            async move {
                if task.input.get("conformance").is_some_and(Value::is_object) {
                    return run_conformance_task(&client, &task).await;
                }
                tokio::time::sleep(work).await;
                Ok(json!({ "task": task.task_id, "echo": task.input, "attempt": task.attempt }))
            }
        },
        shutdown,
    )
    .await
}

/// How often a conformance task's state put is tried again after a `conflict`.
const STATE_CAS_RETRIES: usize = 5;

/// Runs a task the way its input's `conformance` object says (the convention
/// in docs/protocol.md, *Conformance*): work `sleep_ms`, reporting progress
/// every `progress_every_ms`; put `state` as this agent's document by
/// compare-and-set; then fail as `fail` says or complete with `output`
/// (default `{"echo": input}`). A cancel notice aborts this future, so the
/// sleep ends at once and no final report follows.
pub async fn run_conformance_task(
    client: &Client,
    task: &Assignment,
) -> Result<Value, agent::TaskFailure> {
    let spec = &task.input["conformance"];
    let sleep = Duration::from_millis(spec["sleep_ms"].as_u64().unwrap_or(0));
    let every = spec["progress_every_ms"]
        .as_u64()
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis);
    let started = tokio::time::Instant::now();
    let end = started + sleep;
    let mut step = 0u32;
    loop {
        let next = every.map_or(end, |e| (started + e * (step + 1)).min(end));
        tokio::time::sleep_until(next).await;
        if next >= end {
            break;
        }
        step += 1;
        let done = started.elapsed().as_secs_f64() / sleep.as_secs_f64();
        agent::progress(Some(done.clamp(0.0, 1.0)), Some(format!("step {step}")))
            .await
            .map_err(|e| agent::TaskFailure {
                error: format!("progress not reported: {e}"),
                retryable: true,
            })?;
    }
    if let Some(state) = spec.get("state").filter(|s| s.is_object()) {
        put_state(client, &task.agent_id, state)
            .await
            .map_err(|e| agent::TaskFailure {
                error: format!("conformance: state not stored: {e}"),
                retryable: true,
            })?;
    }
    if let Some(event) = spec.get("event").filter(|e| e.is_object()) {
        let event_type = event["type"].as_str().unwrap_or("conformance");
        let event_id = event["event_id"].as_str().map(str::to_owned);
        agent::publish_event(
            client,
            &task.agent_id,
            event_type,
            event["data"].clone(),
            event_id,
        )
        .await
        .map_err(|e| agent::TaskFailure {
            error: format!("conformance: event not stored: {e}"),
            retryable: false,
        })?;
    }
    if let Some(fail) = spec["fail"].as_str() {
        return Err(agent::TaskFailure {
            error: "conformance: asked to fail".into(),
            retryable: fail == "retryable",
        });
    }
    Ok(match spec.get("output") {
        Some(output) => output.clone(),
        None => json!({ "echo": task.input }),
    })
}

/// Stores `doc` as `agent`'s document made from the revision just read,
/// reading again when someone wrote in between.
async fn put_state(client: &Client, agent: &AgentId, doc: &Value) -> Result<(), Error> {
    let mut tries = 0;
    loop {
        let expected_revision = match client.state_get(agent).await {
            Ok(current) => current.revision,
            Err(e) if e.code == ErrorCode::NotFound => 0,
            Err(e) => return Err(e),
        };
        let put = StatePut {
            agent_id: agent.clone(),
            expected_revision,
            doc: doc.clone(),
            scope: Default::default(),
            clock: None,
        };
        match client.state_put(&put).await {
            Err(e) if e.code == ErrorCode::Conflict && tries < STATE_CAS_RETRIES => tries += 1,
            other => return other.map(|_| ()),
        }
    }
}

/// One line of progress: `[ 33%] a:succeeded b:running c:assigned`.
pub fn progress_line(s: &FlowStatus) -> String {
    let mut line = format!("[{:>3.0}%]", s.progress * 100.0);
    for t in &s.tasks {
        let _ = write!(line, " {}:{}", t.task_id, state_name(t.state));
    }
    line
}

/// A task state by its wire name.
pub fn state_name(s: TaskState) -> &'static str {
    s.as_str()
}

/// Submits the demo flow and prints progress until it completes (or `deadline` passes).
pub async fn run_demo_flow(client: &Client, deadline: Duration) -> Result<FlowStatus, Error> {
    let created = submit_with_retry(client, &demo_flow()?).await?;
    crate::cli::say(&format!(
        "flow {} created: {}",
        created.flow_id, created.name
    ));
    let started = tokio::time::Instant::now();
    let mut last = String::new();
    loop {
        let status = client.flow_status(&created.flow_id).await?;
        let line = progress_line(&status);
        if line != last {
            crate::cli::say(&line);
            last = line;
        }
        if status.state != FlowState::Running {
            return Ok(status);
        }
        if started.elapsed() > deadline {
            return Err(Error::new(
                ErrorCode::Timeout,
                format!("flow not finished after {deadline:?}: {last}"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn submit_with_retry(client: &Client, spec: &FlowSpec) -> Result<FlowStatus, Error> {
    let mut waited = Duration::ZERO;
    loop {
        match client.create_flow(spec).await {
            Err(e) if e.code == ErrorCode::Unavailable && waited < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(250)).await;
                waited += Duration::from_millis(250);
            }
            other => return other,
        }
    }
}

/// Stores and reads back the demo agent's state document, printing both.
pub async fn show_state(client: &Client) -> Result<(), Error> {
    let agent = AgentId::new(DEMO_AGENT)?;
    let expected_revision = match client.state_get(&agent).await {
        Ok(doc) => doc.revision,
        Err(e) if e.code == ErrorCode::NotFound => 0,
        Err(e) => return Err(e),
    };
    let put = client
        .state_put(&StatePut {
            agent_id: agent.clone(),
            expected_revision,
            doc: json!({ "last_demo_ms": common::now_ms() }),
            scope: Default::default(),
            clock: None,
        })
        .await?;
    let got = client.state_get(&agent).await?;
    crate::cli::say(&format!(
        "state of {agent}: revision {} (put) / {} (get): {}",
        put.revision, got.revision, got.doc
    ));
    Ok(())
}
