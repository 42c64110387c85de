//! What one agent may write through its own subjects: state puts at a bounded
//! rate (a token bucket per agent and replica), and documents in at most so
//! many scopes. Operators' writes (`coord.sync.state.put`) are not limited.

use std::collections::{HashMap, HashSet};

use common::msg::{StateDoc, StatePut};
use common::{AgentId, Error, ErrorCode, ScopeId};
use futures::StreamExt;

use super::{doc_key, Synchronizer};

/// One agent's token bucket: `tokens` as of `at_ms`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Bucket {
    tokens: f64,
    at_ms: u64,
}

/// The per-agent limits a replica keeps in memory.
#[derive(Default)]
pub(super) struct Limits {
    buckets: std::sync::Mutex<HashMap<AgentId, Bucket>>,
    /// Scopes in which this replica has seen (or written) an agent's document:
    /// a put there needs no count of the agent's scopes.
    known: std::sync::Mutex<HashMap<AgentId, HashSet<ScopeId>>>,
    /// New-scope puts, one at a time, so parallel ones cannot all pass the cap.
    creating: tokio::sync::Mutex<()>,
}

/// Takes a token from `bucket` (refilled at `rate` per second up to `burst`)
/// at `now_ms`; false if there is none.
fn take(bucket: &mut Bucket, rate: f64, burst: f64, now_ms: u64) -> bool {
    let elapsed = now_ms.saturating_sub(bucket.at_ms) as f64 / 1000.0;
    bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
    bucket.at_ms = bucket.at_ms.max(now_ms);
    if bucket.tokens >= 1.0 {
        bucket.tokens -= 1.0;
        true
    } else {
        false
    }
}

impl Limits {
    fn knows(&self, agent: &AgentId, scope: &ScopeId) -> bool {
        self.known
            .lock()
            .map(|m| m.get(agent).is_some_and(|s| s.contains(scope)))
            .unwrap_or(false)
    }

    fn remember(&self, agent: &AgentId, scope: &ScopeId) {
        if let Ok(mut m) = self.known.lock() {
            m.entry(agent.clone()).or_default().insert(scope.clone());
        }
    }

    /// Forgets a document that was deleted, so its scope is counted afresh.
    pub(super) fn forget(&self, agent: &AgentId, scope: &ScopeId) {
        if let Ok(mut m) = self.known.lock() {
            if let Some(s) = m.get_mut(agent) {
                s.remove(scope);
            }
        }
    }
}

impl Synchronizer {
    /// A put on the agent's own subject: within the agent's write rate and
    /// scope cap, then as any put.
    pub(super) async fn agent_put(&self, req: StatePut) -> Result<StateDoc, Error> {
        self.check_rate(&req.agent_id)?;
        if self.limits.knows(&req.agent_id, &req.scope) {
            return self.put(req).await;
        }
        let _one = self.limits.creating.lock().await;
        self.check_scopes(&req).await?;
        let (agent, scope) = (req.agent_id.clone(), req.scope.clone());
        let done = self.put(req).await;
        if done.is_ok() {
            self.limits.remember(&agent, &scope);
        }
        done
    }

    fn check_rate(&self, agent: &AgentId) -> Result<(), Error> {
        let (rate, burst) = (self.cfg.agent_put_rate, self.cfg.agent_put_burst.max(1.0));
        let now = common::now_ms();
        let admitted = {
            let mut buckets = match self.limits.buckets.lock() {
                Ok(b) => b,
                Err(poisoned) => poisoned.into_inner(),
            };
            if buckets.len() >= 4096 && !buckets.contains_key(agent) {
                // Full buckets are as good as none: forget them.
                buckets.retain(|_, b| {
                    b.tokens + (now.saturating_sub(b.at_ms) as f64 / 1000.0) * rate < burst
                });
            }
            let bucket = buckets.entry(agent.clone()).or_insert(Bucket {
                tokens: burst,
                at_ms: now,
            });
            take(bucket, rate, burst, now)
        };
        if admitted {
            return Ok(());
        }
        Err(Error::new(
            ErrorCode::RateLimited,
            format!("{agent} writes state faster than {rate} puts a second (bursts of {burst}); retry later"),
        )
        .with_details(serde_json::json!({
            "agent_id": agent,
            "rate_per_s": rate,
            "burst": burst,
        })))
    }

    /// Refuses a document in a scope where the agent has none if it already
    /// has documents in [`super::Config::agent_max_scopes`] scopes.
    async fn check_scopes(&self, req: &StatePut) -> Result<(), Error> {
        let cap = self.cfg.agent_max_scopes;
        let filter = format!("$KV.{}.*.{}", common::nats::KV_STATE, req.agent_id);
        let mut info = self
            .state_stream
            .info_with_subjects(&filter)
            .await
            .map_err(|e| Error::unavailable("state stream", e))?;
        let mut scopes = Vec::new();
        while let Some(item) = info.next().await {
            let (subject, _) = item.map_err(|e| Error::unavailable("state stream", e))?;
            let prefix = format!("$KV.{}.", common::nats::KV_STATE);
            let scope = subject
                .strip_prefix(&prefix)
                .and_then(|rest| rest.split('.').next())
                .and_then(|s| ScopeId::new(s.to_owned()).ok());
            if let Some(scope) = scope {
                scopes.push(scope);
            }
        }
        let mut live = 0usize;
        for scope in scopes {
            // A deleted document leaves a marker: its scope is free again.
            let here = matches!(
                self.entry(&doc_key(&scope, &req.agent_id)).await?,
                Some(e) if e.operation == async_nats::jetstream::kv::Operation::Put
            );
            if !here {
                continue;
            }
            if scope == req.scope {
                return Ok(());
            }
            live += 1;
        }
        if live < cap {
            return Ok(());
        }
        Err(Error::new(
            ErrorCode::QuotaExceeded,
            format!(
                "{} has documents in {live} scopes, the most an agent may have; scope {} refused",
                req.agent_id, req.scope
            ),
        )
        .with_details(serde_json::json!({
            "agent_id": req.agent_id,
            "resource": "scopes",
            "limit": cap,
            "in_use": live,
            "scope": req.scope,
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let mut b = Bucket {
            tokens: 3.0,
            at_ms: 1_000,
        };
        assert!((0..3).all(|_| take(&mut b, 2.0, 3.0, 1_000)));
        assert!(!take(&mut b, 2.0, 3.0, 1_000));
        assert!(take(&mut b, 2.0, 3.0, 1_500));
        assert!(!take(&mut b, 2.0, 3.0, 1_600));
        // Refilled to the burst at most.
        assert!((0..3).all(|_| take(&mut b, 2.0, 3.0, 60_000)));
        assert!(!take(&mut b, 2.0, 3.0, 60_000));
    }
}
