//! The dashboard's views: a page of flows, one flow, one agent.

use common::nats as bus;
use common::Error;
use serde_json::Value;

use super::{probe, Shared};

impl Shared {
    /// A page of flows with their tasks, newest first, and agents with their
    /// utilisation and status, for the dashboard.
    pub(super) async fn flows_view(&self, query: &FlowQuery) -> Result<Value, Error> {
        let flows = probe::flow_records(&self.js).await?;
        let needle = query
            .q
            .as_deref()
            .map(str::to_lowercase)
            .unwrap_or_default();
        let mut flows: Vec<Value> = flows
            .into_iter()
            .filter(|(id, f)| {
                let state = f.get("state").and_then(Value::as_str).unwrap_or_default();
                let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
                query
                    .state
                    .as_deref()
                    .is_none_or(|s| s.is_empty() || s == state)
                    && (needle.is_empty()
                        || id.to_lowercase().contains(&needle)
                        || name.to_lowercase().contains(&needle))
            })
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
        flows.sort_by_key(|f| std::cmp::Reverse(f["created_at_ms"].as_u64().unwrap_or(0)));
        let total = flows.len();
        let (offset, limit) = query.page();
        let flows: Vec<Value> = flows.into_iter().skip(offset).take(limit).collect();
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
        let (status, spec) = tokio::join!(self.client.flow_status(&id), self.client.flow_get(&id));
        Ok(serde_json::json!({ "status": status?, "spec": spec.ok() }))
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
        let (info, beat, cap, flows) = tokio::join!(
            kv(bus::KV_AGENTS),
            kv(bus::KV_HEARTBEATS),
            self.capacity(),
            probe::flow_records(&self.js)
        );
        let cap = cap?;
        if info.is_none() && !cap.agent_status.contains_key(&agent) {
            return Err(Error::not_found(format!("no agent {agent}")));
        }
        let now = common::now_ms();
        let beat_ms = beat.as_ref().and_then(|b| b["at_ms"].as_u64());
        let running: Vec<Value> = flows?
            .iter()
            .flat_map(|(flow, f)| {
                f.get("tasks")
                    .and_then(Value::as_object)
                    .into_iter()
                    .flatten()
                    .filter(|(_, t)| {
                        t.get("agent").and_then(Value::as_str) == Some(agent.as_str())
                            && matches!(
                                t.get("state").and_then(Value::as_str),
                                Some("assigned" | "running")
                            )
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
