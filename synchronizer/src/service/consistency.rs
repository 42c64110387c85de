//! Consistency: validation of a scope's documents (schema and invariants),
//! and synchronize rounds that agree shared keys and push the agreed state.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::msg::{
    CapacityRequest, EventKind, Invariant, NoticeKind, ScopeConfig, StateDoc, SyncReport,
    SynchronizeRequest, ValidateRequest, ValidationReport, Violation,
};
use common::nats::{self as bus, CAS_ATTEMPTS};
use common::{AgentId, Error, ErrorCode, ScopeId, SyncPointId};
use futures::{StreamExt, TryStreamExt};
use serde_json::Value;

use super::{ack_results, decode_doc, doc_key, notices, Synchronizer, FAN_OUT};
use crate::machine::{self, agree, rules};

/// Most agents one synchronize or sync point request may name.
pub(super) const MAX_AGENTS: usize = 10_000;

/// Checks a list of agents named in a request: not empty, not too many, no duplicates.
pub(super) fn check_agents(agents: &[AgentId]) -> Result<(), Error> {
    if agents.is_empty() {
        return Err(Error::bad_request("name at least one agent"));
    }
    if agents.len() > MAX_AGENTS {
        return Err(Error::bad_request(format!(
            "{} agents named, at most {MAX_AGENTS} allowed",
            agents.len()
        )));
    }
    let mut seen = BTreeSet::new();
    let dupes: Vec<&AgentId> = agents.iter().filter(|a| !seen.insert(*a)).collect();
    if !dupes.is_empty() {
        return Err(Error::bad_request(format!(
            "agents named twice: {}",
            dupes
                .iter()
                .map(|a| a.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(())
}

impl Synchronizer {
    /// Every agent with a document in `scope`.
    async fn agents_in(&self, scope: &ScopeId) -> Result<Vec<AgentId>, Error> {
        let prefix = format!("{scope}.");
        let keys = bus::keys(&self.state).await?;
        Ok(keys
            .iter()
            .filter_map(|k| k.strip_prefix(&prefix))
            .filter_map(|a| AgentId::new(a).ok())
            .collect())
    }

    /// The latest documents of `agents` (absent ones are left out).
    pub(super) async fn read_docs(
        &self,
        scope: &ScopeId,
        agents: &[AgentId],
    ) -> Result<BTreeMap<AgentId, StateDoc>, Error> {
        let read = futures::stream::iter(agents.iter().cloned())
            .map(|agent| async move {
                let key = doc_key(scope, &agent);
                let doc = match self.entry(&key).await? {
                    Some(e) => decode_doc(&e)?,
                    None => None,
                };
                Ok::<_, Error>((agent, doc))
            })
            .buffer_unordered(FAN_OUT)
            .try_collect::<Vec<_>>()
            .await?;
        Ok(read
            .into_iter()
            .filter_map(|(a, d)| d.map(|d| (a, d)))
            .collect())
    }

    /// Agents the allocator knows, asked only when a rule needs them.
    async fn registered_agents(&self, cfg: &ScopeConfig) -> Result<BTreeSet<AgentId>, Error> {
        let needed = cfg
            .invariants
            .iter()
            .any(|i| matches!(i, Invariant::RegisteredAgent { .. }));
        if !needed {
            return Ok(BTreeSet::new());
        }
        let status = self.client.capacity(&CapacityRequest::default()).await?;
        Ok(status.agents.into_keys().collect())
    }

    /// Validates `docs` (and names the `expected` agents without one).
    async fn check(
        &self,
        cfg: &ScopeConfig,
        expected: &[AgentId],
        docs: &BTreeMap<AgentId, StateDoc>,
    ) -> Result<ValidationReport, Error> {
        let mut violations: Vec<Violation> = expected
            .iter()
            .filter(|a| !docs.contains_key(*a))
            .map(|a| Violation {
                agent: Some(a.clone()),
                pointer: String::new(),
                rule: "missing".into(),
                message: format!("{a} has no document in scope {}", cfg.scope),
                agents: Vec::new(),
            })
            .collect();
        if let Some(schema) = &cfg.schema {
            let schema = rules::compile_schema(schema)?;
            for (agent, d) in docs {
                violations.extend(rules::schema_violations(&schema, agent, &d.doc));
            }
        }
        let registered = self.registered_agents(cfg).await?;
        let values: BTreeMap<AgentId, Value> = docs
            .iter()
            .map(|(a, d)| (a.clone(), d.doc.clone()))
            .collect();
        violations.extend(rules::invariant_violations(
            &cfg.invariants,
            &values,
            &registered,
        ));
        Ok(ValidationReport {
            scope: cfg.scope.clone(),
            valid: violations.is_empty(),
            checked: docs.iter().map(|(a, d)| (a.clone(), d.revision)).collect(),
            violations,
        })
    }

    pub(super) async fn validate(&self, req: ValidateRequest) -> Result<ValidationReport, Error> {
        let cfg = self.scope_config(&req.scope).await?;
        let agents = if req.agents.is_empty() {
            self.agents_in(&req.scope).await?
        } else {
            check_agents(&req.agents)?;
            req.agents.clone()
        };
        let docs = self.read_docs(&req.scope, &agents).await?;
        self.check(&cfg, &req.agents, &docs).await
    }

    pub(super) async fn synchronize(&self, req: SynchronizeRequest) -> Result<SyncReport, Error> {
        check_agents(&req.agents)?;
        let cfg = self.scope_config(&req.scope).await?;
        let mut pointers: Vec<String> = req.shared.clone();
        pointers.extend(cfg.shared.iter().cloned());
        for inv in &cfg.invariants {
            if let Invariant::Agree { pointer, agents } = inv {
                if agents.is_empty() || agents.iter().all(|a| req.agents.contains(a)) {
                    pointers.push(pointer.clone());
                }
            }
        }
        if let Some(bad) = pointers.iter().find(|p| !machine::pointer::is_valid(p)) {
            return Err(Error::bad_request(format!("{bad:?} is not a JSON Pointer")));
        }
        let docs = self.read_docs(&req.scope, &req.agents).await?;
        let missing: Vec<&AgentId> = req
            .agents
            .iter()
            .filter(|a| !docs.contains_key(*a))
            .collect();
        if !missing.is_empty() {
            return Err(Error::not_found(format!(
                "no state in scope {} for {}",
                req.scope,
                missing
                    .iter()
                    .map(|a| a.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
            .with_details(serde_json::json!({ "missing": missing })));
        }
        let held: BTreeMap<AgentId, agree::Held> = docs
            .iter()
            .map(|(a, d)| {
                (
                    a.clone(),
                    agree::Held {
                        doc: d.doc.clone(),
                        hlc: d.hlc.clone(),
                    },
                )
            })
            .collect();
        let divergences = agree::agree(cfg.policy, &pointers, &held).map_err(|d| {
            Error::new(
                ErrorCode::Conflict,
                format!(
                    "the agents differ at {} and scope {} rejects conflicts",
                    d.iter()
                        .map(|x| x.pointer.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    req.scope
                ),
            )
            .with_details(serde_json::json!({ "divergences": d }))
        })?;

        // Write the agreed values into each document that lacks them.
        let agreed: Vec<(String, Value)> = divergences
            .iter()
            .filter(|d| d.from.is_some())
            .map(|d| (d.pointer.clone(), d.agreed.clone()))
            .collect();
        let written = futures::stream::iter(req.agents.iter().cloned())
            .map(|agent| {
                let agreed = &agreed;
                let scope = &req.scope;
                async move { self.apply_agreed(scope, &agent, agreed).await }
            })
            .buffer_unordered(super::FAN_OUT)
            .try_collect::<Vec<StateDoc>>()
            .await?;
        let after: BTreeMap<AgentId, StateDoc> = written
            .into_iter()
            .map(|d| (d.agent_id.clone(), d))
            .collect();
        let validation = self.check(&cfg, &req.agents, &after).await?;

        let round_id = SyncPointId::random();
        let expected: BTreeMap<AgentId, u64> =
            after.iter().map(|(a, d)| (a.clone(), d.revision)).collect();
        self.notify(notices(
            &round_id,
            NoticeKind::AgreedState,
            &req.scope,
            after.into_values(),
        ))
        .await;
        let timeout = Duration::from_millis(req.timeout_ms);
        let acked = self.wait_acks(&round_id, &expected, timeout).await?;
        let agents = ack_results(&expected, &acked, timeout);
        let unacked: Vec<AgentId> = agents
            .iter()
            .filter(|r| !r.acked)
            .map(|r| r.agent_id.clone())
            .collect();
        self.events
            .publish(EventKind::StateSynchronized {
                round_id: round_id.clone(),
                scope: req.scope.clone(),
                agents: expected.len(),
                divergences: divergences.len(),
                unacked: unacked.clone(),
            })
            .await;
        Ok(SyncReport {
            round_id,
            scope: req.scope,
            policy: cfg.policy,
            divergences,
            validation,
            agents,
            complete: unacked.is_empty(),
        })
    }

    /// Sets the agreed values in one agent's latest document (compare-and-set,
    /// re-applied on fresh state when the agent wrote meanwhile).
    async fn apply_agreed(
        &self,
        scope: &ScopeId,
        agent: &AgentId,
        agreed: &[(String, Value)],
    ) -> Result<StateDoc, Error> {
        let key = doc_key(scope, agent);
        for _ in 0..CAS_ATTEMPTS {
            let entry = self.entry(&key).await?;
            let Some(current) = entry.as_ref().map(decode_doc).transpose()?.flatten() else {
                return Err(Error::not_found(format!(
                    "the state of {agent} was deleted during synchronization"
                )));
            };
            let mut doc = current.doc.clone();
            for (p, v) in agreed {
                machine::pointer::set(&mut doc, p, v.clone());
            }
            if doc == current.doc {
                return Ok(current);
            }
            let next = StateDoc {
                doc,
                hlc: Some(self.now_hlc()),
                updated_at_ms: common::now_ms(),
                ..current.clone()
            };
            if let Some(revision) = self.cas_write(&key, &next, Some(current.revision)).await? {
                self.events
                    .publish(EventKind::StateUpdated {
                        agent_id: agent.clone(),
                        revision,
                        scope: scope.clone(),
                    })
                    .await;
                return Ok(StateDoc { revision, ..next });
            }
        }
        Err(bus::contention(&key))
    }
}
