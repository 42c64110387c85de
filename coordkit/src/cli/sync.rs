//! `coordctl state|scope|validate|synchronize|syncpoint …`: the synchronizer's operations.

use clap::{Args, Subcommand};
use common::msg::{
    ScopeConfig, StateDelete, StateGet, StateHistoryRequest, StatePut, SyncPointInitiate,
    SyncPointListRequest, SyncPointState, SyncPointWait, SynchronizeRequest, ValidateRequest,
    ValidationReport,
};
use common::{AgentId, Error, ScopeId, SyncPointId};

use super::{id, parse_wire, read_arg, read_json, table, wire_name, Ctx, Negative};

#[derive(Subcommand, Debug)]
pub(crate) enum StateCmd {
    /// An agent's document and its revision (latest, or at --revision).
    Get {
        agent_id: String,
        #[arg(long)]
        scope: Option<String>,
        #[arg(long)]
        revision: Option<u64>,
    },
    /// Store a document made from --revision (0 to create); the scope's policy
    /// decides what happens when that is not the current revision.
    Put {
        agent_id: String,
        /// The revision the document was made from; 0 creates.
        #[arg(long)]
        revision: u64,
        /// The document: JSON text, @file, or - for stdin.
        doc: String,
        #[arg(long)]
        scope: Option<String>,
    },
    /// Follow a document live: one line per write or deletion, until Ctrl-C
    /// (`--output json`: one JSON object per line).
    Watch {
        agent_id: String,
        #[arg(long)]
        scope: Option<String>,
    },
    /// The kept revisions of a document, oldest first.
    History {
        agent_id: String,
        #[arg(long)]
        scope: Option<String>,
    },
    /// Delete a document (only at --revision, when given).
    Delete {
        agent_id: String,
        #[arg(long)]
        scope: Option<String>,
        #[arg(long)]
        revision: Option<u64>,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum ScopeCmd {
    /// A scope's configuration (defaults when never set).
    Get { scope: String },
    /// Configure a scope from a YAML or JSON file (`-` reads stdin): `scope`, `policy`,
    /// `merge_fallback`, `schema`, `enforce_schema` (refuse puts the schema
    /// does not allow), `invariants`, `shared`.
    Set { file: String },
}

#[derive(Args, Debug)]
pub(crate) struct ValidateArgs {
    #[arg(long)]
    scope: Option<String>,
    /// Only these agents (repeatable; default: every document in the scope).
    #[arg(long = "agent")]
    agents: Vec<String>,
}

#[derive(Args, Debug)]
pub(crate) struct SynchronizeArgs {
    #[arg(long)]
    scope: Option<String>,
    /// A participant (repeatable).
    #[arg(long = "agent", required = true)]
    agents: Vec<String>,
    /// A JSON Pointer to agree on besides the scope's own (repeatable).
    #[arg(long)]
    shared: Vec<String>,
    /// How long each agent has to acknowledge, in ms.
    #[arg(long, default_value_t = common::msg::default_ack_timeout_ms())]
    timeout_ms: u64,
}

#[derive(Subcommand, Debug)]
pub(crate) enum SyncpointCmd {
    /// Take a consistent cut of the participants' documents and notify them.
    Create {
        /// A participant (repeatable); each must have a document in the scope.
        #[arg(long = "agent", required = true)]
        agents: Vec<String>,
        #[arg(long)]
        scope: Option<String>,
        #[arg(long, default_value = "")]
        label: String,
    },
    /// Wait for every participant's acknowledgement; records completed or incomplete
    /// (exit status 3).
    Complete {
        sync_point_id: String,
        #[arg(long, default_value_t = common::msg::default_ack_timeout_ms())]
        timeout_ms: u64,
    },
    /// Write the cut back as new revisions, verify, and notify the participants.
    Rollback {
        sync_point_id: String,
        #[arg(long, default_value_t = common::msg::default_ack_timeout_ms())]
        timeout_ms: u64,
    },
    /// Sync points, optionally of one scope or in one state (initiated, completed, incomplete).
    List {
        #[arg(long)]
        scope: Option<String>,
        #[arg(long, value_parser = parse_wire::<SyncPointState>)]
        state: Option<SyncPointState>,
    },
    /// One sync point.
    Show { sync_point_id: String },
    /// What changed in each participant's document since the cut.
    Diff { sync_point_id: String },
}

fn scope(s: Option<&str>) -> Result<ScopeId, Error> {
    s.map(id::<ScopeId>)
        .transpose()
        .map(Option::unwrap_or_default)
}

fn agents(v: &[String]) -> Result<Vec<AgentId>, Error> {
    v.iter().map(|a| id::<AgentId>(a)).collect()
}

pub(crate) async fn run_state(ctx: &Ctx, cmd: StateCmd) -> anyhow::Result<()> {
    let c = &ctx.client;
    match cmd {
        StateCmd::Get {
            agent_id,
            scope: s,
            revision,
        } => {
            let doc = c
                .state_get_at(&StateGet {
                    agent_id: id(&agent_id)?,
                    scope: scope(s.as_deref())?,
                    revision,
                })
                .await?;
            ctx.emit(&doc, |d| format!("revision {}: {}", d.revision, d.doc));
        }
        StateCmd::Put {
            agent_id,
            revision,
            doc,
            scope: s,
        } => {
            let stored = c
                .state_put(&StatePut {
                    agent_id: id(&agent_id)?,
                    expected_revision: revision,
                    doc: read_json(&doc)?,
                    scope: scope(s.as_deref())?,
                    clock: None,
                })
                .await?;
            ctx.emit(&stored, |d| match &d.resolution {
                Some(r) => format!(
                    "stored at revision {} ({} by policy {})",
                    d.revision,
                    wire_name(&r.outcome),
                    wire_name(&r.policy)
                ),
                None => format!("stored at revision {}", d.revision),
            });
        }
        StateCmd::Watch { agent_id, scope: s } => {
            watch_state(ctx, &id(&agent_id)?, &scope(s.as_deref())?).await?;
        }
        StateCmd::History { agent_id, scope: s } => {
            let h = c
                .state_history(&StateHistoryRequest {
                    agent_id: id(&agent_id)?,
                    scope: scope(s.as_deref())?,
                })
                .await?;
            ctx.emit(&h, |h| {
                let rows = h
                    .entries
                    .iter()
                    .map(|e| {
                        vec![
                            e.revision.to_string(),
                            if e.deleted {
                                "deleted".into()
                            } else {
                                e.doc.to_string()
                            },
                        ]
                    })
                    .collect();
                table(&["revision", "document"], rows)
            });
        }
        StateCmd::Delete {
            agent_id,
            scope: s,
            revision,
        } => {
            let d = c
                .state_delete(&StateDelete {
                    agent_id: id(&agent_id)?,
                    scope: scope(s.as_deref())?,
                    expected_revision: revision,
                })
                .await?;
            ctx.emit(&d, |d| format!("deleted: {}", d.deleted));
        }
    }
    Ok(())
}

pub(crate) async fn run_scope(ctx: &Ctx, cmd: ScopeCmd) -> anyhow::Result<()> {
    let cfg = match cmd {
        ScopeCmd::Get { scope: s } => ctx.client.scope_get(&id(&s)?).await?,
        ScopeCmd::Set { file } => {
            let arg = if file == "-" {
                file
            } else {
                format!("@{file}")
            };
            let cfg: ScopeConfig = serde_yaml::from_str(&read_arg(&arg)?)
                .map_err(|e| Error::bad_request(format!("the scope config is not valid: {e}")))?;
            ctx.client.scope_set(&cfg).await?
        }
    };
    ctx.emit(&cfg, |c| serde_yaml::to_string(c).unwrap_or_default());
    Ok(())
}

fn validation_text(r: &ValidationReport) -> String {
    let mut out = format!(
        "scope {}: {} ({} documents checked)",
        r.scope,
        if r.valid { "valid" } else { "INVALID" },
        r.checked.len()
    );
    if !r.violations.is_empty() {
        let rows = r
            .violations
            .iter()
            .map(|v| {
                vec![
                    v.agent
                        .as_ref()
                        .map(|a| a.to_string())
                        .unwrap_or_else(|| "-".into()),
                    v.pointer.clone(),
                    v.rule.clone(),
                    v.message.clone(),
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&table(&["agent", "pointer", "rule", "message"], rows));
    }
    out
}

pub(crate) async fn run_validate(ctx: &Ctx, args: ValidateArgs) -> anyhow::Result<()> {
    let report = ctx
        .client
        .validate_states(&ValidateRequest {
            scope: scope(args.scope.as_deref())?,
            agents: agents(&args.agents)?,
        })
        .await?;
    ctx.emit(&report, validation_text);
    if !report.valid {
        return Err(Negative(format!("scope {} is invalid", report.scope)).into());
    }
    Ok(())
}

pub(crate) async fn run_synchronize(ctx: &Ctx, args: SynchronizeArgs) -> anyhow::Result<()> {
    let report = ctx
        .client
        .synchronize(&SynchronizeRequest {
            scope: scope(args.scope.as_deref())?,
            agents: agents(&args.agents)?,
            shared: args.shared,
            timeout_ms: args.timeout_ms,
        })
        .await?;
    ctx.emit(&report, |r| {
        let rows = r
            .agents
            .iter()
            .map(|a| {
                vec![
                    a.agent_id.to_string(),
                    a.revision.to_string(),
                    a.acked.to_string(),
                    a.error.as_ref().map(|e| e.to_string()).unwrap_or_default(),
                ]
            })
            .collect();
        format!(
            "round {} in scope {}: {} divergences, complete: {}\n{}\n{}",
            r.round_id,
            r.scope,
            r.divergences.len(),
            r.complete,
            table(&["agent", "revision", "acked", "error"], rows),
            validation_text(&r.validation)
        )
    });
    if !report.complete {
        return Err(Negative(format!("round {} is incomplete", report.round_id)).into());
    }
    if !report.validation.valid {
        return Err(Negative(format!("scope {} is invalid", report.scope)).into());
    }
    Ok(())
}

fn sync_point_text(p: &common::msg::SyncPoint) -> String {
    let rows = p
        .cut
        .iter()
        .map(|(a, rev)| {
            vec![
                a.to_string(),
                rev.to_string(),
                p.acked
                    .get(a)
                    .map(|r| r.to_string())
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let mut out = format!(
        "sync point {} ({}) in scope {}: {}\n{}",
        p.id,
        p.label,
        p.scope,
        wire_name(&p.state),
        table(&["agent", "cut revision", "acked at ms"], rows)
    );
    if !p.missing.is_empty() {
        out.push_str(&format!(
            "\nmissing: {}",
            p.missing
                .iter()
                .map(|a| a.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    out
}

pub(crate) async fn run_syncpoint(ctx: &Ctx, cmd: SyncpointCmd) -> anyhow::Result<()> {
    let c = &ctx.client;
    match cmd {
        SyncpointCmd::Create {
            agents: a,
            scope: s,
            label,
        } => {
            let p = c
                .syncpoint_initiate(&SyncPointInitiate {
                    scope: scope(s.as_deref())?,
                    agents: agents(&a)?,
                    label,
                })
                .await?;
            ctx.emit(&p, sync_point_text);
        }
        SyncpointCmd::Complete {
            sync_point_id,
            timeout_ms,
        } => {
            let p = c
                .syncpoint_complete(&SyncPointWait {
                    sync_point_id: id(&sync_point_id)?,
                    timeout_ms,
                })
                .await?;
            ctx.emit(&p, sync_point_text);
            if p.state != SyncPointState::Completed {
                return Err(
                    Negative(format!("sync point {} is {}", p.id, wire_name(&p.state))).into(),
                );
            }
        }
        SyncpointCmd::Rollback {
            sync_point_id,
            timeout_ms,
        } => {
            let r = c
                .syncpoint_rollback(&SyncPointWait {
                    sync_point_id: id(&sync_point_id)?,
                    timeout_ms,
                })
                .await?;
            ctx.emit(&r, |r| {
                let rows = r
                    .agents
                    .iter()
                    .map(|a| {
                        vec![
                            a.agent_id.to_string(),
                            a.revision.to_string(),
                            a.acked.to_string(),
                        ]
                    })
                    .collect();
                format!(
                    "rolled back {} (notice {}): verified {}\n{}",
                    r.sync_point_id,
                    r.notice_id,
                    r.verified,
                    table(&["agent", "revision", "acked"], rows)
                )
            });
            if !r.verified {
                return Err(Negative(format!(
                    "the rollback of {} is not verified",
                    r.sync_point_id
                ))
                .into());
            }
        }
        SyncpointCmd::List { scope: s, state } => {
            let list = c
                .syncpoint_list(&SyncPointListRequest {
                    scope: s.as_deref().map(id::<ScopeId>).transpose()?,
                    state,
                })
                .await?;
            ctx.emit(&list, |l| {
                let rows = l
                    .sync_points
                    .iter()
                    .map(|p| {
                        vec![
                            p.id.to_string(),
                            p.scope.to_string(),
                            wire_name(&p.state),
                            p.participants.to_string(),
                            p.rollbacks.to_string(),
                            p.label.clone(),
                        ]
                    })
                    .collect();
                table(
                    &[
                        "sync point",
                        "scope",
                        "state",
                        "participants",
                        "rollbacks",
                        "label",
                    ],
                    rows,
                )
            });
        }
        SyncpointCmd::Show { sync_point_id } => {
            let p = c.syncpoint_get(&id::<SyncPointId>(&sync_point_id)?).await?;
            ctx.emit(&p, sync_point_text);
        }
        SyncpointCmd::Diff { sync_point_id } => {
            let d = c
                .syncpoint_diff(&id::<SyncPointId>(&sync_point_id)?)
                .await?;
            ctx.emit(&d, |d| {
                let rows = d
                    .agents
                    .iter()
                    .flat_map(|a| {
                        a.changes.iter().map(move |ch| {
                            vec![
                                a.agent_id.to_string(),
                                ch.pointer.clone(),
                                wire_name(&ch.op),
                                ch.before
                                    .as_ref()
                                    .map(|v| v.to_string())
                                    .unwrap_or_default(),
                                ch.after.as_ref().map(|v| v.to_string()).unwrap_or_default(),
                            ]
                        })
                    })
                    .collect();
                if d.unchanged {
                    format!("{}: nothing changed since the cut", d.sync_point_id)
                } else {
                    table(&["agent", "pointer", "op", "before", "after"], rows)
                }
            });
        }
    }
    Ok(())
}

/// Prints every write the server republishes for the document until Ctrl-C.
/// The republish carries the revision in `Nats-Sequence` and marks a deletion
/// with `KV-Operation: DEL` (or `PURGE`) and an empty body.
async fn watch_state(ctx: &Ctx, agent: &AgentId, scope: &ScopeId) -> anyhow::Result<()> {
    use futures::StreamExt;
    let nats = ctx.client.nats();
    let mut writes = nats
        .subscribe(common::subject::state_watch(scope, agent))
        .await?;
    // Subscribed first, then the current document: no write falls between.
    nats.flush().await?;
    let mut last = 0;
    let current = ctx
        .client
        .state_get_at(&StateGet {
            agent_id: agent.clone(),
            scope: scope.clone(),
            revision: None,
        })
        .await;
    match current {
        Ok(d) => {
            last = d.revision;
            print_write(ctx, agent, scope, Some(d.revision), false, d.doc);
        }
        Err(e) if e.code == common::ErrorCode::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    loop {
        let msg = tokio::select! {
            msg = writes.next() => match msg {
                Some(msg) => msg,
                None => return Ok(()),
            },
            _ = &mut stop => return Ok(()),
        };
        let header = |name: &str| {
            msg.headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
        };
        let revision: Option<u64> = header("Nats-Sequence").and_then(|v| v.parse().ok());
        let deleted = header("KV-Operation").is_some_and(|op| op == "DEL" || op == "PURGE");
        if revision.is_some_and(|r| r <= last) {
            continue;
        }
        let doc: serde_json::Value = if deleted {
            serde_json::Value::Null
        } else {
            match serde_json::from_slice::<serde_json::Value>(&msg.payload) {
                // The stored record wraps the document with its clock.
                Ok(mut v) => match v.get_mut("doc") {
                    Some(d) => d.take(),
                    None => v,
                },
                Err(_) => {
                    serde_json::Value::String(String::from_utf8_lossy(&msg.payload).into_owned())
                }
            }
        };
        print_write(ctx, agent, scope, revision, deleted, doc);
    }
}

/// One line for one revision of the document (`doc` is null when deleted).
fn print_write(
    ctx: &Ctx,
    agent: &AgentId,
    scope: &ScopeId,
    revision: Option<u64>,
    deleted: bool,
    doc: serde_json::Value,
) {
    let rev = revision.map_or_else(|| "?".to_owned(), |r| r.to_string());
    if ctx.json {
        let line = serde_json::json!({
            "agent_id": agent,
            "scope": scope,
            "revision": revision,
            "deleted": deleted,
            "doc": doc,
        });
        super::say(&line.to_string());
    } else if deleted {
        super::say(&format!("revision {rev}: deleted"));
    } else {
        super::say(&format!("revision {rev}: {doc}"));
    }
}
