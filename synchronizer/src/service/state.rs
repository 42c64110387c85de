//! State documents and scope configuration: get (latest or at a revision),
//! put with conflict resolution by the scope's policy, delete, history.

use common::msg::{
    ConflictOutcome, ConflictPolicy, EventKind, HistoryEntry, ScopeConfig, ScopeGet, StateDelete,
    StateDeleted, StateDoc, StateGet, StateHistory, StateHistoryRequest, StatePut,
};
use common::nats::{self as bus, Step, CAS_ATTEMPTS};
use common::{Error, ErrorCode, ScopeId};
use futures::StreamExt;

use super::{decode_doc, doc_key, Synchronizer};
use crate::machine::{self, resolve};

impl Synchronizer {
    /// Keeps [`Synchronizer::enforced`] in step with the scopes bucket, for
    /// as long as the service runs (a failed watch is made again).
    pub(super) async fn follow_scopes(self: std::sync::Arc<Self>) {
        loop {
            match self.scopes.watch_with_history(">").await {
                Ok(mut watch) => {
                    // Stopped at the first error: polled again after one, a
                    // watch whose connection went away panics (async-nats 0.51).
                    while let Some(Ok(entry)) = watch.next().await {
                        let Ok(scope) = ScopeId::new(entry.key.clone()) else {
                            continue;
                        };
                        let cfg = match entry.operation {
                            async_nats::jetstream::kv::Operation::Put => {
                                serde_json::from_slice::<ScopeConfig>(&entry.value).ok()
                            }
                            _ => None,
                        };
                        self.remember_enforcement(&scope, cfg.as_ref());
                    }
                }
                Err(e) => tracing::warn!(error = %e, "scopes watch not made yet"),
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    }

    fn remember_enforcement(&self, scope: &ScopeId, cfg: Option<&ScopeConfig>) {
        let schema = cfg
            .filter(|c| c.enforce_schema)
            .and_then(|c| c.schema.as_ref())
            .and_then(|s| machine::rules::compile_schema(s).ok());
        if let Ok(mut m) = self.enforced.write() {
            match schema {
                Some(s) => {
                    m.insert(scope.clone(), std::sync::Arc::new(s));
                }
                None => {
                    m.remove(scope);
                }
            }
        }
    }

    /// Refuses a document its scope's enforced schema does not allow.
    fn check_enforced(&self, req: &StatePut) -> Result<(), Error> {
        let schema = self
            .enforced
            .read()
            .ok()
            .and_then(|m| m.get(&req.scope).cloned());
        let Some(schema) = schema else { return Ok(()) };
        let violations = machine::rules::schema_violations(&schema, &req.agent_id, &req.doc);
        if violations.is_empty() {
            return Ok(());
        }
        let first = violations[0].message.clone();
        Err(Error::new(
            ErrorCode::ValidationFailed,
            format!(
                "the document does not satisfy scope {}'s schema: {first}{}",
                req.scope,
                if violations.len() > 1 {
                    format!(" (and {} more)", violations.len() - 1)
                } else {
                    String::new()
                }
            ),
        )
        .with_details(serde_json::json!({ "violations": violations })))
    }

    /// The scope's configuration; defaults for a scope nobody configured.
    pub(super) async fn scope_config(&self, scope: &ScopeId) -> Result<ScopeConfig, Error> {
        Ok(bus::get_json::<ScopeConfig>(&self.scopes, scope.as_str())
            .await?
            .map(|(c, _)| c)
            .unwrap_or_else(|| ScopeConfig {
                enforce_schema: false,
                scope: scope.clone(),
                policy: ConflictPolicy::default(),
                merge_fallback: Default::default(),
                schema: None,
                invariants: Vec::new(),
                shared: Vec::new(),
            }))
    }

    pub(super) async fn scope_set(&self, cfg: ScopeConfig) -> Result<ScopeConfig, Error> {
        machine::rules::check_config(&cfg)?;
        if cfg.enforce_schema && cfg.schema.is_none() {
            return Err(Error::new(
                ErrorCode::ValidationFailed,
                "enforce_schema needs a schema",
            ));
        }
        let stored = cfg.clone();
        bus::cas_update::<ScopeConfig, (), _>(&self.scopes, cfg.scope.as_str(), move |_| {
            Ok(Step::Write(stored.clone(), ()))
        })
        .await?;
        // In force here at once; other replicas follow through the watch.
        self.remember_enforcement(&cfg.scope, Some(&cfg));
        self.events
            .publish(EventKind::ScopeConfigured {
                scope: cfg.scope.clone(),
                policy: cfg.policy,
            })
            .await;
        Ok(cfg)
    }

    pub(super) async fn scope_get(&self, req: ScopeGet) -> Result<ScopeConfig, Error> {
        self.scope_config(&req.scope).await
    }

    pub(super) async fn get(&self, req: StateGet) -> Result<StateDoc, Error> {
        let key = doc_key(&req.scope, &req.agent_id);
        let who = format!("{} in scope {}", req.agent_id, req.scope);
        match req.revision {
            None => match self.entry(&key).await? {
                Some(e) => decode_doc(&e)?,
                None => None,
            }
            .ok_or_else(|| Error::not_found(format!("no state for {who}"))),
            Some(rev) => match self.doc_at(&key, rev).await? {
                Some(Some(doc)) => Ok(doc),
                Some(None) => Err(Error::not_found(format!(
                    "revision {rev} of {who} is a deletion"
                ))),
                None => Err(Error::not_found(format!(
                    "revision {rev} of {who} is not in its history (the last 64 revisions are kept)"
                ))),
            },
        }
    }

    pub(super) async fn put(&self, req: StatePut) -> Result<StateDoc, Error> {
        machine::check_doc(&req.doc)?;
        self.check_enforced(&req)?;
        let key = doc_key(&req.scope, &req.agent_id);
        let hlc = match &req.clock {
            Some(c) => {
                self.observe(c);
                c.clone()
            }
            None => self.now_hlc(),
        };
        let ours = StateDoc {
            agent_id: req.agent_id.clone(),
            revision: 0,
            doc: req.doc.clone(),
            updated_at_ms: common::now_ms(),
            scope: req.scope.clone(),
            hlc: Some(hlc.clone()),
            resolution: None,
        };
        // Most puts are made from the stored revision: try the compare-and-set
        // on it first, so such a put costs one KV write instead of two reads
        // and a write. Only a lost one reads the document and the scope's
        // policy. A base equal to a deletion's revision (seen on the watch
        // subject) is current too, and is written over.
        if let Some(revision) = self
            .cas_write(&key, &ours, Some(req.expected_revision))
            .await?
        {
            self.updated(&req, revision).await;
            return Ok(StateDoc { revision, ..ours });
        }
        let cfg = self.scope_config(&req.scope).await?;
        for _ in 0..CAS_ATTEMPTS {
            let entry = self.entry(&key).await?;
            let current = match &entry {
                Some(e) => decode_doc(e)?,
                None => None,
            };
            let current_rev = current.as_ref().map_or(0, |c| c.revision);
            // A deleted key is written over its tombstone's revision.
            let write_rev = entry.as_ref().map(|e| e.revision);
            if req.expected_revision == current_rev {
                let Some(revision) = self.cas_write(&key, &ours, write_rev).await? else {
                    continue;
                };
                self.updated(&req, revision).await;
                return Ok(StateDoc { revision, ..ours });
            }
            let Some(current) = current else {
                // The document is gone: there is nothing to resolve against,
                // so only `reject` refuses to recreate it.
                if cfg.policy == ConflictPolicy::Reject {
                    return Err(self.rejected(&req, None, None).await);
                }
                let Some(revision) = self.cas_write(&key, &ours, write_rev).await? else {
                    continue;
                };
                let resolution = common::msg::Resolution {
                    policy: cfg.policy,
                    outcome: ConflictOutcome::Overwritten,
                    expected_revision: req.expected_revision,
                    current_revision: 0,
                    base_available: false,
                    conflicts: Vec::new(),
                };
                self.conflict_event(&req, &resolution, Some(revision)).await;
                return Ok(StateDoc {
                    revision,
                    resolution: Some(resolution),
                    ..ours
                });
            };
            let base_doc;
            let base = if cfg.policy != ConflictPolicy::Merge {
                resolve::Base::AgedOut
            } else if req.expected_revision == 0 {
                resolve::Base::Empty
            } else {
                match self.doc_at(&key, req.expected_revision).await? {
                    Some(Some(d)) => {
                        base_doc = d.doc;
                        resolve::Base::Found(&base_doc)
                    }
                    Some(None) => resolve::Base::Empty,
                    None => resolve::Base::AgedOut,
                }
            };
            let decision = resolve::resolve(
                cfg.policy,
                cfg.merge_fallback,
                &resolve::Current {
                    revision: current.revision,
                    doc: &current.doc,
                    hlc: current.hlc.as_ref(),
                },
                &resolve::Incoming {
                    expected_revision: req.expected_revision,
                    doc: &req.doc,
                    hlc: &hlc,
                },
                base,
            );
            match decision {
                resolve::Decision::Reject { resolution } => {
                    return Err(self.rejected(&req, Some(current), Some(resolution)).await);
                }
                resolve::Decision::Keep { resolution } => {
                    self.conflict_event(&req, &resolution, None).await;
                    return Ok(StateDoc {
                        resolution: Some(resolution),
                        ..current
                    });
                }
                resolve::Decision::Write {
                    doc,
                    hlc,
                    resolution,
                } => {
                    machine::check_doc(&doc)?;
                    let merged = StateDoc {
                        doc,
                        hlc: Some(hlc),
                        ..ours.clone()
                    };
                    let Some(revision) = self.cas_write(&key, &merged, write_rev).await? else {
                        continue;
                    };
                    self.conflict_event(&req, &resolution, Some(revision)).await;
                    return Ok(StateDoc {
                        revision,
                        resolution: Some(resolution),
                        ..merged
                    });
                }
            }
        }
        Err(bus::contention(&key))
    }

    async fn updated(&self, req: &StatePut, revision: u64) {
        self.events
            .publish(EventKind::StateUpdated {
                agent_id: req.agent_id.clone(),
                revision,
                scope: req.scope.clone(),
            })
            .await;
    }

    async fn conflict_event(
        &self,
        req: &StatePut,
        resolution: &common::msg::Resolution,
        resolved_revision: Option<u64>,
    ) {
        self.events
            .publish(EventKind::StateConflict {
                agent_id: req.agent_id.clone(),
                expected_revision: req.expected_revision,
                current_revision: resolution.current_revision,
                scope: req.scope.clone(),
                policy: resolution.policy,
                outcome: Some(resolution.outcome),
                resolved_revision,
                conflicts: resolution.conflicts.clone(),
            })
            .await;
    }

    /// The `conflict` error of a refused put, announced as an event.
    async fn rejected(
        &self,
        req: &StatePut,
        current: Option<StateDoc>,
        resolution: Option<common::msg::Resolution>,
    ) -> Error {
        let current_revision = current.as_ref().map_or(0, |c| c.revision);
        let resolution = resolution.unwrap_or(common::msg::Resolution {
            policy: ConflictPolicy::Reject,
            outcome: ConflictOutcome::Rejected,
            expected_revision: req.expected_revision,
            current_revision,
            base_available: false,
            conflicts: Vec::new(),
        });
        self.conflict_event(req, &resolution, None).await;
        let message = if resolution.conflicts.is_empty() {
            format!(
                "state of {} is at revision {current_revision}, not {}",
                req.agent_id, req.expected_revision
            )
        } else {
            format!(
                "state of {} is at revision {current_revision}, not {}, and both changed {}",
                req.agent_id,
                req.expected_revision,
                resolution.conflicts.join(", ")
            )
        };
        Error::new(ErrorCode::Conflict, message).with_details(serde_json::json!({
            "current_revision": current_revision,
            "current": current.map(|d| d.doc),
            "resolution": resolution,
        }))
    }

    pub(super) async fn delete(&self, req: StateDelete) -> Result<StateDeleted, Error> {
        let key = doc_key(&req.scope, &req.agent_id);
        let reply = |deleted| StateDeleted {
            agent_id: req.agent_id.clone(),
            scope: req.scope.clone(),
            deleted,
        };
        for _ in 0..CAS_ATTEMPTS {
            let current = match self.entry(&key).await? {
                Some(e) => decode_doc(&e)?,
                None => None,
            };
            let Some(current) = current else {
                return Ok(reply(false));
            };
            if let Some(expected) = req.expected_revision {
                if expected != current.revision {
                    return Err(Error::new(
                        ErrorCode::Conflict,
                        format!(
                            "state of {} is at revision {}, not {expected}",
                            req.agent_id, current.revision
                        ),
                    )
                    .with_details(serde_json::json!({
                        "current_revision": current.revision,
                        "current": current.doc,
                    })));
                }
            }
            // A lost race reads the document again.
            if bus::delete_at(&self.state, &key, current.revision).await? {
                self.limits.forget(&req.agent_id, &req.scope);
                self.events
                    .publish(EventKind::StateDeleted {
                        agent_id: req.agent_id.clone(),
                        scope: req.scope.clone(),
                    })
                    .await;
                return Ok(reply(true));
            }
        }
        Err(bus::contention(&key))
    }

    pub(super) async fn history(&self, req: StateHistoryRequest) -> Result<StateHistory, Error> {
        let key = doc_key(&req.scope, &req.agent_id);
        let mut entries = Vec::new();
        match self.state.history(&key).await {
            Ok(mut h) => {
                while let Some(e) = h.next().await {
                    let e =
                        e.map_err(|e| Error::unavailable(format_args!("kv history {key}"), e))?;
                    entries.push(match decode_doc(&e)? {
                        Some(d) => HistoryEntry {
                            revision: d.revision,
                            deleted: false,
                            doc: d.doc,
                            updated_at_ms: d.updated_at_ms,
                            hlc: d.hlc,
                        },
                        None => HistoryEntry {
                            revision: e.revision,
                            deleted: true,
                            doc: serde_json::Value::Null,
                            updated_at_ms: 0,
                            hlc: None,
                        },
                    });
                }
            }
            Err(e) => return Err(Error::unavailable(format_args!("kv history {key}"), e)),
        }
        if entries.is_empty() {
            return Err(Error::not_found(format!(
                "no state for {} in scope {}",
                req.agent_id, req.scope
            )));
        }
        Ok(StateHistory {
            agent_id: req.agent_id,
            scope: req.scope,
            entries,
        })
    }
}
