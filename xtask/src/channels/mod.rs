//! The protocol's table: every subject, who talks on it and with what
//! message. The schemas, the AsyncAPI document and the protocol page's subject
//! table are generated from it (see the crate's root). Here the agents' own
//! subjects and the helpers; the request endpoints and the events in their
//! modules.

mod events;
mod requests;

use common::msg::*;
use common::{subject, AgentId, FlowId, ScopeId};
use schemars::schema_for;

use crate::{Channel, Msg, Pattern};

const AGENT_PLACEHOLDER: &str = "AGENT_ID";
const SCOPE_PLACEHOLDER: &str = "SCOPE_ID";
const FLOW_PLACEHOLDER: &str = "FLOW_ID";
const EVENT_TYPE_PLACEHOLDER: &str = "event_type_placeholder";

/// An agent subject with the id left as the AsyncAPI parameter `{agent_id}`; built
/// by the real subject function so the address cannot drift from the code.
fn per_agent(f: fn(&AgentId) -> String) -> anyhow::Result<String> {
    let agent = AgentId::new(AGENT_PLACEHOLDER)?;
    Ok(f(&agent).replace(AGENT_PLACEHOLDER, "{agent_id}"))
}

/// A flow subject with the id left as the AsyncAPI parameter `{flow_id}`.
fn per_flow(f: fn(&FlowId) -> String) -> anyhow::Result<String> {
    let flow = FlowId::new(FLOW_PLACEHOLDER)?;
    Ok(f(&flow).replace(FLOW_PLACEHOLDER, "{flow_id}"))
}

fn per_scope_agent(f: fn(&ScopeId, &AgentId) -> String) -> anyhow::Result<String> {
    let agent = AgentId::new(AGENT_PLACEHOLDER)?;
    let scope = ScopeId::new(SCOPE_PLACEHOLDER)?;
    Ok(f(&scope, &agent)
        .replace(AGENT_PLACEHOLDER, "{agent_id}")
        .replace(SCOPE_PLACEHOLDER, "{scope}"))
}

/// An agent event subject with `{agent_id}` and `{event_type}` left as parameters.
fn per_agent_event(
    f: fn(&AgentId, &str) -> Result<String, common::Error>,
) -> anyhow::Result<String> {
    let agent = AgentId::new(AGENT_PLACEHOLDER)?;
    Ok(f(&agent, EVENT_TYPE_PLACEHOLDER)?
        .replace(AGENT_PLACEHOLDER, "{agent_id}")
        .replace(EVENT_TYPE_PLACEHOLDER, "{event_type}"))
}

/// Payload of the watch subjects: the stored state document itself, any JSON.
const STATE_DOCUMENT: Msg = Msg {
    name: "StateDocument",
    schema: || {
        schemars::json_schema!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": "StateDocument",
            "description": "An agent's state document exactly as stored; its revision is the `Nats-Sequence` header, and a deletion has `KV-Operation: DEL` and no body."
        })
    },
};

/// Payload of the NATS service API discovery subjects, defined by NATS (ADR-32), not coordkit.
const SERVICE_API: Msg = Msg {
    name: "NatsServiceApi",
    schema: || {
        schemars::json_schema!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": "NatsServiceApi",
            "description": "A NATS micro-service API request (empty) or response (ping, info or stats), as specified by NATS ADR-32.",
            "type": "object"
        })
    },
};

const ORCHESTRATOR: &str = "orchestrator";
const ALLOCATOR: &str = "allocator";
const SYNCHRONIZER: &str = "synchronizer";
const MONITOR: &str = "monitor";
pub(crate) const AGENT: &str = "agent";

fn request(server: &'static str, request: Msg, reply: Msg) -> Pattern {
    Pattern::Request {
        from: "any client",
        server,
        request,
        reply,
    }
}

/// A write naming its agent only in the JSON: an isolating server lets only
/// operators make it (agents use their own subjects, [`own_request`]).
fn operator_request(server: &'static str, request: Msg, reply: Msg) -> Pattern {
    Pattern::Request {
        from: "operators",
        server,
        request,
        reply,
    }
}

/// A request an agent makes about itself on its own subject: the server can
/// confine it there, and the service refuses a body naming another agent.
fn own_request(server: &'static str, request: Msg, reply: Msg) -> Pattern {
    Pattern::Request {
        from: "the agent itself, operators",
        server,
        request,
        reply,
    }
}

fn event(
    id: &'static str,
    source: &'static str,
    address: &str,
    from: &'static str,
    summary: &'static str,
) -> Channel {
    Channel {
        id,
        address: address.to_owned(),
        source,
        summary,
        pattern: Pattern::Publish {
            from,
            to: "any listener (monitor, orchestrator)",
            message: msg!(Event),
            jetstream: Some("COORD_EVENTS"),
        },
    }
}

/// Every subject coordkit uses: the single table the AsyncAPI document is generated from.
pub fn channels() -> anyhow::Result<Vec<Channel>> {
    let mut out = requests::requests()?;
    out.extend(agent_subjects()?);
    out.extend(events::events());
    Ok(out)
}

/// What agents publish and hear on their own subjects, besides requests.
fn agent_subjects() -> anyhow::Result<Vec<Channel>> {
    use Pattern::Publish;
    Ok(vec![
        Channel {
            id: "agentHeartbeat",
            address: per_agent(subject::heartbeat)?,
            source: "heartbeat",
            summary: "Every `heartbeat_interval_ms`; three missed and the agent is lost. With a reply subject, a `lost` agent is answered there with its `AgentInfo`: register again.",
            pattern: Publish { from: AGENT, to: ALLOCATOR, message: msg!(Heartbeat), jetstream: None },
        },
        Channel {
            id: "agentAssign",
            address: per_agent(subject::assign)?,
            source: "assign",
            summary: "Work for the agent: a plain subscription, nothing to ack; sent again until `started` is stored, so a repeat of an attempt held is ignored. Also the allocator's empty `Coord-Probe` message (ignore it).",
            pattern: Publish { from: ORCHESTRATOR, to: AGENT, message: msg!(Assignment), jetstream: None },
        },
        Channel {
            id: "agentReport",
            address: per_agent(subject::report)?,
            source: "report",
            summary: "Started, progress, completed or failed, per attempt; `Nats-Msg-Id` = `{flow}.{task}.{attempt}.{type}`. Or an array of up to 256 reports, under an id of its own (*5. Report*).",
            pattern: Publish { from: AGENT, to: ORCHESTRATOR, message: msg!(AgentReport), jetstream: Some("COORD_REPORTS") },
        },
        Channel {
            id: "flowWatch",
            address: per_flow(subject::flow_watch)?,
            source: "flow_watch",
            summary: "The flow's status (without the task list) after every change.",
            pattern: Publish { from: ORCHESTRATOR, to: "watchers", message: msg!(FlowStatus), jetstream: None },
        },
        Channel {
            id: "agentCancel",
            address: per_agent(subject::cancel)?,
            source: "cancel",
            summary: "The attempt was taken away (`code`: flow cancelled, timed out, agent lost or left, preempted, re-run, fail-fast): stop, send no final report.",
            pattern: Publish { from: ORCHESTRATOR, to: AGENT, message: msg!(CancelNotice), jetstream: None },
        },
        Channel {
            id: "agentRejected",
            address: per_agent(subject::rejected)?,
            source: "rejected",
            summary: "A report of the agent's, or an event it published without a reply subject, changed nothing: `code` and `reason` say why (malformed, out of range, fenced, unknown, schema violation).",
            pattern: Publish { from: "orchestrator, synchronizer", to: AGENT, message: msg!(ReportRejected), jetstream: None },
        },
        Channel {
            id: "agentSyncNotice",
            address: per_agent(subject::sync_notice)?,
            source: "sync_notice",
            summary: "Sync points, rollbacks and agreed state for the agent to apply and acknowledge.",
            pattern: Publish { from: SYNCHRONIZER, to: AGENT, message: msg!(SyncNotice), jetstream: None },
        },
        Channel {
            id: "agentSyncAck",
            address: per_agent(subject::sync_ack)?,
            source: "sync_ack",
            summary: "The agent acknowledges a notice (the agent is taken from the subject).",
            pattern: Publish { from: AGENT, to: SYNCHRONIZER, message: msg!(SyncAck), jetstream: None },
        },
        Channel {
            id: "agentEventStored",
            address: {
                let agent = AgentId::new(AGENT_PLACEHOLDER)?;
                subject::agent_event_stored(EVENT_TYPE_PLACEHOLDER, &agent)?
                    .replace(AGENT_PLACEHOLDER, "{agent_id}")
                    .replace(EVENT_TYPE_PLACEHOLDER, "{event_type}")
            },
            source: "agent_event_stored",
            summary: "An accepted agent event, stored once per `Nats-Msg-Id` `{agent_id}.{event_id}`; watch by subscribing, query with `coord.sync.events.list`.",
            pattern: Publish { from: SYNCHRONIZER, to: "any watcher (monitor, orchestrator)", message: msg!(AgentEvent), jetstream: Some("COORD_AGENT_EVENTS") },
        },
        Channel {
            id: "stateWatch",
            address: per_scope_agent(subject::state_watch)?,
            source: "state_watch",
            summary: "Every write to the state bucket, republished by the NATS server itself.",
            pattern: Publish { from: "nats-server (state bucket republish)", to: "any watcher", message: STATE_DOCUMENT, jetstream: None },
        },
    ])
}
