//! Every NATS subject coordkit uses, in one place.
//!
//! No other module writes a subject string: fixed subjects are constants here and
//! parameterised ones are built by functions that only take validated ids, so a
//! subject can never be injected through an id. Everything an agent publishes lives
//! under `coord.agents.{its id}.…`, so NATS permissions can confine each agent.
//!
//! Breaking changes to a message go to a new subject (e.g. `….v2`), never in place.

use crate::id::{AgentId, ScopeId};

/// Root of every coordkit subject.
pub const ROOT: &str = "coord";
/// Every coordkit subject. Nothing serving the system subscribes to it: a
/// subscription matching a request subject counts as interest, so a request
/// to a service that is down would wait out its timeout instead of failing at
/// once with "no responders" (see [`MONITOR_INTAKE`]).
pub const ALL: &str = "coord.>";

// Orchestrator: request/reply.
pub const FLOW_CREATE: &str = "coord.orchestrator.flow.create";
pub const FLOW_GET: &str = "coord.orchestrator.flow.get";
pub const FLOW_STATUS: &str = "coord.orchestrator.flow.status";
pub const FLOW_LIST: &str = "coord.orchestrator.flow.list";
pub const FLOW_PAUSE: &str = "coord.orchestrator.flow.pause";
pub const FLOW_RESUME: &str = "coord.orchestrator.flow.resume";
pub const FLOW_CANCEL: &str = "coord.orchestrator.flow.cancel";
pub const FLOW_MODIFY: &str = "coord.orchestrator.flow.modify";
pub const FLOW_RERUN: &str = "coord.orchestrator.flow.rerun";
pub const FLOW_EXPLAIN: &str = "coord.orchestrator.flow.explain";
/// A plan for the remaining tasks (critical path, makespan, placement,
/// bottleneck), applied as new priorities on request.
pub const FLOW_OPTIMIZE: &str = "coord.orchestrator.flow.optimize";
/// Register (or replace) a trigger: a flow started by matching agent events.
pub const TRIGGER_SET: &str = "coord.orchestrator.trigger.set";
pub const TRIGGER_GET: &str = "coord.orchestrator.trigger.get";
pub const TRIGGER_LIST: &str = "coord.orchestrator.trigger.list";
pub const TRIGGER_DELETE: &str = "coord.orchestrator.trigger.delete";
/// Which of the given allocations their flow tasks still hold (the
/// allocator's reconciliation asks; allocator → orchestrator).
pub const ALLOCATIONS_HELD: &str = "coord.orchestrator.allocations.held";

/// A flow's status summary after every change (core publish, orchestrator → watchers).
pub fn flow_watch(flow: &crate::id::FlowId) -> String {
    format!("coord.orchestrator.watch.{flow}")
}

/// Every flow's status changes.
pub const FLOW_WATCH_ALL: &str = "coord.orchestrator.watch.*";

// ---- Allocator: request/reply -------------------------------------------
// Agents' life cycle and every capacity operation; served by the allocator.
// An agent registers on its own subject (`agent_register` below), which the
// server can confine to it; these shared subjects name the agent only in the
// JSON and are for operators' tools and agents written before the per-agent
// ones existed.
pub const AGENT_REGISTER: &str = "coord.agents.register";
/// The agent leaves: it drains (keeps its allocations, takes no new ones).
pub const AGENT_DEREGISTER: &str = "coord.agents.deregister";
/// Every agent's own registration subject (the allocators' endpoint).
pub const AGENT_REGISTER_ALL: &str = "coord.agents.*.register";
/// Every agent's own deregistration subject (the allocators' endpoint).
pub const AGENT_DEREGISTER_ALL: &str = "coord.agents.*.deregister";

/// An agent joins (or re-joins) on its own subject (agent → allocator); the
/// body must name the same agent.
pub fn agent_register(agent: &AgentId) -> String {
    format!("coord.agents.{agent}.register")
}

/// An agent leaves on its own subject (agent → allocator); the body must name
/// the same agent.
pub fn agent_deregister(agent: &AgentId) -> String {
    format!("coord.agents.{agent}.deregister")
}

/// Every agent's own leave subject (the allocators' endpoint).
pub const AGENT_LEAVE_ALL: &str = "coord.agents.*.leave";

/// An agent is done, on its own subject (agent → allocator): status `left`.
pub fn agent_leave(agent: &AgentId) -> String {
    format!("coord.agents.{agent}.leave")
}
pub const ALLOCATE: &str = "coord.allocator.allocate";
/// Several requirements placed all-or-nothing.
pub const ALLOCATE_GANG: &str = "coord.allocator.allocate.gang";
pub const RELEASE: &str = "coord.allocator.release";
/// Extends an allocation's lease (`ttl_ms`).
pub const RENEW: &str = "coord.allocator.renew";
pub const CAPACITY_CHECK: &str = "coord.allocator.capacity.check";
/// Hold capacity for an owner over a time window.
pub const CAPACITY_RESERVE: &str = "coord.allocator.capacity.reserve";
/// Cancel a reservation.
pub const RESERVATION_CANCEL: &str = "coord.allocator.reservation.cancel";
/// Change an agent's capacity at run time, optionally preempting.
pub const CAPACITY_ADJUST: &str = "coord.allocator.capacity.adjust";
/// Set, change or clear an owner's quota, optionally preempting.
pub const QUOTA_SET: &str = "coord.allocator.quota.set";
/// A rebalancing plan, applied on request.
pub const OPTIMIZE: &str = "coord.allocator.optimize";
// ---- end of allocator ----------------------------------------------------

// ---------------------------------------------------------------------------
// Synchronizer: request/reply under `coord.sync.…`; the watch subjects carry
// every write to the state bucket (republished by the server itself, so no
// write is ever missed or announced twice); notices to an agent and its
// acknowledgements live under `coord.agents.{id}.sync…` (functions below).
//
// An agent reads and writes its own documents on `coord.agents.{id}.state.…`,
// which the server can confine to it; the shared `coord.sync.state.…` subjects
// name the agent only in the JSON and are for operators' tools (and for
// reading another agent's document).
pub const STATE_GET: &str = "coord.sync.state.get";
pub const STATE_PUT: &str = "coord.sync.state.put";
pub const STATE_DELETE: &str = "coord.sync.state.delete";
pub const STATE_HISTORY: &str = "coord.sync.state.history";
pub const SCOPE_SET: &str = "coord.sync.scope.set";
pub const SCOPE_GET: &str = "coord.sync.scope.get";
pub const VALIDATE: &str = "coord.sync.validate";
pub const SYNCHRONIZE: &str = "coord.sync.synchronize";
pub const SYNCPOINT_INITIATE: &str = "coord.sync.syncpoint.initiate";
pub const SYNCPOINT_COMPLETE: &str = "coord.sync.syncpoint.complete";
pub const SYNCPOINT_ROLLBACK: &str = "coord.sync.syncpoint.rollback";
pub const SYNCPOINT_LIST: &str = "coord.sync.syncpoint.list";
pub const SYNCPOINT_GET: &str = "coord.sync.syncpoint.get";
pub const SYNCPOINT_DIFF: &str = "coord.sync.syncpoint.diff";
/// Prefix of the watch subjects; the state bucket republishes `{scope}.{agent}` under it.
pub const STATE_WATCH_PREFIX: &str = "coord.sync.watch";
/// Every state change of every scope.
pub const STATE_WATCH_ALL: &str = "coord.sync.watch.>";
/// Every agent's acknowledgements (the synchronizers' queue subscription).
pub const SYNC_ACK_ALL: &str = "coord.agents.*.sync.ack";
/// Every agent's own document reads (the synchronizers' endpoint).
pub const AGENT_STATE_GET_ALL: &str = "coord.agents.*.state.get";
/// Every agent's own document writes (the synchronizers' endpoint).
pub const AGENT_STATE_PUT_ALL: &str = "coord.agents.*.state.put";
/// Every agent's own document deletions (the synchronizers' endpoint).
pub const AGENT_STATE_DELETE_ALL: &str = "coord.agents.*.state.delete";
/// Every agent's own document histories (the synchronizers' endpoint).
pub const AGENT_STATE_HISTORY_ALL: &str = "coord.agents.*.state.history";

/// An agent reads its own document (agent → synchronizer).
pub fn agent_state_get(agent: &AgentId) -> String {
    format!("coord.agents.{agent}.state.get")
}

/// An agent writes its own document (agent → synchronizer).
pub fn agent_state_put(agent: &AgentId) -> String {
    format!("coord.agents.{agent}.state.put")
}

/// An agent deletes its own document (agent → synchronizer).
pub fn agent_state_delete(agent: &AgentId) -> String {
    format!("coord.agents.{agent}.state.delete")
}

/// An agent reads its own document's kept revisions (agent → synchronizer).
pub fn agent_state_history(agent: &AgentId) -> String {
    format!("coord.agents.{agent}.state.history")
}

/// Changes of one agent's document in one scope.
pub fn state_watch(scope: &ScopeId, agent: &AgentId) -> String {
    format!("{STATE_WATCH_PREFIX}.{scope}.{agent}")
}

/// Changes of every document in a scope.
pub fn state_watch_scope(scope: &ScopeId) -> String {
    format!("{STATE_WATCH_PREFIX}.{scope}.*")
}

/// Notices pushed to an agent: sync points, rollbacks, agreed state (synchronizer → agent).
pub fn sync_notice(agent: &AgentId) -> String {
    format!("coord.agents.{agent}.sync")
}

/// An agent's acknowledgements of those notices (agent → synchronizer).
pub fn sync_ack(agent: &AgentId) -> String {
    format!("coord.agents.{agent}.sync.ack")
}
// Agent events: an agent publishes on its own subject (the synchronizers'
// endpoint, a request or a plain publish); accepted events are stored under
// `coord.agent_events.{type}.{agent}` in their own stream. Operators register
// per-type schemas and list the stored events under `coord.sync.events.…`.
/// Every agent's events (the synchronizers' endpoint).
pub const AGENT_EVENTS_PUBLISH_ALL: &str = "coord.agents.*.events.*";
/// Every stored agent event (the agent events stream's subjects).
pub const AGENT_EVENTS_ALL: &str = "coord.agent_events.>";
/// Stored agent events, newest pages first.
pub const AGENT_EVENTS_LIST: &str = "coord.sync.events.list";
/// Register or remove the JSON Schema of one event type.
pub const EVENT_SCHEMA_SET: &str = "coord.sync.events.schema.set";
/// One event type's registered schema.
pub const EVENT_SCHEMA_GET: &str = "coord.sync.events.schema.get";
/// Every registered event schema.
pub const EVENT_SCHEMA_LIST: &str = "coord.sync.events.schema.list";

/// An agent publishes an event of `event_type` (agent → synchronizer). The
/// type must be a valid event type (see `msg::validate_event_type`).
pub fn agent_event(agent: &AgentId, event_type: &str) -> Result<String, crate::Error> {
    crate::msg::validate_event_type(event_type)?;
    Ok(format!("coord.agents.{agent}.events.{event_type}"))
}

/// Where an accepted event is stored (synchronizer → stream, and watchers).
pub fn agent_event_stored(event_type: &str, agent: &AgentId) -> Result<String, crate::Error> {
    crate::msg::validate_event_type(event_type)?;
    Ok(format!("coord.agent_events.{event_type}.{agent}"))
}

/// The stored subjects matching an optional type and agent (`*` for a
/// filter not given): a consumer's filter subject.
pub fn agent_events_filter(
    event_type: Option<&str>,
    agent: Option<&AgentId>,
) -> Result<String, crate::Error> {
    if let Some(t) = event_type {
        crate::msg::validate_event_type(t)?;
    }
    Ok(format!(
        "coord.agent_events.{}.{}",
        event_type.unwrap_or("*"),
        agent.map_or("*", AgentId::as_str)
    ))
}

/// The agent and event type of `coord.agents.{id}.events.{type}`, validated.
pub fn agent_event_of(subject: &str) -> Result<(AgentId, String), crate::Error> {
    let parts: Vec<&str> = subject.split('.').collect();
    match parts.as_slice() {
        [ROOT, "agents", id, "events", t] => {
            let agent = AgentId::new(*id)?;
            crate::msg::validate_event_type(t)?;
            Ok((agent, (*t).to_owned()))
        }
        _ => Err(crate::Error::bad_request(format!(
            "{subject} is not an agent event subject"
        ))),
    }
}
// End of the synchronizer block.
// ---------------------------------------------------------------------------

// ---- Monitor: request/reply ---------------------------------------------
// Every replica sees all traffic and answers for the whole system; anomalies it
// detects are events under `coord.events.anomaly.{kind}` (see `event::anomaly`).
pub const MONITOR_METRICS: &str = "coord.monitor.metrics";
/// Trends, slowest agents/kinds/flows, bottleneck resource.
pub const MONITOR_ANALYSIS: &str = "coord.monitor.analysis";
/// The recent anomalies.
pub const MONITOR_ANOMALIES: &str = "coord.monitor.anomalies";
/// Services, JetStream and the NATS server: healthy, degraded or unhealthy.
pub const MONITOR_HEALTH: &str = "coord.monitor.health";
/// Cross-service consistency of allocations, tasks and agents.
pub const MONITOR_VALIDATE: &str = "coord.monitor.validate";
/// Health, key metrics, anomalies and validation in one document.
pub const MONITOR_REPORT: &str = "coord.monitor.report";
/// What the monitor subscribes to: every subject that is not a request to a
/// service nor an agent's assignments. Request subjects are left out so that
/// a request to a service that is down meets no interest and fails at once
/// with "no responders"; the monitor counts them from the services'
/// `$SRV.STATS` instead. Assignment subjects likewise: the allocator finds
/// whether an agent listens by the server's "no responders" there, which a
/// subscriber to every agent's would hide; the monitor counts assignments
/// from the `task.assigned` events. The agent subjects are listed one suffix
/// at a time because `coord.agents.*.>` would match the per-agent requests
/// (`register`, `state.get`, …).
pub const MONITOR_INTAKE: &[&str] = &[
    EVENTS_ALL,
    HEARTBEAT_ALL,
    REPORT_ALL,
    "coord.agents.*.cancel",
    // Report rejections (orchestrator → agent).
    "coord.agents.*.rejected",
    "coord.agents.*.sync",
    SYNC_ACK_ALL,
    FLOW_WATCH_ALL,
    STATE_WATCH_ALL,
    // Accepted agent events (their publish subjects are requests).
    AGENT_EVENTS_ALL,
];
// ---- end of monitor ------------------------------------------------------

/// Micro-service discovery: every service instance answers (NATS service API).
pub const SRV_PING: &str = "$SRV.PING";
/// Micro-service descriptions, with endpoints.
pub const SRV_INFO: &str = "$SRV.INFO";
/// Micro-service statistics, per endpoint.
pub const SRV_STATS: &str = "$SRV.STATS";

/// Heartbeats of every agent (the allocator's subscription).
pub const HEARTBEAT_ALL: &str = "coord.agents.*.heartbeat";
/// Assignments to every agent.
pub const ASSIGN_ALL: &str = "coord.agents.*.assign";
/// Reports of every agent (the report stream's subjects).
pub const REPORT_ALL: &str = "coord.agents.*.report";
/// Every domain event (the events stream's subjects).
pub const EVENTS_ALL: &str = "coord.events.>";

/// An agent's heartbeat (core publish, agent → allocator).
pub fn heartbeat(agent: &AgentId) -> String {
    format!("coord.agents.{agent}.heartbeat")
}

/// An agent's assignments (core publish, orchestrator → agent; sent again
/// until the attempt's `started` is stored, so delivery is at least once).
pub fn assign(agent: &AgentId) -> String {
    format!("coord.agents.{agent}.assign")
}

/// An agent's task reports (JetStream, agent → orchestrator).
pub fn report(agent: &AgentId) -> String {
    format!("coord.agents.{agent}.report")
}

/// The header of the allocator's empty message on an agent's assignment
/// subject that finds whether anyone listens there ("no responders" if not).
pub const PROBE_HEADER: &str = "Coord-Probe";

/// Tells an agent to stop working on an attempt (core publish, orchestrator → agent).
pub fn cancel(agent: &AgentId) -> String {
    format!("coord.agents.{agent}.cancel")
}

/// Verdicts on an agent's refused reports (core publish, orchestrator → agent).
pub fn rejected(agent: &AgentId) -> String {
    format!("coord.agents.{agent}.rejected")
}

/// The agent id in an agent subject (`coord.agents.{id}.…`), validated.
///
/// Identity comes from the subject the agent is permitted to publish on, never
/// from a field in the JSON alone.
pub fn agent_of(subject: &str) -> Option<AgentId> {
    let mut parts = subject.split('.');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(ROOT), Some("agents"), Some(id)) => AgentId::new(id).ok(),
        _ => None,
    }
}

/// Event subjects: `coord.events.{family}.{what}`.
pub mod event {
    pub const FLOW_CREATED: &str = "coord.events.flow.created";
    pub const FLOW_COMPLETED: &str = "coord.events.flow.completed";
    pub const TASK_READY: &str = "coord.events.task.ready";
    pub const TASK_ASSIGNED: &str = "coord.events.task.assigned";
    pub const TASK_STARTED: &str = "coord.events.task.started";
    pub const TASK_SUCCEEDED: &str = "coord.events.task.succeeded";
    pub const TASK_FAILED: &str = "coord.events.task.failed";
    pub const TASK_SKIPPED: &str = "coord.events.task.skipped";
    pub const TASK_TIMED_OUT: &str = "coord.events.task.timed_out";
    pub const TASK_CANCELLED: &str = "coord.events.task.cancelled";
    /// A wait task began waiting for its agent event.
    pub const TASK_WAITING: &str = "coord.events.task.waiting";
    pub const FLOW_PAUSED: &str = "coord.events.flow.paused";
    pub const FLOW_RESUMED: &str = "coord.events.flow.resumed";
    pub const FLOW_RERUN: &str = "coord.events.flow.rerun";
    pub const TASK_RESET: &str = "coord.events.task.reset";
    pub const REPORT_REJECTED: &str = "coord.events.task.report_rejected";
    pub const AGENT_REGISTERED: &str = "coord.events.agent.registered";
    pub const ALLOCATION_MADE: &str = "coord.events.allocation.made";
    pub const ALLOCATION_RELEASED: &str = "coord.events.allocation.released";
    pub const STATE_UPDATED: &str = "coord.events.state.updated";
    // Allocator events.
    pub const AGENT_LOST: &str = "coord.events.agent.lost";
    pub const AGENT_DEREGISTERED: &str = "coord.events.agent.deregistered";
    pub const AGENT_LEFT: &str = "coord.events.agent.left";
    pub const AGENT_RETIRED: &str = "coord.events.agent.retired";
    pub const CAPACITY_ADJUSTED: &str = "coord.events.agent.capacity_adjusted";
    pub const QUOTA_CHANGED: &str = "coord.events.quota.changed";
    pub const ALLOCATION_PREEMPTED: &str = "coord.events.allocation.preempted";
    pub const ALLOCATION_MOVED: &str = "coord.events.allocation.moved";
    pub const RESERVATION_MADE: &str = "coord.events.reservation.made";
    pub const RESERVATION_ENDED: &str = "coord.events.reservation.ended";
    pub const STATE_CONFLICT: &str = "coord.events.state.conflict";
    pub const STATE_DELETED: &str = "coord.events.state.deleted";
    pub const SCOPE_CONFIGURED: &str = "coord.events.state.scope_configured";
    pub const STATE_SYNCHRONIZED: &str = "coord.events.state.synchronized";
    pub const SYNCPOINT_INITIATED: &str = "coord.events.syncpoint.initiated";
    pub const SYNCPOINT_COMPLETED: &str = "coord.events.syncpoint.completed";
    pub const SYNCPOINT_ROLLED_BACK: &str = "coord.events.syncpoint.rolled_back";
    /// Never published by this build; where an unknown event would go.
    pub const UNKNOWN: &str = "coord.events.unknown";
    // Monitor events: one subject per anomaly kind.
    pub const ANOMALY_ALL: &str = "coord.events.anomaly.>";

    /// Where an anomaly of `kind` is published.
    pub fn anomaly(kind: crate::msg::AnomalyKind) -> &'static str {
        use crate::msg::AnomalyKind as K;
        match kind {
            K::Outlier => "coord.events.anomaly.outlier",
            K::ThroughputDrop => "coord.events.anomaly.throughput_drop",
            K::ErrorRateSpike => "coord.events.anomaly.error_rate_spike",
            K::LatencySpike => "coord.events.anomaly.latency_spike",
            K::StuckTask => "coord.events.anomaly.stuck_task",
            K::AgentLost => "coord.events.anomaly.agent_lost",
            K::ResourceSaturation => "coord.events.anomaly.resource_saturation",
            K::ConsumerLag => "coord.events.anomaly.consumer_lag",
            K::Unknown => "coord.events.anomaly.unknown",
        }
    }
}

/// The family of a subject, for metrics: `coord.agents.w1.report` →
/// `coord.agents.*.report`, `coord.orchestrator.watch.{flow}` →
/// `coord.orchestrator.watch.*`, `coord.sync.watch.{scope}.{agent}` →
/// `coord.sync.watch.*.*`.
///
/// Collapsing the id tokens keeps the number of series bounded however many
/// agents, flows and scopes there are.
pub fn family(subject: &str) -> String {
    let parts: Vec<&str> = subject.split('.').collect();
    match parts.as_slice() {
        [ROOT, "agents", id, rest @ ..] if !rest.is_empty() && *id != "register" => {
            format!("coord.agents.*.{}", rest.join("."))
        }
        [ROOT, "orchestrator", "watch", _flow] => FLOW_WATCH_ALL.to_owned(),
        [ROOT, "orchestrator", "replica", _tag, rest @ ..] if !rest.is_empty() => {
            format!("coord.orchestrator.replica.*.{}", rest.join("."))
        }
        [ROOT, "sync", "watch", ids @ ..] if !ids.is_empty() => {
            format!("{STATE_WATCH_PREFIX}{}", ".*".repeat(ids.len()))
        }
        [ROOT, "agent_events", event_type, _agent] => {
            format!("coord.agent_events.{event_type}.*")
        }
        _ => subject.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_subjects_round_trip() {
        let a = AgentId::new("w-1").unwrap();
        assert_eq!(heartbeat(&a), "coord.agents.w-1.heartbeat");
        assert_eq!(agent_of(&report(&a)), Some(a.clone()));
        assert_eq!(agent_of(&assign(&a)), Some(a.clone()));
        assert_eq!(agent_of("coord.sync.state.get"), None);
        let scope = ScopeId::new("plans").unwrap();
        assert_eq!(state_watch(&scope, &a), "coord.sync.watch.plans.w-1");
        assert_eq!(agent_of(&sync_ack(&a)), Some(a.clone()));
        assert_eq!(family(&sync_ack(&a)), "coord.agents.*.sync.ack");
        assert_eq!(
            family("coord.orchestrator.replica.00c0ffee.report"),
            "coord.orchestrator.replica.*.report"
        );
        assert_eq!(sync_notice(&a), "coord.agents.w-1.sync");
        assert_eq!(agent_of(&agent_register(&a)), Some(a.clone()));
        assert_eq!(agent_of(&agent_state_put(&a)), Some(a.clone()));
        assert_eq!(family(&agent_register(&a)), AGENT_REGISTER_ALL);
        assert_eq!(family(&agent_deregister(&a)), AGENT_DEREGISTER_ALL);
        assert_eq!(family(&agent_state_get(&a)), AGENT_STATE_GET_ALL);
        assert_eq!(family(&agent_state_put(&a)), AGENT_STATE_PUT_ALL);
        assert_eq!(family(&agent_state_delete(&a)), AGENT_STATE_DELETE_ALL);
        assert_eq!(family(&agent_state_history(&a)), AGENT_STATE_HISTORY_ALL);
    }

    #[test]
    fn agent_event_subjects_round_trip() {
        let a = AgentId::new("w-1").unwrap();
        let on = agent_event(&a, "approved").unwrap();
        assert_eq!(on, "coord.agents.w-1.events.approved");
        assert_eq!(agent_of(&on), Some(a.clone()));
        assert_eq!(
            agent_event_of(&on).unwrap(),
            (a.clone(), "approved".to_owned())
        );
        assert_eq!(family(&on), "coord.agents.*.events.approved");
        assert_eq!(
            family(&agent_event_stored("approved", &a).unwrap()),
            "coord.agent_events.approved.*"
        );
        assert_eq!(
            agent_event_stored("approved", &a).unwrap(),
            "coord.agent_events.approved.w-1"
        );
        assert_eq!(
            agent_events_filter(None, Some(&a)).unwrap(),
            "coord.agent_events.*.w-1"
        );
        assert!(agent_event(&a, "Bad.Type").is_err());
        assert!(agent_event_of("coord.agents.w-1.events.UP").is_err());
        assert!(agent_event_of("coord.agents.w-1.report").is_err());
    }

    #[test]
    fn families_collapse_agent_ids() {
        assert_eq!(family("coord.agents.w-1.report"), "coord.agents.*.report");
        assert_eq!(
            family("coord.orchestrator.watch.f-123"),
            "coord.orchestrator.watch.*"
        );
        assert_eq!(family("coord.sync.watch.plans.w-1"), "coord.sync.watch.*.*");
        assert_eq!(family("coord.agents.register"), "coord.agents.register");
        assert_eq!(family(FLOW_CREATE), FLOW_CREATE);
    }
}
