//! `coordctl flow …`: the orchestrator's operations.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Subcommand;
use common::msg::{
    ExplainRequest, FlowChanges, FlowListRequest, FlowOptimizeRequest, FlowPlan, FlowSpec,
    FlowState, FlowStatus, RerunRequest,
};
use common::{Error, ErrorCode, FlowId};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::{id, parse_wire, table, Ctx, Negative};
use crate::demo::state_name;

#[derive(Subcommand, Debug)]
pub(crate) enum FlowCmd {
    /// Submit a flow spec from a YAML or JSON file (`-` reads stdin).
    ///
    /// Unknown fields are rejected, so a typo such as `dependson` is an error.
    Submit {
        file: PathBuf,
        /// Follow the flow until it finishes (progress bar, then the task table);
        /// exit status 3 when it did not succeed.
        #[arg(long)]
        wait: bool,
    },
    /// A flow's state and its task table.
    Status { flow_id: String },
    /// Follow a flow with a live progress bar until it finishes, then print its task
    /// table; exit status 3 when it did not succeed.
    Watch {
        flow_id: String,
        /// How often to ask for the status, in milliseconds.
        #[arg(long, default_value_t = 250)]
        interval_ms: u64,
    },
    /// The flow's spec as submitted.
    Get { flow_id: String },
    /// Every flow, optionally only those in one state (running, paused, succeeded, failed, cancelled).
    List {
        #[arg(long, value_parser = parse_wire::<FlowState>)]
        state: Option<FlowState>,
    },
    /// Stop starting tasks; running tasks finish.
    Pause { flow_id: String },
    /// Start tasks again after a pause.
    Resume { flow_id: String },
    /// Cancel a flow: its agents are told to stop and its allocations are released.
    Cancel { flow_id: String },
    /// Change a flow that has not finished, all at once or not at all.
    ///
    /// The changes (YAML or JSON file, `-` for stdin) are a `FlowChanges` document
    /// without `flow_id` and `expected_revision`: `add`, `add_dependencies`,
    /// `remove`, `priorities`, `inputs`. The flow's current revision is read
    /// first; if it changes before the modification lands, it is retried.
    Modify { flow_id: String, changes: PathBuf },
    /// Run a finished task and everything downstream of it again.
    Rerun { flow_id: String, task_id: String },
    /// Why each unfinished task (or the one named) is where it is.
    Explain {
        flow_id: String,
        #[arg(long)]
        task: Option<String>,
    },
    /// A plan for the remaining tasks: critical path, expected makespan now and
    /// with critical-path priorities, where each task would run, the bottleneck.
    #[command(alias = "optimize")]
    Optimise {
        flow_id: String,
        /// Set the proposed priorities on the tasks that have not started.
        #[arg(long)]
        apply: bool,
    },
}

pub(crate) async fn run(ctx: &Ctx, cmd: FlowCmd) -> anyhow::Result<()> {
    let c = &ctx.client;
    match cmd {
        FlowCmd::Submit { file, wait } => {
            let spec = read_spec(&file)?;
            let status = c.create_flow(&spec).await?;
            let status = if wait {
                watch(ctx, &status.flow_id, Duration::from_millis(250)).await?
            } else {
                status
            };
            ctx.emit(&status, status_text);
            if wait {
                succeeded(&status)?;
            }
        }
        FlowCmd::Status { flow_id } => {
            let status = c.flow_status(&id::<FlowId>(&flow_id)?).await?;
            ctx.emit(&status, status_text);
        }
        FlowCmd::Watch {
            flow_id,
            interval_ms,
        } => {
            let status = watch(
                ctx,
                &id::<FlowId>(&flow_id)?,
                Duration::from_millis(interval_ms),
            )
            .await?;
            ctx.emit(&status, status_text);
            succeeded(&status)?;
        }
        FlowCmd::Get { flow_id } => {
            let spec = c.flow_get(&id::<FlowId>(&flow_id)?).await?;
            ctx.emit(&spec, |s| serde_yaml::to_string(s).unwrap_or_default());
        }
        FlowCmd::List { state } => {
            let list = c.list_flows(&FlowListRequest { state }).await?;
            ctx.emit(&list, |l| {
                let rows = l
                    .flows
                    .iter()
                    .map(|f| {
                        vec![
                            f.flow_id.to_string(),
                            flow_state(f.state).to_owned(),
                            f.tasks.to_string(),
                            format!("{:.0}%", f.progress * 100.0),
                            f.name.clone(),
                        ]
                    })
                    .collect();
                table(&["flow", "state", "tasks", "progress", "name"], rows)
            });
        }
        FlowCmd::Pause { flow_id } => {
            let status = c.pause_flow(&id::<FlowId>(&flow_id)?).await?;
            ctx.emit(&status, status_text);
        }
        FlowCmd::Resume { flow_id } => {
            let status = c.resume_flow(&id::<FlowId>(&flow_id)?).await?;
            ctx.emit(&status, status_text);
        }
        FlowCmd::Cancel { flow_id } => {
            let status = c.cancel_flow(&id::<FlowId>(&flow_id)?).await?;
            ctx.emit(&status, status_text);
        }
        FlowCmd::Modify { flow_id, changes } => {
            let flow_id = id::<FlowId>(&flow_id)?;
            let text = if changes.as_os_str() == "-" {
                super::read_arg("-")?
            } else {
                std::fs::read_to_string(&changes).map_err(|e| {
                    Error::bad_request(format!("cannot read {}: {e}", changes.display()))
                })?
            };
            let mut doc: serde_json::Value = serde_yaml::from_str(&text).map_err(|e| {
                Error::bad_request(format!("the changes are not valid YAML or JSON: {e}"))
            })?;
            let mut status = None;
            for _ in 0..10 {
                let current = c.flow_status(&flow_id).await?;
                if let Some(obj) = doc.as_object_mut() {
                    obj.insert("flow_id".into(), serde_json::json!(flow_id));
                    obj.insert(
                        "expected_revision".into(),
                        serde_json::json!(current.revision),
                    );
                }
                let changes: FlowChanges = serde_json::from_value(doc.clone())
                    .map_err(|e| Error::bad_request(format!("the changes are not valid: {e}")))?;
                match c.modify_flow(&changes).await {
                    Err(e)
                        if e.code == ErrorCode::Conflict
                            && e.details.get("current_revision").is_some() =>
                    {
                        continue
                    }
                    other => {
                        status = Some(other?);
                        break;
                    }
                }
            }
            let status = status.ok_or_else(|| {
                Error::new(ErrorCode::Conflict, "the flow kept changing; try again")
            })?;
            ctx.emit(&status, status_text);
        }
        FlowCmd::Rerun { flow_id, task_id } => {
            let req = RerunRequest {
                flow_id: id(&flow_id)?,
                task_id: id(&task_id)?,
            };
            let status = c.rerun_task(&req).await?;
            ctx.emit(&status, status_text);
        }
        FlowCmd::Explain { flow_id, task } => {
            let req = ExplainRequest {
                flow_id: id(&flow_id)?,
                task_id: task.as_deref().map(id).transpose()?,
            };
            let why = c.explain_flow(&req).await?;
            ctx.emit(&why, |w| {
                let rows = w
                    .tasks
                    .iter()
                    .map(|t| {
                        vec![
                            t.task_id.to_string(),
                            state_name(t.state).to_owned(),
                            t.reasons.join("; "),
                        ]
                    })
                    .collect();
                table(&["task", "state", "why"], rows)
            });
        }
        FlowCmd::Optimise { flow_id, apply } => {
            let req = FlowOptimizeRequest {
                flow_id: id(&flow_id)?,
                apply,
            };
            let plan = c.optimize_flow(&req).await?;
            ctx.emit(&plan, plan_text);
        }
    }
    Ok(())
}

fn plan_text(p: &FlowPlan) -> String {
    let path: Vec<&str> = p.critical_path.iter().map(|t| t.as_str()).collect();
    // With tasks left and none placed, a makespan of 0 ms would read as done.
    let makespan = if p.placements.is_empty() && !p.unplaceable.is_empty() {
        format!(
            "nothing can be placed now ({} tasks cannot run)",
            p.unplaceable.len()
        )
    } else {
        format!(
            "{} ms now, {} ms with the proposed priorities (no order beats {} ms)",
            p.makespan_ms, p.optimized_makespan_ms, p.lower_bound_ms
        )
    };
    let mut out =
        format!(
        "flow {} (revision {})\ncritical path: {} ({} ms)\nmakespan: {makespan}\nbottleneck: {}\n",
        p.flow_id,
        p.revision,
        if path.is_empty() { "-".to_owned() } else { path.join(" → ") },
        p.critical_path_ms,
        p.bottleneck.message,
    );
    if p.priority_changes.is_empty() {
        out.push_str("priorities: the current order is as good as the plan can do\n");
    } else {
        let rows = p
            .priority_changes
            .iter()
            .map(|c| vec![c.task_id.to_string(), c.from.to_string(), c.to.to_string()])
            .collect();
        out.push_str(&table(&["task", "priority", "proposed"], rows));
        out.push('\n');
        out.push_str(if p.applied {
            "applied\n"
        } else {
            "not applied (use --apply)\n"
        });
    }
    if !p.placements.is_empty() {
        let rows = p
            .placements
            .iter()
            .map(|t| {
                vec![
                    t.task_id.to_string(),
                    t.agent_id.to_string(),
                    t.start_ms.to_string(),
                    t.end_ms.to_string(),
                ]
            })
            .collect();
        out.push_str(&table(&["task", "agent", "start ms", "end ms"], rows));
        out.push('\n');
    }
    for u in &p.unplaceable {
        out.push_str(&format!(
            "cannot run: {}: {}\n",
            u.task_id,
            u.reasons.join("; ")
        ));
    }
    out
}

/// A flow spec from YAML or JSON; YAML is a superset of JSON, so one parser reads
/// both, and its errors name the line and the unknown field.
fn read_spec(file: &Path) -> Result<FlowSpec, Error> {
    let text = super::read_arg(&if file.as_os_str() == "-" {
        "-".to_owned()
    } else {
        format!("@{}", file.display())
    })?;
    serde_yaml::from_str(&text)
        .map_err(|e| Error::bad_request(format!("the flow spec is not valid: {e}")))
}

/// Flows up to this many tasks get one live line per task under the bar; bigger
/// ones only the bar, so the terminal is not flooded.
const LIVE_TASK_LINES: usize = 20;

/// Polls the flow until it is no longer running, drawing a progress bar and a live
/// task table on stderr (hidden when stderr is not a terminal or the output is JSON).
async fn watch(ctx: &Ctx, flow: &FlowId, interval: Duration) -> Result<FlowStatus, Error> {
    let mut status = ctx.client.flow_status(flow).await?;
    let multi = if ctx.json {
        MultiProgress::with_draw_target(ProgressDrawTarget::hidden())
    } else {
        MultiProgress::new()
    };
    let bar = multi.add(ProgressBar::new(status.tasks.len() as u64));
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} tasks {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(status.flow_id.to_string());
    let line_style =
        ProgressStyle::with_template("  {msg}").unwrap_or_else(|_| ProgressStyle::default_bar());
    let lines: Vec<ProgressBar> = if status.tasks.len() <= LIVE_TASK_LINES {
        (0..=status.tasks.len())
            .map(|_| {
                let line = multi.add(ProgressBar::new(1));
                line.set_style(line_style.clone());
                line
            })
            .collect()
    } else {
        Vec::new()
    };
    loop {
        let done = status
            .tasks
            .iter()
            .filter(|t| t.state.is_terminal())
            .count();
        bar.set_length(status.tasks.len() as u64);
        bar.set_position(done as u64);
        bar.set_message(flow_state(status.state));
        if !lines.is_empty() {
            for (line, text) in lines.iter().zip(task_table(&status).lines()) {
                line.set_message(text.to_owned());
            }
        }
        if status.state.is_terminal() {
            break;
        }
        tokio::time::sleep(interval).await;
        status = ctx.client.flow_status(flow).await?;
    }
    for line in &lines {
        line.finish_and_clear();
    }
    bar.finish_and_clear();
    Ok(status)
}

/// A followed flow that ended other than succeeded is a "no" (exit status 3).
fn succeeded(status: &FlowStatus) -> Result<(), Negative> {
    if status.state == FlowState::Succeeded {
        Ok(())
    } else {
        Err(Negative(format!(
            "flow {} ended {}",
            status.flow_id,
            flow_state(status.state)
        )))
    }
}

fn flow_state(s: FlowState) -> &'static str {
    s.as_str()
}

fn status_text(s: &FlowStatus) -> String {
    format!(
        "flow {} ({}): {} {:.0}%\n{}",
        s.flow_id,
        s.name,
        flow_state(s.state),
        s.progress * 100.0,
        task_table(s)
    )
}

/// One row per task: state, attempt, agent, and its output or error.
pub(crate) fn task_table(s: &FlowStatus) -> String {
    let rows = s
        .tasks
        .iter()
        .map(|t| {
            let result = match &t.error {
                Some(e) => e.clone(),
                None if t.output.is_null() => String::new(),
                None => t.output.to_string(),
            };
            vec![
                t.task_id.to_string(),
                state_name(t.state).to_owned(),
                t.attempt.to_string(),
                t.agent_id
                    .as_ref()
                    .map(|a| a.to_string())
                    .unwrap_or_else(|| "-".into()),
                if t.state.is_terminal() {
                    "-".into()
                } else {
                    progress_text(t.progress, t.progress_message.as_deref())
                },
                truncate(&result, 60),
            ]
        })
        .collect();
    table(
        &["task", "state", "attempt", "agent", "progress", "result"],
        rows,
    )
}

/// `40% indexing`: the attempt's latest progress and message, `-` if none.
fn progress_text(progress: Option<f64>, message: Option<&str>) -> String {
    let text = match (progress, message) {
        (Some(p), Some(m)) => format!("{:.0}% {m}", p * 100.0),
        (Some(p), None) => format!("{:.0}%", p * 100.0),
        (None, Some(m)) => m.to_owned(),
        (None, None) => "-".into(),
    };
    truncate(&text, 30)
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut out: String = s.chars().take(max - 1).collect();
        out.push('…');
        out
    }
}

#[cfg(test)]
mod tests {
    use common::msg::{FlowBottleneck, FlowPlan, TaskExplanation, TaskState};
    use common::{FlowId, TaskId};

    use super::plan_text;

    #[test]
    fn a_plan_that_places_nothing_says_so_instead_of_a_makespan() {
        let plan = FlowPlan {
            flow_id: FlowId::new("f").unwrap(),
            revision: 3,
            critical_path: vec![TaskId::new("a").unwrap()],
            critical_path_ms: 2000,
            makespan_ms: 0,
            optimized_makespan_ms: 0,
            lower_bound_ms: 0,
            unplaceable: vec![TaskExplanation {
                task_id: TaskId::new("a").unwrap(),
                state: TaskState::Ready,
                reasons: vec!["no registered agent has it".into()],
            }],
            bottleneck: FlowBottleneck {
                kind: "unplaceable".into(),
                resource: None,
                bound_ms: 0,
                message: "nothing can be placed".into(),
            },
            resources: Default::default(),
            placements: vec![],
            priority_changes: vec![],
            applied: false,
            status: None,
        };
        let text = plan_text(&plan);
        assert!(
            text.contains("makespan: nothing can be placed now (1 tasks cannot run)"),
            "{text}"
        );
        assert!(!text.contains("0 ms now"), "{text}");
    }
}
