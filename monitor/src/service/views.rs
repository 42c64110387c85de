//! The dashboard's views: a page of flows, one flow, one agent. Flows are
//! read from the watch-fed `board`; the bucket itself only while the board
//! cannot answer.

use common::msg::{FlowState, TaskState};
use common::nats as bus;
use common::Error;
use serde_json::Value;

use super::board::Head;
use super::{probe, Shared};

impl Shared {
    /// Every flow's head, from the board or (while it cannot answer) read
    /// from the bucket, with the records read on the way.
    async fn heads(&self) -> Result<(Vec<(String, Head)>, Option<Vec<(String, Value)>>), Error> {
        if let Some(heads) = self.board.heads() {
            return Ok((heads, None));
        }
        let records = probe::flow_records(&self.js).await?;
        let heads = records
            .iter()
            .map(|(id, f)| {
                (
                    id.clone(),
                    serde_json::from_value(f.clone()).unwrap_or_default(),
                )
            })
            .collect();
        Ok((heads, Some(records)))
    }

    /// The full records of `ids` (pages folded in).
    async fn flow_records(
        &self,
        ids: &[String],
        read: Option<Vec<(String, Value)>>,
    ) -> Result<Vec<(String, Value)>, Error> {
        let all = match read.or_else(|| self.board.records(ids)) {
            Some(r) => r,
            None => probe::flow_records(&self.js).await?,
        };
        let mut by_id: std::collections::HashMap<String, Value> = all.into_iter().collect();
        Ok(ids
            .iter()
            .filter_map(|id| by_id.remove(id).map(|f| (id.clone(), f)))
            .collect())
    }

    /// A page of flows with their tasks, newest first, and agents with their
    /// utilisation and status, for the dashboard.
    pub(super) async fn flows_view(&self, query: &FlowQuery) -> Result<Value, Error> {
        let (heads, read) = self.heads().await?;
        let source = if read.is_none() { "watch" } else { "bucket" };
        let needle = query
            .q
            .as_deref()
            .map(str::to_lowercase)
            .unwrap_or_default();
        let mut heads: Vec<(String, Head)> = heads
            .into_iter()
            .filter(|(id, h)| {
                let name = h.name.as_deref().unwrap_or_default();
                query
                    .state
                    .as_deref()
                    .is_none_or(|s| s.is_empty() || s == h.state)
                    && (needle.is_empty()
                        || id.to_lowercase().contains(&needle)
                        || name.to_lowercase().contains(&needle))
            })
            .collect();
        heads.sort_by(|a, b| {
            b.1.created_at_ms
                .cmp(&a.1.created_at_ms)
                .then_with(|| a.0.cmp(&b.0))
        });
        let total = heads.len();
        let (offset, limit) = query.page();
        let ids: Vec<String> = heads
            .into_iter()
            .skip(offset)
            .take(limit)
            .map(|(id, _)| id)
            .collect();
        let flows: Vec<Value> = self
            .flow_records(&ids, read)
            .await?
            .into_iter()
            .map(|(id, f)| {
                let tasks: Vec<Value> = f
                    .get("tasks")
                    .and_then(Value::as_object)
                    .into_iter()
                    .flatten()
                    .map(|(tid, t)| {
                        serde_json::json!({
                            "id": tid,
                            "state": t.get("state"),
                            "agent": t.get("agent"),
                            "attempt": t.get("attempt"),
                            "progress": t.get("progress"),
                            "progress_message": t.get("progress_message"),
                            "kind": t.pointer("/spec/kind"),
                            "depends_on": t.pointer("/spec/depends_on"),
                        })
                    })
                    .collect();
                serde_json::json!({
                    "id": id,
                    "name": f.get("name"),
                    "state": f.get("state"),
                    "created_at_ms": f.get("created_at_ms"),
                    "tasks": tasks,
                })
            })
            .collect();
        let (agents, agent_status) = match self.capacity().await {
            Ok(cap) => (
                serde_json::to_value(&cap.agents).unwrap_or(Value::Null),
                serde_json::to_value(&cap.agent_status).unwrap_or(Value::Null),
            ),
            Err(_) => (Value::Null, Value::Null),
        };
        Ok(serde_json::json!({
            "flows": flows,
            "total": total,
            "source": source,
            "offset": offset,
            "limit": limit,
            "agents": agents,
            "agent_status": agent_status,
        }))
    }

    /// One flow as the orchestrator tells it (each task's state, attempts,
    /// agent, output, error, progress) with its spec (the tasks' inputs).
    pub(super) async fn flow_view(&self, id: &str) -> Result<Value, Error> {
        let id = common::FlowId::new(id)?;
        let ids = [id.as_str().to_owned()];
        let (status, spec, record) = tokio::join!(
            self.client.flow_status(&id),
            self.client.flow_get(&id),
            self.flow_records(&ids, None)
        );
        let timeline = record
            .ok()
            .and_then(|r| r.into_iter().next())
            .map(|(_, f)| timeline(&f))
            .unwrap_or_default();
        Ok(serde_json::json!({ "status": status?, "spec": spec.ok(), "timeline": timeline }))
    }

    /// One agent: its registration and status, its last heartbeat and how
    /// long ago, its utilisation per resource, and the tasks it runs now.
    pub(super) async fn agent_view(&self, id: &str) -> Result<Value, Error> {
        let agent = common::AgentId::new(id)?;
        let key = agent.as_str();
        let kv = |bucket: &'static str| async move {
            let store = self.js.get_key_value(bucket).await.ok()?;
            let entry = store.get(key).await.ok()??;
            serde_json::from_slice::<Value>(&entry).ok()
        };
        let (info, cap, flows) =
            tokio::join!(kv(bus::KV_AGENTS), self.capacity(), self.live_flows());
        let cap = cap?;
        if info.is_none() && !cap.agent_status.contains_key(&agent) {
            return Err(Error::not_found(format!("no agent {agent}")));
        }
        let now = common::now_ms();
        let beat_ms = cap.last_heartbeat_ms.get(&agent).copied();
        let running: Vec<Value> = flows?
            .iter()
            .flat_map(|(flow, f)| {
                f.get("tasks")
                    .and_then(Value::as_object)
                    .into_iter()
                    .flatten()
                    .filter(|(_, t)| {
                        t.get("agent").and_then(Value::as_str) == Some(agent.as_str())
                            && t.get("state")
                                .and_then(Value::as_str)
                                .is_some_and(|s| s.parse().is_ok_and(TaskState::is_active))
                    })
                    .map(move |(task, t)| {
                        serde_json::json!({
                            "flow_id": flow,
                            "task_id": task,
                            "state": t.get("state"),
                            "attempt": t.get("attempt"),
                            "progress": t.get("progress"),
                        })
                    })
            })
            .collect();
        Ok(serde_json::json!({
            "agent_id": agent,
            "status": cap.agent_status.get(&agent),
            "info": info,
            "last_heartbeat_ms": beat_ms,
            "heartbeat_age_ms": beat_ms.map(|b| now.saturating_sub(b)),
            "resources": cap.agents.get(&agent),
            "running": running,
        }))
    }
}

impl Shared {
    /// The records of every flow still running or paused: only they have
    /// tasks on agents.
    async fn live_flows(&self) -> Result<Vec<(String, Value)>, Error> {
        let (heads, read) = self.heads().await?;
        let ids: Vec<String> = heads
            .into_iter()
            .filter(|(_, h)| h.state.parse().is_ok_and(|s: FlowState| !s.is_terminal()))
            .map(|(id, _)| id)
            .collect();
        self.flow_records(&ids, read).await
    }
}

/// Every attempt of every task of a stored flow, as bars of a timeline: when
/// it was assigned, started and ended (none yet while it runs), on which
/// agent, and how it ended. Tasks never assigned have none.
fn timeline(flow: &Value) -> Vec<Value> {
    let mut bars = Vec::new();
    let tasks = flow.get("tasks").and_then(Value::as_object);
    for (task, t) in tasks.into_iter().flatten() {
        let history = t.get("history").and_then(Value::as_array);
        let ended = |attempt: Option<&Value>| {
            history
                .into_iter()
                .flatten()
                .any(|h| h.get("attempt") == attempt)
        };
        for h in history.into_iter().flatten() {
            // Stored as "failed: why"; the bar's class is the first word.
            let said = h.get("outcome").and_then(Value::as_str).unwrap_or_default();
            let outcome = said.split(':').next().unwrap_or_default().trim();
            bars.push(serde_json::json!({
                "task_id": task,
                "attempt": h.get("attempt"),
                "agent_id": h.get("agent"),
                "assigned_ms": h.get("assigned_ms"),
                "started_ms": h.get("started_ms"),
                "ended_ms": h.get("ended_ms"),
                "outcome": outcome,
                "detail": said,
            }));
        }
        let state = t.get("state").and_then(Value::as_str).unwrap_or_default();
        // The attempt under way, unless its end is already in the history.
        let Some(assigned) = t.get("assigned_ms").and_then(Value::as_u64) else {
            continue;
        };
        if ended(t.get("attempt")) {
            continue;
        }
        let done = state.parse().is_ok_and(TaskState::is_terminal);
        bars.push(serde_json::json!({
            "task_id": task,
            "attempt": t.get("attempt"),
            "agent_id": t.get("agent"),
            "assigned_ms": assigned,
            "started_ms": t.get("started_ms"),
            "ended_ms": if done { t.get("since_ms").cloned() } else { None },
            "outcome": state,
        }));
    }
    bars
}

/// `GET /api/flows` parameters: a state, a search over ids and names, a page.
#[derive(Debug, Default, serde::Deserialize)]
pub(super) struct FlowQuery {
    state: Option<String>,
    q: Option<String>,
    offset: Option<usize>,
    limit: Option<usize>,
}

impl FlowQuery {
    /// Flows per page unless asked, and at most.
    const LIMIT: usize = 50;
    const MAX_LIMIT: usize = 500;

    fn page(&self) -> (usize, usize) {
        let limit = self.limit.unwrap_or(Self::LIMIT).clamp(1, Self::MAX_LIMIT);
        (self.offset.unwrap_or(0), limit)
    }
}
