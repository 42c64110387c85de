//! Which agents have a work path: a task's assignment reaches an agent only
//! through its consumer `agent-{id}` on `COORD_ASSIGN`, which the agent makes
//! after it registers. An agent that registered and heartbeats but has no
//! consumer (refused by a server limit, deleted, never made) would look able
//! to work and never get any, so a task is placed only on an agent whose
//! consumer this replica has seen.
//!
//! What is known comes from the reconciliation's listing of the stream's
//! consumers, from the consumers this replica removes, and from a look at
//! one agent's consumer when a placement would pick an agent not known yet
//! (an agent that has just joined): one request per agent, not per task.
//! A consumer found missing is looked for again after [`RECHECK_MS`].

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use async_nats::jetstream::context::ConsumerInfoErrorKind;
use common::nats as bus;
use common::AgentId;

use super::Allocator;
use crate::machine::{AgentRecord, Candidate};

/// How long an agent found without a consumer is left out before it is
/// looked at again.
pub(super) const RECHECK_MS: u64 = 500;
/// Agents not known yet looked at by one placement, at most.
const LOOKS_PER_PLACEMENT: usize = 16;

/// What this replica knows of the agents' consumers.
#[derive(Default)]
pub(super) struct WorkPaths {
    /// Whether the agent has a consumer, and when that was found.
    known: Mutex<HashMap<AgentId, (bool, u64)>>,
}

impl WorkPaths {
    /// For each record's agent, under one lock: `Some(true)` if its
    /// consumer was seen, `Some(false)` if it was found without one less
    /// than [`RECHECK_MS`] ago, `None` if it is to be looked at.
    fn of<'a>(
        &self,
        agents: impl ExactSizeIterator<Item = &'a AgentId>,
        now_ms: u64,
    ) -> Vec<Option<bool>> {
        let Ok(known) = self.known.lock() else {
            return vec![None; agents.len()];
        };
        let state = |agent: &AgentId| match known.get(agent) {
            Some((true, _)) => Some(true),
            Some((false, at)) if now_ms.saturating_sub(*at) < RECHECK_MS => Some(false),
            _ => None,
        };
        agents.map(state).collect()
    }

    pub(super) fn note(&self, agent: &AgentId, has: bool, now_ms: u64) {
        if let Ok(mut known) = self.known.lock() {
            known.insert(agent.clone(), (has, now_ms));
        }
    }

    /// The stream's consumers as listed from `now_ms` on: every agent not
    /// among them and not seen since has none.
    pub(super) fn listed(&self, with: HashSet<AgentId>, now_ms: u64) {
        let Ok(mut known) = self.known.lock() else {
            return;
        };
        for (agent, seen) in known.iter_mut() {
            // One seen while the listing was under way stays seen.
            if !with.contains(agent) && seen.1 < now_ms {
                *seen = (false, now_ms);
            }
        }
        for agent in with {
            known.insert(agent, (true, now_ms));
        }
    }

    /// Forgets agents without a record.
    pub(super) fn retain(&self, keep: impl Fn(&AgentId) -> bool) {
        if let Ok(mut known) = self.known.lock() {
            known.retain(|a, _| keep(a));
        }
    }
}

impl Allocator {
    /// The records a task may be placed on: those of agents with a work
    /// path, and how many were left out. Agents not known yet are looked at
    /// first (a few per placement; the rest wait for the next placement or
    /// the reconciliation).
    pub(super) async fn with_work_path<'a>(
        &self,
        records: &[&'a AgentRecord],
        now_ms: u64,
    ) -> (Vec<&'a AgentRecord>, Vec<AgentId>) {
        let known = self
            .known_paths(records.iter().map(|r| &r.agent_id), now_ms)
            .await;
        let mut with = Vec::with_capacity(records.len());
        let mut without = Vec::new();
        for (r, known) in records.iter().zip(known) {
            match known {
                Some(true) => with.push(*r),
                _ => without.push(r.agent_id.clone()),
            }
        }
        (with, without)
    }

    /// Of the candidates a placement sampled, those whose agent has a work
    /// path (as [`Self::with_work_path`] decides): a placement among ten
    /// thousand agents looks up the few it sampled, not all of them.
    pub(super) async fn reachable<'a>(
        &self,
        found: Vec<Candidate<'a>>,
        now_ms: u64,
    ) -> Vec<Candidate<'a>> {
        let known = self
            .known_paths(found.iter().map(|c| &c.agent.agent_id), now_ms)
            .await;
        found
            .into_iter()
            .zip(known)
            .filter_map(|(c, known)| (known == Some(true)).then_some(c))
            .collect()
    }

    /// Whether each agent has a work path, after looking at a few of those
    /// not known yet.
    async fn known_paths<'a>(
        &self,
        agents: impl ExactSizeIterator<Item = &'a AgentId> + Clone,
        now_ms: u64,
    ) -> Vec<Option<bool>> {
        let unknown: Vec<AgentId> = agents
            .clone()
            .zip(self.paths.of(agents.clone(), now_ms))
            .filter(|(_, known)| known.is_none())
            .take(LOOKS_PER_PLACEMENT)
            .map(|(a, _)| a.clone())
            .collect();
        if unknown.is_empty() {
            return self.paths.of(agents, now_ms);
        }
        let looks = unknown.iter().map(|a| self.look_for_consumer(a));
        futures::future::join_all(looks).await;
        self.paths.of(agents, now_ms)
    }

    /// Looks at one agent's consumer and notes what it found; a failed look
    /// notes nothing (the agent stays unknown, so it is left out this time).
    async fn look_for_consumer(&self, agent: &AgentId) {
        let Ok(stream) = self.js.get_stream_no_info(bus::STREAM_ASSIGN).await else {
            return;
        };
        let now = common::now_ms();
        match stream.consumer_info(bus::agent_consumer(agent)).await {
            Ok(_) => self.paths.note(agent, true, now),
            Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => {
                self.paths.note(agent, false, now)
            }
            Err(e) => tracing::debug!(agent = %agent, error = %e, "consumer not looked at"),
        }
    }
}
