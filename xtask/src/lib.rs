//! The wire protocol as generated artefacts: one JSON Schema per message type and an
//! AsyncAPI 3 document, both written to `schemas/` and checked in.
//!
//! Everything comes from one table, [`channels`], so the documentation cannot list a
//! subject the code does not use or miss one it does: the drift test regenerates the
//! files in memory and compares them with the checked-in ones, and a coverage test
//! checks that every subject defined in `common::subject` has a row here.

pub mod tidy;

use std::collections::BTreeMap;

use anyhow::Context;
use common::error::ErrorBody;
use common::msg::*;
use common::{subject, AgentId, FlowId, ScopeId};
use schemars::{schema_for, Schema};

/// Folder (relative to the workspace root) the artefacts live in.
pub const SCHEMA_DIR: &str = "schemas";
/// The AsyncAPI document's file name inside [`SCHEMA_DIR`].
pub const ASYNCAPI_FILE: &str = "asyncapi.yaml";

/// A message type and the JSON Schema derived from its Rust type.
#[derive(Clone, Copy)]
pub struct Msg {
    pub name: &'static str,
    schema: fn() -> Schema,
}

impl Msg {
    pub fn schema(&self) -> Schema {
        (self.schema)()
    }

    pub fn file(&self) -> String {
        format!("{}.json", self.name)
    }
}

/// A wire type by its Rust name; the name is the schema's file name.
macro_rules! msg {
    ($t:ident) => {
        Msg {
            name: stringify!($t),
            schema: || schema_for!($t),
        }
    };
}

/// Who talks on a subject, and how.
#[derive(Clone, Copy)]
pub enum Pattern {
    /// A request/reply endpoint served by `server` to `from`; every failure
    /// reply is an [`ErrorBody`].
    Request {
        from: &'static str,
        server: &'static str,
        request: Msg,
        reply: Msg,
    },
    /// A one-way message from `from` to `to`; `jetstream` when it is stored in a stream.
    Publish {
        from: &'static str,
        to: &'static str,
        message: Msg,
        jetstream: Option<&'static str>,
    },
}

/// One subject of the protocol.
pub struct Channel {
    /// The AsyncAPI channel and operation id.
    pub id: &'static str,
    /// The subject, with `{agent_id}` / `{scope}` where a parameter goes.
    pub address: String,
    /// The constant or function in `common::subject` that builds the subject.
    pub source: &'static str,
    pub summary: &'static str,
    pub pattern: Pattern,
}

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
const AGENT: &str = "agent";

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
    use Pattern::Publish;
    let req = |id, source, address: &str, summary, pattern| Channel {
        id,
        address: address.to_owned(),
        source,
        summary,
        pattern,
    };
    let mut out = vec![
        // Orchestrator.
        req(
            "flowCreate",
            "FLOW_CREATE",
            subject::FLOW_CREATE,
            "Submit a flow.",
            request(ORCHESTRATOR, msg!(FlowSpec), msg!(FlowStatus)),
        ),
        req(
            "flowGet",
            "FLOW_GET",
            subject::FLOW_GET,
            "A flow's spec, with its id.",
            request(ORCHESTRATOR, msg!(FlowRef), msg!(FlowSpec)),
        ),
        req(
            "flowStatus",
            "FLOW_STATUS",
            subject::FLOW_STATUS,
            "A flow's state and every task's.",
            request(ORCHESTRATOR, msg!(FlowRef), msg!(FlowStatus)),
        ),
        req(
            "flowList",
            "FLOW_LIST",
            subject::FLOW_LIST,
            "Every flow, optionally in one state.",
            request(ORCHESTRATOR, msg!(FlowListRequest), msg!(FlowList)),
        ),
        req(
            "flowPause",
            "FLOW_PAUSE",
            subject::FLOW_PAUSE,
            "Stop starting tasks; running ones finish.",
            request(ORCHESTRATOR, msg!(FlowRef), msg!(FlowStatus)),
        ),
        req(
            "flowResume",
            "FLOW_RESUME",
            subject::FLOW_RESUME,
            "Start tasks again.",
            request(ORCHESTRATOR, msg!(FlowRef), msg!(FlowStatus)),
        ),
        req(
            "flowCancel",
            "FLOW_CANCEL",
            subject::FLOW_CANCEL,
            "Cancel a flow: agents are told, allocations released.",
            request(ORCHESTRATOR, msg!(FlowRef), msg!(FlowStatus)),
        ),
        req(
            "flowModify",
            "FLOW_MODIFY",
            subject::FLOW_MODIFY,
            "Change a flow that has not finished, against the revision read; all or nothing.",
            request(ORCHESTRATOR, msg!(FlowChanges), msg!(FlowStatus)),
        ),
        req(
            "flowRerun",
            "FLOW_RERUN",
            subject::FLOW_RERUN,
            "Run a finished task and everything downstream of it again.",
            request(ORCHESTRATOR, msg!(RerunRequest), msg!(FlowStatus)),
        ),
        req(
            "flowExplain",
            "FLOW_EXPLAIN",
            subject::FLOW_EXPLAIN,
            "Every reason each unfinished task is where it is.",
            request(ORCHESTRATOR, msg!(ExplainRequest), msg!(Explanation)),
        ),
        req(
            "flowOptimize",
            "FLOW_OPTIMIZE",
            subject::FLOW_OPTIMIZE,
            "A plan for the remaining tasks; applied as new priorities on request.",
            request(ORCHESTRATOR, msg!(FlowOptimizeRequest), msg!(FlowPlan)),
        ),
        req(
            "triggerSet",
            "TRIGGER_SET",
            subject::TRIGGER_SET,
            "Register or replace a trigger: a flow started once per matching agent event.",
            request(ORCHESTRATOR, msg!(Trigger), msg!(Trigger)),
        ),
        req(
            "triggerGet",
            "TRIGGER_GET",
            subject::TRIGGER_GET,
            "One trigger, by name.",
            request(ORCHESTRATOR, msg!(TriggerRef), msg!(Trigger)),
        ),
        req(
            "triggerList",
            "TRIGGER_LIST",
            subject::TRIGGER_LIST,
            "Every trigger.",
            request(ORCHESTRATOR, msg!(TriggerListRequest), msg!(TriggerList)),
        ),
        req(
            "triggerDelete",
            "TRIGGER_DELETE",
            subject::TRIGGER_DELETE,
            "Remove a trigger; the flows it started run on.",
            request(ORCHESTRATOR, msg!(TriggerRef), msg!(TriggerDeleted)),
        ),
        req(
            "allocationsHeld",
            "ALLOCATIONS_HELD",
            subject::ALLOCATIONS_HELD,
            "Which of these allocations their flow tasks still hold (asked by the allocator's reconciliation).",
            request(ORCHESTRATOR, msg!(HeldRequest), msg!(HeldReply)),
        ),
        // Allocator.
        req(
            "agentRegister",
            "AGENT_REGISTER",
            subject::AGENT_REGISTER,
            "An agent joins (or re-joins) with its capabilities and capacity; an agent itself uses its own subject.",
            operator_request(ALLOCATOR, msg!(RegisterAgent), msg!(AgentInfo)),
        ),
        req(
            "agentDeregister",
            "AGENT_DEREGISTER",
            subject::AGENT_DEREGISTER,
            "An agent leaves: it drains, keeping its allocations; an agent itself uses its own subject.",
            operator_request(ALLOCATOR, msg!(DeregisterAgent), msg!(AgentInfo)),
        ),
        req(
            "agentOwnRegister",
            "agent_register",
            &per_agent(subject::agent_register)?,
            "The agent joins (or re-joins) on its own subject; a body naming another agent is `forbidden`.",
            own_request(ALLOCATOR, msg!(RegisterAgent), msg!(AgentInfo)),
        ),
        req(
            "agentOwnDeregister",
            "agent_deregister",
            &per_agent(subject::agent_deregister)?,
            "The agent drains on its own subject: no new placements; it keeps its allocations.",
            own_request(ALLOCATOR, msg!(DeregisterAgent), msg!(AgentInfo)),
        ),
        req(
            "agentOwnLeave",
            "agent_leave",
            &per_agent(subject::agent_leave)?,
            "The agent is done: status `left`; what it still held is handed back. Also on start, before registering: what an earlier run held is handed back.",
            own_request(ALLOCATOR, msg!(LeaveAgent), msg!(AgentInfo)),
        ),
        req(
            "allocate",
            "ALLOCATE",
            subject::ALLOCATE,
            "Place one requirement on an agent.",
            request(ALLOCATOR, msg!(AllocateRequest), msg!(Allocation)),
        ),
        req(
            "allocateGang",
            "ALLOCATE_GANG",
            subject::ALLOCATE_GANG,
            "Place several requirements all-or-nothing.",
            request(ALLOCATOR, msg!(GangRequest), msg!(GangReply)),
        ),
        req(
            "release",
            "RELEASE",
            subject::RELEASE,
            "Release an allocation (idempotent).",
            request(ALLOCATOR, msg!(ReleaseRequest), msg!(ReleaseReply)),
        ),
        req(
            "renew",
            "RENEW",
            subject::RENEW,
            "Extend an allocation's lease (`ttl_ms`); unrenewed, it is taken back.",
            request(ALLOCATOR, msg!(RenewRequest), msg!(Allocation)),
        ),
        req(
            "capacityCheck",
            "CAPACITY_CHECK",
            subject::CAPACITY_CHECK,
            "Capacity per resource, agent and label; whether a requirement fits.",
            request(ALLOCATOR, msg!(CapacityRequest), msg!(CapacityStatus)),
        ),
        req(
            "capacityReserve",
            "CAPACITY_RESERVE",
            subject::CAPACITY_RESERVE,
            "Hold capacity for an owner over a time window.",
            request(ALLOCATOR, msg!(ReserveRequest), msg!(Reservation)),
        ),
        req(
            "reservationCancel",
            "RESERVATION_CANCEL",
            subject::RESERVATION_CANCEL,
            "Cancel a reservation (idempotent).",
            request(ALLOCATOR, msg!(CancelReservation), msg!(CancelReply)),
        ),
        req(
            "capacityAdjust",
            "CAPACITY_ADJUST",
            subject::CAPACITY_ADJUST,
            "Change an agent's capacity, optionally preempting.",
            request(ALLOCATOR, msg!(AdjustRequest), msg!(AdjustReply)),
        ),
        req(
            "quotaSet",
            "QUOTA_SET",
            subject::QUOTA_SET,
            "Set, change or clear an owner's quota, optionally preempting.",
            request(ALLOCATOR, msg!(QuotaRequest), msg!(QuotaReply)),
        ),
        req(
            "optimize",
            "OPTIMIZE",
            subject::OPTIMIZE,
            "Plan (and optionally apply) moves of movable allocations.",
            request(ALLOCATOR, msg!(OptimizeRequest), msg!(OptimizePlan)),
        ),
        // Synchronizer.
        req(
            "stateGet",
            "STATE_GET",
            subject::STATE_GET,
            "Any agent's document by name, latest or at a revision.",
            request(SYNCHRONIZER, msg!(StateGet), msg!(StateDoc)),
        ),
        req(
            "statePut",
            "STATE_PUT",
            subject::STATE_PUT,
            "Store a document made from `expected_revision`; an agent itself uses its own subject.",
            operator_request(SYNCHRONIZER, msg!(StatePut), msg!(StateDoc)),
        ),
        req(
            "stateDelete",
            "STATE_DELETE",
            subject::STATE_DELETE,
            "Delete a document; an agent itself uses its own subject.",
            operator_request(SYNCHRONIZER, msg!(StateDelete), msg!(StateDeleted)),
        ),
        req(
            "stateHistory",
            "STATE_HISTORY",
            subject::STATE_HISTORY,
            "Any agent's document's kept revisions by name, oldest first.",
            request(SYNCHRONIZER, msg!(StateHistoryRequest), msg!(StateHistory)),
        ),
        req(
            "agentStateGet",
            "agent_state_get",
            &per_agent(subject::agent_state_get)?,
            "The agent's own document, latest or at a revision; a body naming another agent is `forbidden`.",
            own_request(SYNCHRONIZER, msg!(StateGet), msg!(StateDoc)),
        ),
        req(
            "agentStatePut",
            "agent_state_put",
            &per_agent(subject::agent_state_put)?,
            "Store the agent's own document made from `expected_revision`.",
            own_request(SYNCHRONIZER, msg!(StatePut), msg!(StateDoc)),
        ),
        req(
            "agentStateDelete",
            "agent_state_delete",
            &per_agent(subject::agent_state_delete)?,
            "Delete the agent's own document.",
            own_request(SYNCHRONIZER, msg!(StateDelete), msg!(StateDeleted)),
        ),
        req(
            "agentStateHistory",
            "agent_state_history",
            &per_agent(subject::agent_state_history)?,
            "The agent's own document's kept revisions, oldest first.",
            own_request(SYNCHRONIZER, msg!(StateHistoryRequest), msg!(StateHistory)),
        ),
        req(
            "scopeSet",
            "SCOPE_SET",
            subject::SCOPE_SET,
            "Configure a scope: policy, schema, invariants, shared pointers.",
            request(SYNCHRONIZER, msg!(ScopeConfig), msg!(ScopeConfig)),
        ),
        req(
            "scopeGet",
            "SCOPE_GET",
            subject::SCOPE_GET,
            "A scope's configuration (defaults when never set).",
            request(SYNCHRONIZER, msg!(ScopeGet), msg!(ScopeConfig)),
        ),
        req(
            "validate",
            "VALIDATE",
            subject::VALIDATE,
            "Check documents against the scope's schema and invariants.",
            request(SYNCHRONIZER, msg!(ValidateRequest), msg!(ValidationReport)),
        ),
        req(
            "synchronize",
            "SYNCHRONIZE",
            subject::SYNCHRONIZE,
            "Agree on the shared values and push them to the agents.",
            request(SYNCHRONIZER, msg!(SynchronizeRequest), msg!(SyncReport)),
        ),
        req(
            "syncpointInitiate",
            "SYNCPOINT_INITIATE",
            subject::SYNCPOINT_INITIATE,
            "Take a consistent cut of the participants' documents.",
            request(SYNCHRONIZER, msg!(SyncPointInitiate), msg!(SyncPoint)),
        ),
        req(
            "syncpointComplete",
            "SYNCPOINT_COMPLETE",
            subject::SYNCPOINT_COMPLETE,
            "Wait for every participant's acknowledgement.",
            request(SYNCHRONIZER, msg!(SyncPointWait), msg!(SyncPoint)),
        ),
        req(
            "syncpointRollback",
            "SYNCPOINT_ROLLBACK",
            subject::SYNCPOINT_ROLLBACK,
            "Write the cut back as new revisions and tell the agents.",
            request(SYNCHRONIZER, msg!(SyncPointWait), msg!(RollbackReport)),
        ),
        req(
            "syncpointList",
            "SYNCPOINT_LIST",
            subject::SYNCPOINT_LIST,
            "Sync points, optionally by scope and state.",
            request(
                SYNCHRONIZER,
                msg!(SyncPointListRequest),
                msg!(SyncPointList),
            ),
        ),
        req(
            "syncpointGet",
            "SYNCPOINT_GET",
            subject::SYNCPOINT_GET,
            "One sync point.",
            request(SYNCHRONIZER, msg!(SyncPointRef), msg!(SyncPoint)),
        ),
        req(
            "syncpointDiff",
            "SYNCPOINT_DIFF",
            subject::SYNCPOINT_DIFF,
            "What changed in each participant's document since the cut.",
            request(SYNCHRONIZER, msg!(SyncPointRef), msg!(SyncPointDiff)),
        ),
        // Monitor.
        req(
            "monitorMetrics",
            "MONITOR_METRICS",
            subject::MONITOR_METRICS,
            "Traffic and flow counters.",
            request(MONITOR, msg!(MetricsRequest), msg!(SystemMetrics)),
        ),
        req(
            "monitorAnalysis",
            "MONITOR_ANALYSIS",
            subject::MONITOR_ANALYSIS,
            "Trends, slowest agents/kinds/flows, bottleneck resource.",
            request(MONITOR, msg!(AnalysisRequest), msg!(PerformanceAnalysis)),
        ),
        req(
            "monitorAnomalies",
            "MONITOR_ANOMALIES",
            subject::MONITOR_ANOMALIES,
            "The recent anomalies.",
            request(MONITOR, msg!(AnomaliesRequest), msg!(AnomalyList)),
        ),
        req(
            "monitorHealth",
            "MONITOR_HEALTH",
            subject::MONITOR_HEALTH,
            "Services, JetStream and the NATS server: healthy, degraded or unhealthy, with reasons.",
            request(MONITOR, msg!(HealthRequest), msg!(HealthStatus)),
        ),
        req(
            "monitorValidate",
            "MONITOR_VALIDATE",
            subject::MONITOR_VALIDATE,
            "Cross-service consistency of allocations, tasks and agents: every violation.",
            request(MONITOR, msg!(SystemValidateRequest), msg!(SystemValidation)),
        ),
        req(
            "agentEvent",
            "agent_event",
            &per_agent_event(subject::agent_event)?,
            "The agent publishes an event of its own (a request, or a plain publish whose refusal comes back on `coord.agents.{agent_id}.rejected`); stored once per `event_id`, checked against the type's registered schema.",
            own_request(SYNCHRONIZER, msg!(AgentEventPublish), msg!(AgentEvent)),
        ),
        req(
            "agentEventsList",
            "AGENT_EVENTS_LIST",
            subject::AGENT_EVENTS_LIST,
            "Stored agent events by type, agent, time and a field of `data`, oldest first, in pages.",
            request(SYNCHRONIZER, msg!(AgentEventQuery), msg!(AgentEventList)),
        ),
        req(
            "eventSchemaSet",
            "EVENT_SCHEMA_SET",
            subject::EVENT_SCHEMA_SET,
            "Register (or with `schema: null` remove) the JSON Schema of an agent event type.",
            operator_request(SYNCHRONIZER, msg!(EventSchemaSet), msg!(EventSchema)),
        ),
        req(
            "eventSchemaGet",
            "EVENT_SCHEMA_GET",
            subject::EVENT_SCHEMA_GET,
            "An agent event type's registered schema.",
            request(SYNCHRONIZER, msg!(EventSchemaGet), msg!(EventSchema)),
        ),
        req(
            "eventSchemaList",
            "EVENT_SCHEMA_LIST",
            subject::EVENT_SCHEMA_LIST,
            "Every registered agent event schema.",
            request(SYNCHRONIZER, msg!(EventSchemaListRequest), msg!(EventSchemaList)),
        ),
        req(
            "monitorReport",
            "MONITOR_REPORT",
            subject::MONITOR_REPORT,
            "Health, key metrics, anomalies and validation in one document.",
            request(MONITOR, msg!(ReportRequest), msg!(HealthReport)),
        ),
        // NATS service discovery.
        req(
            "srvPing",
            "SRV_PING",
            subject::SRV_PING,
            "Every service instance answers (NATS service API).",
            request("every service", SERVICE_API, SERVICE_API),
        ),
        req(
            "srvInfo",
            "SRV_INFO",
            subject::SRV_INFO,
            "Service descriptions with their endpoints (NATS service API).",
            request("every service", SERVICE_API, SERVICE_API),
        ),
        req(
            "srvStats",
            "SRV_STATS",
            subject::SRV_STATS,
            "Per-endpoint statistics (NATS service API).",
            request("every service", SERVICE_API, SERVICE_API),
        ),
    ];
    out.extend([
        Channel {
            id: "agentHeartbeat",
            address: per_agent(subject::heartbeat)?,
            source: "heartbeat",
            summary: "Every `heartbeat_interval_ms`; three missed and the agent is lost.",
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
    ]);
    use subject::event as e;
    out.extend([
        event(
            "eventFlowCreated",
            "event::FLOW_CREATED",
            e::FLOW_CREATED,
            ORCHESTRATOR,
            "A flow was accepted.",
        ),
        event(
            "eventFlowCompleted",
            "event::FLOW_COMPLETED",
            e::FLOW_COMPLETED,
            ORCHESTRATOR,
            "A flow ended: succeeded, failed or cancelled.",
        ),
        Channel {
            id: "eventAnomaly",
            address: e::anomaly(AnomalyKind::Outlier).replace("outlier", "{kind}"),
            source: "event::anomaly",
            summary: "An anomaly the monitor detected, one subject per kind (`throughput_drop`, `latency_spike`, …).",
            pattern: Pattern::Publish {
                from: MONITOR,
                to: "any listener (monitor, orchestrator)",
                message: msg!(Event),
                jetstream: Some("COORD_EVENTS"),
            },
        },
        event(
            "eventFlowPaused",
            "event::FLOW_PAUSED",
            e::FLOW_PAUSED,
            ORCHESTRATOR,
            "A flow was paused.",
        ),
        event(
            "eventFlowResumed",
            "event::FLOW_RESUMED",
            e::FLOW_RESUMED,
            ORCHESTRATOR,
            "A flow was resumed.",
        ),
        event(
            "eventFlowRerun",
            "event::FLOW_RERUN",
            e::FLOW_RERUN,
            ORCHESTRATOR,
            "Tasks of a flow were reset to run again; a finished flow runs again.",
        ),
        event(
            "eventTaskReady",
            "event::TASK_READY",
            e::TASK_READY,
            ORCHESTRATOR,
            "A task's dependencies are met.",
        ),
        event(
            "eventTaskAssigned",
            "event::TASK_ASSIGNED",
            e::TASK_ASSIGNED,
            ORCHESTRATOR,
            "A task was placed on an agent.",
        ),
        event(
            "eventTaskStarted",
            "event::TASK_STARTED",
            e::TASK_STARTED,
            ORCHESTRATOR,
            "An agent started a task.",
        ),
        event(
            "eventTaskSucceeded",
            "event::TASK_SUCCEEDED",
            e::TASK_SUCCEEDED,
            ORCHESTRATOR,
            "A task completed.",
        ),
        event(
            "eventTaskFailed",
            "event::TASK_FAILED",
            e::TASK_FAILED,
            ORCHESTRATOR,
            "A task failed for good.",
        ),
        event(
            "eventTaskSkipped",
            "event::TASK_SKIPPED",
            e::TASK_SKIPPED,
            ORCHESTRATOR,
            "A task will not run (a dependency failed).",
        ),
        event(
            "eventTaskReset",
            "event::TASK_RESET",
            e::TASK_RESET,
            ORCHESTRATOR,
            "A task waits for its dependencies again (re-run, or a dependency added).",
        ),
        event(
            "eventTaskTimedOut",
            "event::TASK_TIMED_OUT",
            e::TASK_TIMED_OUT,
            ORCHESTRATOR,
            "A task exceeded a timeout.",
        ),
        event(
            "eventTaskWaiting",
            "event::TASK_WAITING",
            e::TASK_WAITING,
            ORCHESTRATOR,
            "A wait task began waiting for its agent event.",
        ),
        event(
            "eventTaskCancelled",
            "event::TASK_CANCELLED",
            e::TASK_CANCELLED,
            ORCHESTRATOR,
            "A task was cancelled.",
        ),
        event(
            "eventReportRejected",
            "event::REPORT_REJECTED",
            e::REPORT_REJECTED,
            ORCHESTRATOR,
            "A report was fenced off; nothing changed.",
        ),
        event(
            "eventAgentRegistered",
            "event::AGENT_REGISTERED",
            e::AGENT_REGISTERED,
            ALLOCATOR,
            "An agent registered.",
        ),
        event(
            "eventAgentLost",
            "event::AGENT_LOST",
            e::AGENT_LOST,
            ALLOCATOR,
            "An agent missed its heartbeats; its allocations were released.",
        ),
        event(
            "eventAgentDeregistered",
            "event::AGENT_DEREGISTERED",
            e::AGENT_DEREGISTERED,
            ALLOCATOR,
            "An agent is draining.",
        ),
        event(
            "eventAgentLeft",
            "event::AGENT_LEFT",
            e::AGENT_LEFT,
            ALLOCATOR,
            "An agent left on purpose; what it held was released and handed back.",
        ),
        event(
            "eventAgentRetired",
            "event::AGENT_RETIRED",
            e::AGENT_RETIRED,
            ALLOCATOR,
            "A lost or left agent was removed after the retention period.",
        ),
        event(
            "eventCapacityAdjusted",
            "event::CAPACITY_ADJUSTED",
            e::CAPACITY_ADJUSTED,
            ALLOCATOR,
            "An agent's capacity changed.",
        ),
        event(
            "eventQuotaChanged",
            "event::QUOTA_CHANGED",
            e::QUOTA_CHANGED,
            ALLOCATOR,
            "An owner's quota was set, changed or cleared.",
        ),
        event(
            "eventAllocationMade",
            "event::ALLOCATION_MADE",
            e::ALLOCATION_MADE,
            ALLOCATOR,
            "Capacity was booked.",
        ),
        event(
            "eventAllocationReleased",
            "event::ALLOCATION_RELEASED",
            e::ALLOCATION_RELEASED,
            ALLOCATOR,
            "Capacity was freed.",
        ),
        event(
            "eventAllocationPreempted",
            "event::ALLOCATION_PREEMPTED",
            e::ALLOCATION_PREEMPTED,
            ALLOCATOR,
            "An allocation was taken back.",
        ),
        event(
            "eventAllocationMoved",
            "event::ALLOCATION_MOVED",
            e::ALLOCATION_MOVED,
            ALLOCATOR,
            "An allocation moved to another agent.",
        ),
        event(
            "eventReservationMade",
            "event::RESERVATION_MADE",
            e::RESERVATION_MADE,
            ALLOCATOR,
            "Capacity was reserved for a window.",
        ),
        event(
            "eventReservationEnded",
            "event::RESERVATION_ENDED",
            e::RESERVATION_ENDED,
            ALLOCATOR,
            "A reservation expired or was cancelled.",
        ),
        event(
            "eventStateUpdated",
            "event::STATE_UPDATED",
            e::STATE_UPDATED,
            SYNCHRONIZER,
            "A state document was written.",
        ),
        event(
            "eventStateConflict",
            "event::STATE_CONFLICT",
            e::STATE_CONFLICT,
            SYNCHRONIZER,
            "A write met a newer revision; the scope's policy decided.",
        ),
        event(
            "eventStateDeleted",
            "event::STATE_DELETED",
            e::STATE_DELETED,
            SYNCHRONIZER,
            "A state document was deleted.",
        ),
        event(
            "eventScopeConfigured",
            "event::SCOPE_CONFIGURED",
            e::SCOPE_CONFIGURED,
            SYNCHRONIZER,
            "A scope's configuration changed.",
        ),
        event(
            "eventStateSynchronized",
            "event::STATE_SYNCHRONIZED",
            e::STATE_SYNCHRONIZED,
            SYNCHRONIZER,
            "A synchronize round ended.",
        ),
        event(
            "eventSyncpointInitiated",
            "event::SYNCPOINT_INITIATED",
            e::SYNCPOINT_INITIATED,
            SYNCHRONIZER,
            "A sync point's cut was taken.",
        ),
        event(
            "eventSyncpointCompleted",
            "event::SYNCPOINT_COMPLETED",
            e::SYNCPOINT_COMPLETED,
            SYNCHRONIZER,
            "A sync point completed (or not).",
        ),
        event(
            "eventSyncpointRolledBack",
            "event::SYNCPOINT_ROLLED_BACK",
            e::SYNCPOINT_ROLLED_BACK,
            SYNCHRONIZER,
            "The participants were rolled back to a cut.",
        ),
    ]);
    Ok(out)
}

/// Every message on the bus, by name: the channels' messages plus the error body.
pub fn messages(channels: &[Channel]) -> BTreeMap<&'static str, Msg> {
    let mut out = BTreeMap::new();
    out.insert("ErrorBody", msg!(ErrorBody));
    for c in channels {
        match c.pattern {
            Pattern::Request { request, reply, .. } => {
                out.insert(request.name, request);
                out.insert(reply.name, reply);
            }
            Pattern::Publish { message, .. } => {
                out.insert(message.name, message);
            }
        }
    }
    out
}

/// Every generated file, by path relative to [`SCHEMA_DIR`], with its exact contents.
pub fn generate() -> anyhow::Result<BTreeMap<String, String>> {
    let channels = channels()?;
    let mut files = BTreeMap::new();
    for m in messages(&channels).values() {
        let text = serde_json::to_string_pretty(&m.schema())
            .with_context(|| format!("schema of {}", m.name))?;
        files.insert(m.file(), text + "\n");
    }
    let doc = serde_yaml::to_string(&asyncapi(&channels)).context("AsyncAPI to YAML")?;
    files.insert(
        ASYNCAPI_FILE.to_owned(),
        format!("# Generated by `cargo xtask schemas`; do not edit.\n{doc}"),
    );
    Ok(files)
}

/// The protocol page (relative to the workspace root) whose subject table is generated.
pub const PROTOCOL_DOC: &str = "docs/protocol.md";
const TABLE_BEGIN: &str =
    "<!-- BEGIN GENERATED subjects: `cargo xtask schemas` rewrites this table -->";
const TABLE_END: &str = "<!-- END GENERATED subjects -->";

/// Every subject as a Markdown table: who publishes, who listens, the schemas.
pub fn subjects_markdown(channels: &[Channel]) -> String {
    let link = |m: &Msg| format!("[`{}`](../{SCHEMA_DIR}/{})", m.name, m.file());
    let mut out = String::from(
        "| subject | kind | publisher → listener | message(s) | what for |\n| --- | --- | --- | --- | --- |\n",
    );
    for c in channels {
        let (kind, who, msgs) = match &c.pattern {
            Pattern::Request {
                from,
                server,
                request,
                reply,
            } => (
                "request/reply".to_owned(),
                format!("{from} → {server}"),
                format!(
                    "{} → {} or [`ErrorBody`](../{SCHEMA_DIR}/ErrorBody.json)",
                    link(request),
                    link(reply)
                ),
            ),
            Pattern::Publish {
                from,
                to,
                message,
                jetstream,
            } => (
                match jetstream {
                    Some(stream) => format!("JetStream (`{stream}`)"),
                    None => "publish".to_owned(),
                },
                format!("{from} → {to}"),
                link(message),
            ),
        };
        out.push_str(&format!(
            "| `{}` | {kind} | {who} | {msgs} | {} |\n",
            c.address, c.summary
        ));
    }
    out
}

/// `doc` with the text between the generated-table markers replaced by `table`.
pub fn splice_subjects(doc: &str, table: &str) -> anyhow::Result<String> {
    let begin = doc
        .find(TABLE_BEGIN)
        .with_context(|| format!("{PROTOCOL_DOC} lacks the line {TABLE_BEGIN}"))?;
    let end = doc
        .find(TABLE_END)
        .with_context(|| format!("{PROTOCOL_DOC} lacks the line {TABLE_END}"))?;
    anyhow::ensure!(
        begin < end,
        "{PROTOCOL_DOC}: the generated-table markers are out of order"
    );
    Ok(format!(
        "{}{TABLE_BEGIN}\n\n{table}\n{}",
        &doc[..begin],
        &doc[end..]
    ))
}

mod asyncapi;
pub use asyncapi::asyncapi;
