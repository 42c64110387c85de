//! `coordctl events`: the events agents published, listed and followed, and
//! the per-type schemas they are checked against.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use clap::{Args, Subcommand};
use common::msg::{
    AgentEvent, AgentEventQuery, AgentEventRecord, EventSchema, EventSchemaSet, FieldMatch,
};
use common::{subject, AgentId, Error};
use futures::StreamExt;

use super::{id, read_arg, say, table, Ctx};

#[derive(Subcommand, Debug)]
pub(crate) enum EventsCmd {
    /// Stored agent events, oldest first. With --output json, one event per
    /// line (with its stream `seq`).
    List {
        #[command(flatten)]
        filter: Filter,
        /// At most this many per page (the service's default is 100, its maximum 1,000).
        #[arg(long)]
        limit: Option<usize>,
        /// Start at this stream sequence (a previous page's next seq).
        #[arg(long)]
        from_seq: Option<u64>,
        /// Follow every page to the end instead of printing the first.
        #[arg(long)]
        all: bool,
    },
    /// Follow events as they are accepted (from --since, or from now), until
    /// Ctrl-C or --until. With --output json, one event per line.
    Watch {
        #[command(flatten)]
        filter: Filter,
    },
    /// Per-type JSON Schemas events are checked against; types without one
    /// are accepted as they come.
    #[command(subcommand)]
    Schema(SchemaCmd),
}

#[derive(Subcommand, Debug)]
pub(crate) enum SchemaCmd {
    /// Register a type's schema from JSON or YAML text, `@file` or `-` (stdin).
    Set { event_type: String, schema: String },
    /// Remove a type's schema.
    Remove { event_type: String },
    /// A type's registered schema.
    Get { event_type: String },
    /// Every registered schema.
    List,
}

/// The filters `list` and `watch` share; every one given must hold.
#[derive(Args, Debug, Clone)]
pub(crate) struct Filter {
    /// Only events of this type.
    #[arg(long = "type")]
    event_type: Option<String>,
    /// Only events of this agent.
    #[arg(long)]
    agent: Option<String>,
    /// Published at or after: ms since the epoch, or an age like 90s, 10m, 2h, 1d.
    #[arg(long, value_parser = parse_time)]
    since: Option<u64>,
    /// Published before: ms since the epoch, or an age like 10m.
    #[arg(long, value_parser = parse_time)]
    until: Option<u64>,
    /// `/pointer=value` (or `field=value`): `data` holds `value` (JSON, or else
    /// a string) at that JSON Pointer.
    #[arg(long = "match", value_parser = parse_match)]
    field: Option<FieldMatch>,
}

impl Filter {
    fn query(&self) -> Result<AgentEventQuery, Error> {
        Ok(AgentEventQuery {
            event_type: self.event_type.clone(),
            agent_id: self.agent.as_deref().map(id::<AgentId>).transpose()?,
            since_ms: self.since,
            until_ms: self.until,
            field: self.field.clone(),
            ..Default::default()
        })
    }
}

/// A time from the command line: ms since the epoch, or an age before now.
fn parse_time(s: &str) -> Result<u64, String> {
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(ms);
    }
    let unit = s
        .char_indices()
        .last()
        .map(|(i, _)| i)
        .ok_or("empty time")?;
    let (n, u) = s.split_at(unit);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("`{s}` is neither ms since the epoch nor an age like 10m"))?;
    let ms = match u {
        "s" => n * 1_000,
        "m" => n * 60_000,
        "h" => n * 3_600_000,
        "d" => n * 86_400_000,
        _ => return Err(format!("`{s}`: an age ends in s, m, h or d")),
    };
    Ok(common::now_ms().saturating_sub(ms))
}

/// `/pointer=value` or `field=value`; the value is JSON if it parses, else a string.
fn parse_match(s: &str) -> Result<FieldMatch, String> {
    let (path, value) = s
        .split_once('=')
        .ok_or_else(|| format!("expected /pointer=value, got `{s}`"))?;
    let path = if path.starts_with('/') || path.is_empty() {
        path.to_owned()
    } else {
        format!("/{path}")
    };
    let equals =
        serde_json::from_str(value).unwrap_or_else(|_| serde_json::Value::String(value.to_owned()));
    Ok(FieldMatch { path, equals })
}

pub(crate) async fn run(ctx: &Ctx, cmd: EventsCmd) -> anyhow::Result<()> {
    match cmd {
        EventsCmd::List {
            filter,
            limit,
            from_seq,
            all,
        } => {
            let mut q = AgentEventQuery {
                limit,
                from_seq,
                ..filter.query()?
            };
            let mut rows = Vec::new();
            loop {
                let page = ctx.client.list_events(&q).await?;
                for r in &page.events {
                    if ctx.json {
                        say(&serde_json::to_string(r)?);
                    } else {
                        rows.push(row(r));
                    }
                }
                match page.next_seq {
                    Some(next) if all => q.from_seq = Some(next),
                    Some(next) => {
                        eprintln!("more: --from-seq {next}");
                        break;
                    }
                    None => break,
                }
            }
            if !ctx.json {
                say(&table(
                    &["seq", "published", "type", "agent", "event id", "data"],
                    rows,
                ));
            }
        }
        EventsCmd::Watch { filter } => watch(ctx, filter).await?,
        EventsCmd::Schema(cmd) => schema(ctx, cmd).await?,
    }
    Ok(())
}

fn row(r: &AgentEventRecord) -> Vec<String> {
    let e = &r.event;
    let mut data = e.data.to_string();
    if data.chars().count() > 60 {
        data = data.chars().take(57).collect::<String>() + "...";
    }
    vec![
        r.seq.to_string(),
        e.published_ms.to_string(),
        e.event_type.clone(),
        e.agent_id.to_string(),
        e.event_id.clone(),
        data,
    ]
}

/// Follows the stream through an ordered consumer from `--since` (or now),
/// so what is stored meanwhile is neither missed nor shown twice.
async fn watch(ctx: &Ctx, filter: Filter) -> anyhow::Result<()> {
    let q = filter.query()?;
    let query_check = q.clone();
    let js = jetstream::new(ctx.client.nats().clone());
    let stream = js
        .get_stream(common::nats::STREAM_AGENT_EVENTS)
        .await
        .map_err(|e| Error::unavailable("agent events stream", e))?;
    let deliver_policy = match q.since_ms {
        Some(ms) => consumer::DeliverPolicy::ByStartTime {
            start_time: time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
                .map_err(|e| Error::bad_request(format!("--since: {e}")))?,
        },
        None => consumer::DeliverPolicy::New,
    };
    let filter_subject =
        subject::agent_events_filter(q.event_type.as_deref(), q.agent_id.as_ref())?;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject,
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(|e| Error::unavailable("agent events consumer", e))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| Error::unavailable("agent events", e))?;
    let mut shutdown = std::pin::pin!(common::shutdown::signal());
    if !ctx.json {
        say(&table(
            &["seq", "published", "type", "agent", "event id", "data"],
            Vec::new(),
        ));
    }
    loop {
        let next = tokio::select! {
            m = messages.next() => m,
            _ = &mut shutdown => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(500)), if q.until_ms.is_some() => {
                if q.until_ms.is_some_and(|u| common::now_ms() >= u) { return Ok(()) }
                continue;
            }
        };
        let Some(m) = next else { return Ok(()) };
        let m = m.map_err(|e| Error::unavailable("agent events", e))?;
        let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
        let Ok(event) = serde_json::from_slice::<AgentEvent>(&m.payload) else {
            continue;
        };
        if query_check
            .until_ms
            .is_some_and(|u| event.published_ms >= u)
        {
            return Ok(());
        }
        if !keeps(&query_check, &event) {
            continue;
        }
        let r = AgentEventRecord { seq, event };
        if ctx.json {
            say(&serde_json::to_string(&r)?);
        } else {
            let line = table(&["", "", "", "", "", ""], vec![row(&r)]);
            say(line.lines().last().unwrap_or_default());
        }
    }
}

/// The filters the consumer's subject does not narrow.
fn keeps(q: &AgentEventQuery, e: &AgentEvent) -> bool {
    q.since_ms.is_none_or(|s| e.published_ms >= s)
        && q.field
            .as_ref()
            .is_none_or(|m| e.data.pointer(&m.path) == Some(&m.equals))
}

async fn schema(ctx: &Ctx, cmd: SchemaCmd) -> anyhow::Result<()> {
    let text = |s: &EventSchema| {
        format!(
            "{}: {}",
            s.event_type,
            s.schema
                .as_ref()
                .map(|v| v.to_string())
                .unwrap_or_else(|| "(none: accepted as they come)".into())
        )
    };
    match cmd {
        SchemaCmd::Set { event_type, schema } => {
            let schema: serde_json::Value = serde_yaml::from_str(&read_arg(&schema)?)
                .map_err(|e| Error::bad_request(format!("the schema is not JSON or YAML: {e}")))?;
            let s = ctx
                .client
                .event_schema_set(&EventSchemaSet {
                    event_type,
                    schema: Some(schema),
                })
                .await?;
            ctx.emit(&s, text);
        }
        SchemaCmd::Remove { event_type } => {
            let s = ctx
                .client
                .event_schema_set(&EventSchemaSet {
                    event_type,
                    schema: None,
                })
                .await?;
            ctx.emit(&s, text);
        }
        SchemaCmd::Get { event_type } => {
            let s = ctx.client.event_schema_get(&event_type).await?;
            ctx.emit(&s, text);
        }
        SchemaCmd::List => {
            let l = ctx.client.event_schema_list().await?;
            ctx.emit(&l, |l| {
                l.schemas.iter().map(text).collect::<Vec<_>>().join("\n")
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_and_times_parse() {
        let m = parse_match("approved=true").unwrap();
        assert_eq!(
            (m.path.as_str(), m.equals),
            ("/approved", serde_json::json!(true))
        );
        let m = parse_match("/by/name=ann").unwrap();
        assert_eq!(
            (m.path.as_str(), m.equals),
            ("/by/name", serde_json::json!("ann"))
        );
        assert!(parse_match("nothing").is_err());
        assert_eq!(parse_time("1234").unwrap(), 1234);
        let ago = parse_time("10m").unwrap();
        assert!(common::now_ms() - ago >= 600_000);
        assert!(parse_time("10y").is_err());
    }
}
