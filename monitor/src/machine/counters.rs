//! Traffic counters with bounded memory.
//!
//! Subjects are folded into families (agent ids collapsed), and the number of
//! families kept is capped, so memory does not grow with the number of agents or
//! with traffic volume.

use std::collections::BTreeMap;

use common::msg::{EventKind, SystemMetrics, TaskState};

/// Most subject families tracked; the rest are counted under [`OTHER`].
pub const MAX_FAMILIES: usize = 1_000;
/// Where traffic beyond [`MAX_FAMILIES`] is counted.
pub const OTHER: &str = "(other)";

/// Most agent event types counted apart; the rest are counted under [`OTHER`].
pub const MAX_EVENT_TYPES: usize = 64;

/// Counts since the monitor started.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    since_ms: u64,
    messages: u64,
    bytes: u64,
    by_family: BTreeMap<String, u64>,
    flows_created: u64,
    flows_completed: u64,
    flows_rerun: u64,
    tasks_assigned: u64,
    tasks_completed: u64,
    tasks_failed: u64,
    agent_events: BTreeMap<String, u64>,
}

impl Counters {
    pub fn new(now_ms: u64) -> Self {
        Counters {
            since_ms: now_ms,
            ..Default::default()
        }
    }

    /// Counts one message; an event (`event`, parsed once by the caller)
    /// also counts towards the task and flow counts.
    pub fn observe(&mut self, subject: &str, payload: &[u8], event: Option<&EventKind>) {
        self.traffic(subject, payload);
        if let Some(kind) = event {
            self.count_event(kind);
        }
    }

    /// Counts one message as traffic alone (an event seen before).
    pub fn traffic(&mut self, subject: &str, payload: &[u8]) {
        self.bytes += payload.len() as u64;
        self.count(subject, 1);
    }

    /// Counts `n` messages on `subject` whose bodies the monitor does not see
    /// (requests, counted by the services that took them).
    pub fn count(&mut self, subject: &str, n: u64) {
        self.messages += n;
        let family = common::subject::family(subject);
        if self.by_family.len() < MAX_FAMILIES || self.by_family.contains_key(&family) {
            *self.by_family.entry(family).or_insert(0) += n;
        } else {
            *self.by_family.entry(OTHER.to_owned()).or_insert(0) += n;
        }
    }

    /// Counts one accepted agent event of `event_type` (a type is a label:
    /// beyond [`MAX_EVENT_TYPES`] they share one).
    pub fn agent_event(&mut self, event_type: &str) {
        let key = if self.agent_events.len() < MAX_EVENT_TYPES
            || self.agent_events.contains_key(event_type)
        {
            event_type
        } else {
            OTHER
        };
        *self.agent_events.entry(key.to_owned()).or_insert(0) += 1;
    }

    fn count_event(&mut self, kind: &EventKind) {
        match kind {
            EventKind::FlowCreated { .. } => self.flows_created += 1,
            EventKind::FlowCompleted { .. } => self.flows_completed += 1,
            EventKind::FlowRerun { .. } => self.flows_rerun += 1,
            EventKind::TaskTransition { to, .. } => match to {
                TaskState::Assigned => self.tasks_assigned += 1,
                TaskState::Succeeded => self.tasks_completed += 1,
                TaskState::Failed => self.tasks_failed += 1,
                _ => {}
            },
            _ => {}
        }
    }

    pub fn messages_total(&self) -> u64 {
        self.messages
    }

    /// Messages per subject family since the start.
    pub fn families(&self) -> impl Iterator<Item = (&str, u64)> {
        self.by_family.iter().map(|(f, n)| (f.as_str(), *n))
    }

    pub fn tasks_completed(&self) -> u64 {
        self.tasks_completed
    }

    pub fn tasks_failed(&self) -> u64 {
        self.tasks_failed
    }

    pub fn snapshot(&self, now_ms: u64) -> SystemMetrics {
        SystemMetrics {
            since_ms: self.since_ms,
            at_ms: now_ms,
            messages_total: self.messages,
            bytes_total: self.bytes,
            messages_by_subject: self.by_family.clone(),
            flows_created: self.flows_created,
            flows_completed: self.flows_completed,
            flows_rerun: self.flows_rerun,
            tasks_assigned: self.tasks_assigned,
            tasks_completed: self.tasks_completed,
            tasks_failed: self.tasks_failed,
            agent_events_by_type: self.agent_events.clone(),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::msg::Event;

    #[test]
    fn agent_event_types_are_bounded_labels() {
        let mut c = Counters::new(0);
        for i in 0..MAX_EVENT_TYPES + 10 {
            c.agent_event(&format!("t{i}"));
        }
        c.agent_event("t0");
        let m = c.snapshot(1);
        assert_eq!(m.agent_events_by_type.len(), MAX_EVENT_TYPES + 1);
        assert_eq!(m.agent_events_by_type["t0"], 2);
        assert_eq!(m.agent_events_by_type[OTHER], 10);
    }
    use common::{FlowId, TaskId};

    fn transition(to: TaskState) -> Vec<u8> {
        serde_json::to_vec(&Event {
            event_id: "e".into(),
            at_ms: 0,
            source: "t".into(),
            kind: EventKind::TaskTransition {
                flow_id: FlowId::new("f").unwrap(),
                task_id: TaskId::new("a").unwrap(),
                from: TaskState::Running,
                to,
                attempt: 1,
                agent_id: None,
                reason: None,
                timeout_ms: None,
                task_kind: None,
            },
        })
        .unwrap()
    }

    /// Counts `payload` as the monitor does: an event's body parsed.
    fn observe(c: &mut Counters, subject: &str, payload: &[u8]) {
        let event = serde_json::from_slice::<Event>(payload).ok();
        c.observe(subject, payload, event.as_ref().map(|e| &e.kind));
    }

    #[test]
    fn counts_messages_per_family_and_task_outcomes() {
        let mut c = Counters::new(1);
        observe(&mut c, "coord.agents.w1.report", b"{}");
        observe(&mut c, "coord.agents.w2.report", b"{}");
        let succeeded = transition(TaskState::Succeeded);
        observe(&mut c, "coord.events.task.succeeded", &succeeded);
        observe(
            &mut c,
            "coord.events.task.failed",
            &transition(TaskState::Failed),
        );
        observe(&mut c, "coord.events.task.succeeded", b"not json");
        let m = c.snapshot(2);
        assert_eq!(m.messages_total, 5);
        assert_eq!(m.messages_by_subject["coord.agents.*.report"], 2);
        assert_eq!(m.messages_by_subject["coord.events.task.succeeded"], 2);
        assert_eq!(m.tasks_completed, 1);
        assert_eq!(m.tasks_failed, 1);
    }

    #[test]
    fn memory_is_bounded_by_the_family_cap() {
        let mut c = Counters::new(0);
        for i in 0..(MAX_FAMILIES + 50) {
            c.observe(&format!("coord.custom.s{i}"), b"", None);
        }
        let m = c.snapshot(0);
        assert_eq!(m.messages_by_subject.len(), MAX_FAMILIES + 1);
        assert_eq!(m.messages_by_subject[OTHER], 50);
    }
}
