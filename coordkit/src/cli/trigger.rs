//! `coordctl trigger`: flows started by matching agent events.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use common::msg::Trigger;
use common::Error;

use super::{say, table, Ctx};

#[derive(Subcommand, Debug)]
pub(crate) enum TriggerCmd {
    /// Register (or replace) a trigger from a YAML or JSON file (`-` for
    /// stdin): `name`, `event_type`, optional `agent_id` and `match`
    /// (`{path, equals}`), and the `flow` to start for every matching event.
    Set { file: PathBuf },
    /// One trigger, as registered.
    Get { name: String },
    /// Every trigger.
    List,
    /// Remove a trigger; the flows it started run on.
    Delete { name: String },
}

pub(crate) async fn run(ctx: &Ctx, cmd: TriggerCmd) -> anyhow::Result<()> {
    let yaml = |t: &Trigger| serde_yaml::to_string(t).unwrap_or_default();
    match cmd {
        TriggerCmd::Set { file } => {
            let t = ctx.client.set_trigger(&read_trigger(&file)?).await?;
            ctx.emit(&t, |t| format!("trigger {} set", t.name));
        }
        TriggerCmd::Get { name } => {
            let t = ctx.client.get_trigger(&name).await?;
            ctx.emit(&t, yaml);
        }
        TriggerCmd::List => {
            let l = ctx.client.list_triggers().await?;
            ctx.emit(&l, |l| {
                let rows = l
                    .triggers
                    .iter()
                    .map(|t| {
                        vec![
                            t.name.clone(),
                            t.event_type.clone(),
                            t.agent_id
                                .as_ref()
                                .map_or_else(|| "*".to_owned(), |a| a.to_string()),
                            t.field
                                .as_ref()
                                .map_or_else(String::new, |m| format!("{} = {}", m.path, m.equals)),
                            format!("{} ({} tasks)", t.flow.name, t.flow.tasks.len()),
                        ]
                    })
                    .collect();
                table(&["NAME", "EVENT", "AGENT", "MATCH", "FLOW"], rows)
            });
        }
        TriggerCmd::Delete { name } => {
            let d = ctx.client.delete_trigger(&name).await?;
            if !ctx.json && !d.deleted {
                say(&format!("no trigger {name}"));
                return Ok(());
            }
            ctx.emit(&d, |d| format!("trigger {} deleted", d.name));
        }
    }
    Ok(())
}

/// A trigger from YAML or JSON; unknown fields are errors that name them.
fn read_trigger(file: &Path) -> Result<Trigger, Error> {
    let text = super::read_arg(&if file.as_os_str() == "-" {
        "-".to_owned()
    } else {
        format!("@{}", file.display())
    })?;
    serde_yaml::from_str(&text)
        .map_err(|e| Error::bad_request(format!("the trigger is not valid: {e}")))
}
