//! Sync points: a consistent cut of a set of agents' states, announced to the
//! agents, completed by their acknowledgements, restorable by rollback,
//! listable and diffable against now.
//!
//! Storage (bucket `coord_sync_points`): `sp.{id}` the record, `cut.{id}.{agent}`
//! each participant's document in the cut (kept here because the state
//! bucket's history of 64 per key would eventually lose it), and
//! `ack.{notice}.{agent}` one acknowledgement per key so a thousand agents
//! acknowledging at once never contend on one entry.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::msg::{
    AgentDiff, EventKind, NoticeKind, RollbackRecord, RollbackReport, StateDoc, SyncAck, SyncPoint,
    SyncPointDiff, SyncPointInitiate, SyncPointList, SyncPointListRequest, SyncPointRef,
    SyncPointState, SyncPointWait,
};
use common::nats::{self as bus, Step, Written, CAS_ATTEMPTS};
use common::{subject, AgentId, Error, ErrorCode, ScopeId, SyncPointId};
use futures::{StreamExt, TryStreamExt};

use super::consistency::check_agents;
use super::{ack_results, decode_doc, doc_key, encode, notices, AckRecord, Synchronizer, FAN_OUT};
use crate::machine::{diff, syncpoint};

fn point_key(id: &SyncPointId) -> String {
    format!("sp.{id}")
}

fn cut_key(id: &SyncPointId, agent: &AgentId) -> String {
    format!("cut.{id}.{agent}")
}

/// Stores the first value of `key`, under a fresh sync point id: taken, it
/// fails like any other write that did not happen.
async fn create(
    kv: &async_nats::jetstream::kv::Store,
    key: &str,
    body: bytes::Bytes,
) -> Result<u64, Error> {
    match bus::write_at(kv, key, body, None).await? {
        Written::Stored(rev) => Ok(rev),
        Written::Lost => Err(Error::new(
            ErrorCode::Unavailable,
            format!("kv create {key}: already exists"),
        )),
    }
}

/// Stores each acknowledgement agents publish on `coord.agents.{id}.sync.ack`.
/// The agent is the one in the subject (what NATS permissions vouch for).
pub(super) async fn store_acks(sync: Arc<Synchronizer>, mut acks: async_nats::Subscriber) {
    while let Some(msg) = acks.next().await {
        let Some(agent) = subject::agent_of(&msg.subject) else {
            continue;
        };
        let ack: SyncAck = match serde_json::from_slice(&msg.payload) {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(error = %e, %agent, "unreadable acknowledgement dropped");
                continue;
            }
        };
        let sync = sync.clone();
        tokio::spawn(async move {
            let key = format!("ack.{}.{agent}", ack.notice_id);
            let rec = AckRecord {
                revision: ack.revision,
                at_ms: common::now_ms(),
            };
            let stored = bus::cas_update::<AckRecord, (), _>(&sync.points, &key, move |_| {
                Ok(Step::Write(rec.clone(), ()))
            })
            .await;
            if let Err(e) = stored {
                tracing::warn!(error = %e, %agent, "acknowledgement not stored");
            }
        });
    }
}

impl Synchronizer {
    async fn load_point(&self, id: &SyncPointId) -> Result<(SyncPoint, u64), Error> {
        bus::get_json::<SyncPoint>(&self.points, &point_key(id))
            .await?
            .ok_or_else(|| Error::not_found(format!("no sync point {id}")))
    }

    /// Each participant's document as of stream sequence `sequence`.
    async fn cut_at(
        &self,
        scope: &ScopeId,
        agent: AgentId,
        sequence: u64,
    ) -> Result<(AgentId, Option<StateDoc>), Error> {
        let key = doc_key(scope, &agent);
        let latest = self.entry(&key).await?;
        let Some(latest) = latest else {
            return Ok((agent, None));
        };
        if latest.revision <= sequence {
            return Ok((agent, decode_doc(&latest)?));
        }
        // Written after the cut: find the revision the cut saw in the history.
        let history: Vec<async_nats::jetstream::kv::Entry> = self
            .state
            .history(&key)
            .await
            .map_err(|e| Error::unavailable(format_args!("kv history {key}"), e))?
            .try_collect()
            .await
            .map_err(|e| Error::unavailable(format_args!("kv history {key}"), e))?;
        let revisions: Vec<u64> = history.iter().map(|e| e.revision).collect();
        let Some(rev) = syncpoint::revision_at(&revisions, sequence) else {
            return Err(Error::new(
                ErrorCode::Conflict,
                format!("{agent} wrote more than its history keeps while the cut was taken; retry"),
            ));
        };
        let entry = history.iter().find(|e| e.revision == rev);
        Ok((agent, entry.map(decode_doc).transpose()?.flatten()))
    }

    pub(super) async fn initiate(&self, req: SyncPointInitiate) -> Result<SyncPoint, Error> {
        check_agents(&req.agents)?;
        // The cut: the state bucket's stream as of one sequence number.
        let sequence = self
            .state
            .stream
            .get_info()
            .await
            .map_err(|e| Error::unavailable("state stream info", e))?
            .state
            .last_sequence;
        let scope = &req.scope;
        let cut: Vec<(AgentId, Option<StateDoc>)> =
            futures::stream::iter(req.agents.iter().cloned())
                .map(|agent| self.cut_at(scope, agent, sequence))
                .buffer_unordered(FAN_OUT)
                .try_collect()
                .await?;
        let missing: Vec<&AgentId> = cut
            .iter()
            .filter(|(_, d)| d.is_none())
            .map(|(a, _)| a)
            .collect();
        if !missing.is_empty() {
            return Err(Error::not_found(format!(
                "no state in scope {scope} for {}",
                missing
                    .iter()
                    .map(|a| a.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
            .with_details(serde_json::json!({ "missing": missing })));
        }
        let docs: Vec<StateDoc> = cut.into_iter().filter_map(|(_, d)| d).collect();
        let id = SyncPointId::random();
        futures::stream::iter(docs.clone())
            .map(|d| {
                let id = id.clone();
                async move { create(&self.points, &cut_key(&id, &d.agent_id), encode(&d)?).await }
            })
            .buffer_unordered(FAN_OUT)
            .try_collect::<Vec<u64>>()
            .await?;
        let sp = SyncPoint {
            id: id.clone(),
            scope: scope.clone(),
            label: req.label.clone(),
            state: SyncPointState::Initiated,
            sequence,
            cut: docs
                .iter()
                .map(|d| (d.agent_id.clone(), d.revision))
                .collect(),
            acked: BTreeMap::new(),
            missing: Vec::new(),
            created_at_ms: common::now_ms(),
            completed_at_ms: None,
            rollbacks: Vec::new(),
        };
        create(&self.points, &point_key(&id), encode(&sp)?).await?;
        self.events
            .publish(EventKind::SyncPointInitiated {
                sync_point_id: id.clone(),
                scope: scope.clone(),
                participants: sp.cut.len(),
                sequence,
            })
            .await;
        self.notify(notices(&id, NoticeKind::SyncPoint, scope, docs))
            .await;
        Ok(sp)
    }

    pub(super) async fn complete(&self, req: SyncPointWait) -> Result<SyncPoint, Error> {
        let (sp, _) = self.load_point(&req.sync_point_id).await?;
        let timeout = Duration::from_millis(req.timeout_ms);
        let acked = self.wait_acks(&sp.id, &sp.cut, timeout).await?;
        let now = common::now_ms();
        let (done, _) = bus::cas_update::<SyncPoint, SyncPoint, _>(
            &self.points,
            &point_key(&sp.id),
            |current| {
                let Some(mut current) = current else {
                    return Err(Error::not_found(format!(
                        "no sync point {}",
                        req.sync_point_id
                    )));
                };
                syncpoint::complete(&mut current, &acked, now);
                Ok(Step::Write(current.clone(), current))
            },
        )
        .await?;
        self.events
            .publish(EventKind::SyncPointCompleted {
                sync_point_id: done.id.clone(),
                state: done.state,
                missing: done.missing.clone(),
            })
            .await;
        Ok(done)
    }

    /// Writes one participant's cut document back as a new revision.
    async fn restore(&self, sp: &SyncPoint, agent: &AgentId) -> Result<(StateDoc, bool), Error> {
        let (cut, _) = bus::get_json::<StateDoc>(&self.points, &cut_key(&sp.id, agent))
            .await?
            .ok_or_else(|| {
                Error::internal(format!("sync point {} lost the cut of {agent}", sp.id))
            })?;
        let key = doc_key(&sp.scope, agent);
        for _ in 0..CAS_ATTEMPTS {
            let entry = self.entry(&key).await?;
            let next = StateDoc {
                hlc: Some(self.now_hlc()),
                updated_at_ms: common::now_ms(),
                ..cut.clone()
            };
            let Some(revision) = self
                .cas_write(&key, &next, entry.as_ref().map(|e| e.revision))
                .await?
            else {
                continue;
            };
            // Read back what was stored at that revision: the verification
            // does not trust the write's own echo.
            let stored = self.doc_at(&key, revision).await?.flatten();
            let verified = stored.as_ref().is_some_and(|s| s.doc == cut.doc);
            return Ok((StateDoc { revision, ..next }, verified));
        }
        Err(bus::contention(&key))
    }

    pub(super) async fn rollback(&self, req: SyncPointWait) -> Result<RollbackReport, Error> {
        let (sp, _) = self.load_point(&req.sync_point_id).await?;
        let participants: Vec<AgentId> = sp.cut.keys().cloned().collect();
        let restored: Vec<(StateDoc, bool)> = futures::stream::iter(participants)
            .map(|agent| {
                let sp = &sp;
                async move { self.restore(sp, &agent).await }
            })
            .buffer_unordered(FAN_OUT)
            .try_collect()
            .await?;
        let mismatches: Vec<AgentId> = restored
            .iter()
            .filter(|(_, ok)| !ok)
            .map(|(d, _)| d.agent_id.clone())
            .collect();
        let verified = mismatches.is_empty();
        let expected: BTreeMap<AgentId, u64> = restored
            .iter()
            .map(|(d, _)| (d.agent_id.clone(), d.revision))
            .collect();
        let notice_id = SyncPointId::random();
        self.notify(notices(
            &notice_id,
            NoticeKind::Rollback,
            &sp.scope,
            restored.into_iter().map(|(d, _)| d),
        ))
        .await;
        let timeout = Duration::from_millis(req.timeout_ms);
        let acked = if req.timeout_ms == 0 {
            BTreeMap::new()
        } else {
            self.wait_acks(&notice_id, &expected, timeout).await?
        };
        let agents = ack_results(&expected, &acked, timeout);
        let record = RollbackRecord {
            notice_id: notice_id.clone(),
            at_ms: common::now_ms(),
            revisions: expected.clone(),
            verified,
        };
        bus::cas_update::<SyncPoint, (), _>(&self.points, &point_key(&sp.id), |current| {
            let Some(mut current) = current else {
                return Err(Error::not_found(format!("no sync point {}", sp.id)));
            };
            current.rollbacks.push(record.clone());
            Ok(Step::Write(current, ()))
        })
        .await?;
        let unacked: Vec<AgentId> = agents
            .iter()
            .filter(|r| !r.acked)
            .map(|r| r.agent_id.clone())
            .collect();
        self.events
            .publish(EventKind::SyncPointRolledBack {
                sync_point_id: sp.id.clone(),
                participants: expected.len(),
                verified,
                unacked,
            })
            .await;
        Ok(RollbackReport {
            sync_point_id: sp.id,
            notice_id,
            verified,
            mismatches,
            agents,
        })
    }

    pub(super) async fn list(&self, req: SyncPointListRequest) -> Result<SyncPointList, Error> {
        // `unknown` stands for states newer than this build; as a filter it is
        // a typo that would silently match nothing.
        if req.state == Some(common::msg::SyncPointState::Unknown) {
            return Err(Error::bad_request("unknown sync point state"));
        }
        let keys = bus::keys(&self.points).await?;
        let mut points: Vec<SyncPoint> =
            futures::stream::iter(keys.into_iter().filter(|k| k.starts_with("sp.")))
                .map(|k| async move { bus::get_json::<SyncPoint>(&self.points, &k).await })
                .buffer_unordered(FAN_OUT)
                .try_collect::<Vec<_>>()
                .await?
                .into_iter()
                .flatten()
                .map(|(sp, _)| sp)
                .filter(|sp| req.scope.as_ref().is_none_or(|s| *s == sp.scope))
                .filter(|sp| req.state.is_none_or(|s| s == sp.state))
                .collect();
        points.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        Ok(SyncPointList {
            sync_points: points.iter().map(syncpoint::summary).collect(),
        })
    }

    pub(super) async fn get_point(&self, req: SyncPointRef) -> Result<SyncPoint, Error> {
        Ok(self.load_point(&req.sync_point_id).await?.0)
    }

    pub(super) async fn diff(&self, req: SyncPointRef) -> Result<SyncPointDiff, Error> {
        let (sp, _) = self.load_point(&req.sync_point_id).await?;
        let cut: Vec<(AgentId, u64)> = sp.cut.iter().map(|(a, r)| (a.clone(), *r)).collect();
        let agents: Vec<AgentDiff> = futures::stream::iter(cut)
            .map(|(agent, cut_rev)| {
                let sp = &sp;
                async move {
                    let cut = bus::get_json::<StateDoc>(&self.points, &cut_key(&sp.id, &agent))
                        .await?
                        .map(|(d, _)| d.doc);
                    let now = match self.entry(&doc_key(&sp.scope, &agent)).await? {
                        Some(e) => decode_doc(&e)?,
                        None => None,
                    };
                    Ok::<_, Error>(AgentDiff {
                        agent_id: agent.clone(),
                        cut_revision: cut_rev,
                        current_revision: now.as_ref().map_or(0, |d| d.revision),
                        changes: diff::diff(cut.as_ref(), now.as_ref().map(|d| &d.doc)),
                    })
                }
            })
            .buffered(FAN_OUT)
            .try_collect()
            .await?;
        let unchanged = agents.iter().all(|a| a.changes.is_empty());
        Ok(SyncPointDiff {
            sync_point_id: sp.id,
            agents,
            unchanged,
        })
    }
}
