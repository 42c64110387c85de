//! The JetStream API calls of an agent on an isolating server that the
//! server cannot confine by subject: creating its assignment consumer and
//! reading the assignment stream's info (docs/SECURITY.md).
//!
//! A consumer's request body chooses where a push consumer delivers: made in
//! the services' account, it would publish the agent's assignments on any
//! subject there (a KV bucket, `$JS.API.…`). And a stream info request with
//! `subjects_filter` lists every agent's subject. So an agent's account
//! imports these two subjects from the allocator instead of JetStream
//! (deploy/agent-user.sh), and the allocator asks JetStream itself: for a
//! pull consumer named after the agent, on the agent's own assignments,
//! explicitly acknowledged; for the stream's info without per-subject counts.
//! The answers are JetStream's own, so clients need no change.

use common::nats::{agent_consumer, STREAM_ASSIGN};
use common::service::ReplyPrefixes;
use common::subject;
use common::AgentId;
use futures::StreamExt;
use serde_json::{json, Map, Value};

/// The queue group of the allocators' JetStream endpoints.
const QUEUE: &str = "allocator-jetstream";
/// Most deliveries an agent's consumer may hold unacknowledged.
pub(super) const MAX_ACK_PENDING: i64 = 1024;
/// Most pull requests waiting on an agent's consumer.
const MAX_WAITING: i64 = 64;
/// Consumer settings an agent chooses; any other it sends is dropped.
const AGENT_SETTINGS: &[&str] = &[
    "description",
    "ack_wait",
    "max_ack_pending",
    "max_deliver",
    "max_waiting",
    "max_batch",
    "max_expires",
    "max_bytes",
    "backoff",
    "deliver_policy",
    "opt_start_seq",
    "opt_start_time",
    "replay_policy",
    "headers_only",
    "metadata",
];

#[derive(Clone, Copy)]
enum Call {
    CreateConsumer,
    StreamInfo,
    AccountInfo,
}

/// Serves the three endpoints until the connection closes.
pub(super) async fn serve(
    nats: async_nats::Client,
    replies: ReplyPrefixes,
) -> Result<tokio::task::JoinSet<()>, async_nats::SubscribeError> {
    let mut tasks = tokio::task::JoinSet::new();
    for (on, call) in [
        (subject::CONSUMER_CREATE_ALL, Call::CreateConsumer),
        (subject::ASSIGN_INFO_ALL, Call::StreamInfo),
        (subject::ACCOUNT_INFO_ALL, Call::AccountInfo),
    ] {
        let mut requests = nats.queue_subscribe(on, QUEUE.to_owned()).await?;
        let (nats, replies) = (nats.clone(), replies.clone());
        tasks.spawn(async move {
            while let Some(msg) = requests.next().await {
                let (Some(reply), Some(agent)) = (msg.reply.clone(), subject::agent_of(&msg.subject))
                else {
                    continue;
                };
                if !replies.allows(&reply) {
                    tracing::warn!(subject = %msg.subject, %reply, "JetStream request dropped: its reply subject is no inbox");
                    continue;
                }
                let nats = nats.clone();
                tokio::spawn(async move {
                    let answer = match call {
                        Call::CreateConsumer => create_consumer(&nats, &agent, &msg.payload).await,
                        Call::StreamInfo => stream_info(&nats).await,
                        Call::AccountInfo => api_error(
                            "io.nats.jetstream.api.v1.account_info_response",
                            503,
                            "JetStream account info is not available to agents",
                        ),
                    };
                    if let Err(e) = nats.publish(reply, answer.into()).await {
                        tracing::debug!(error = %e, "JetStream answer not sent");
                    }
                });
            }
        });
    }
    Ok(tasks)
}

/// JetStream's answer to making `agent`'s consumer as `request` asks, within
/// what an agent may choose.
async fn create_consumer(nats: &async_nats::Client, agent: &AgentId, request: &[u8]) -> Vec<u8> {
    const KIND: &str = "io.nats.jetstream.api.v1.consumer_create_response";
    let request: Value = match serde_json::from_slice(request) {
        Ok(v) => v,
        Err(e) => return api_error(KIND, 400, &format!("invalid request: {e}")),
    };
    let config = match consumer_config(agent, &request["config"]) {
        Ok(c) => c,
        Err(why) => return api_error(KIND, 403, &why),
    };
    let mut body = json!({ "stream_name": STREAM_ASSIGN, "config": config });
    if let Some(action) = request.get("action").filter(|a| a.is_string()) {
        body["action"] = action.clone();
    }
    let on = format!(
        "$JS.API.CONSUMER.CREATE.{STREAM_ASSIGN}.{}.{}",
        agent_consumer(agent),
        subject::assign(agent)
    );
    relay(nats, KIND, on, body.to_string()).await
}

/// The configuration the allocator makes for `agent` from the one it asked for.
fn consumer_config(agent: &AgentId, asked: &Value) -> Result<Value, String> {
    let asked = asked.as_object().cloned().unwrap_or_default();
    let set = |k: &str| asked.get(k).is_some_and(|v| !v.is_null() && v != "");
    if set("deliver_subject") || set("deliver_group") {
        return Err(
            "an agent's consumer is a pull consumer: deliver_subject is not allowed".into(),
        );
    }
    let name = agent_consumer(agent);
    for key in ["durable_name", "name"] {
        if set(key) && asked[key] != name.as_str() {
            return Err(format!("an agent's consumer is named {name}"));
        }
    }
    let own = subject::assign(agent);
    let filters = asked.get("filter_subjects").and_then(Value::as_array);
    if (set("filter_subject") && asked["filter_subject"] != own.as_str())
        || filters.is_some_and(|f| f.iter().any(|s| s != own.as_str()))
    {
        return Err(format!("an agent's consumer reads only {own}"));
    }
    let mut config: Map<String, Value> = asked
        .into_iter()
        .filter(|(k, _)| AGENT_SETTINGS.contains(&k.as_str()))
        .collect();
    let cap = |config: &mut Map<String, Value>, key: &str, max: i64| {
        let n = config.get(key).and_then(Value::as_i64);
        if n.is_none_or(|n| n <= 0 || n > max) {
            config.insert(key.into(), max.into());
        }
    };
    cap(&mut config, "max_ack_pending", MAX_ACK_PENDING);
    cap(&mut config, "max_waiting", MAX_WAITING);
    config.insert("durable_name".into(), name.into());
    config.insert("filter_subject".into(), own.into());
    config.insert("ack_policy".into(), "explicit".into());
    Ok(Value::Object(config))
}

/// The assignment stream's info as JetStream gives it to a plain request,
/// which lists no subjects.
async fn stream_info(nats: &async_nats::Client) -> Vec<u8> {
    const KIND: &str = "io.nats.jetstream.api.v1.stream_info_response";
    let on = format!("$JS.API.STREAM.INFO.{STREAM_ASSIGN}");
    relay(nats, KIND, on, String::new()).await
}

async fn relay(nats: &async_nats::Client, kind: &str, on: String, body: String) -> Vec<u8> {
    match nats.request(on, body.into()).await {
        Ok(answer) => answer.payload.to_vec(),
        Err(e) => api_error(kind, 503, &format!("JetStream did not answer: {e}")),
    }
}

/// A JetStream API error, as JetStream would send it.
fn api_error(kind: &str, code: u16, description: &str) -> Vec<u8> {
    json!({
        "type": kind,
        "error": { "code": code, "err_code": 10000 + u32::from(code), "description": description },
    })
    .to_string()
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent() -> AgentId {
        AgentId::new("a1").unwrap()
    }

    #[test]
    fn a_pull_consumer_on_the_agents_own_subject_is_made_as_asked_within_caps() {
        let asked = json!({
            "durable_name": "agent-a1", "filter_subject": "coord.agents.a1.assign",
            "ack_policy": "none", "ack_wait": 300_000_000_000u64, "max_ack_pending": 4,
            "mem_storage": true, "num_replicas": 5, "max_waiting": 100_000,
        });
        let made = consumer_config(&agent(), &asked).unwrap();
        assert_eq!(
            made,
            json!({
                "durable_name": "agent-a1", "filter_subject": "coord.agents.a1.assign",
                "ack_policy": "explicit", "ack_wait": 300_000_000_000u64, "max_ack_pending": 4,
                "max_waiting": MAX_WAITING,
            })
        );
    }

    #[test]
    fn push_consumers_other_names_and_other_subjects_are_refused() {
        for asked in [
            json!({"deliver_subject": "coord.events.injected.push"}),
            json!({"deliver_group": "g"}),
            json!({"durable_name": "agent-b"}),
            json!({"name": "x"}),
            json!({"filter_subject": "coord.agents.b.assign"}),
            json!({"filter_subjects": ["coord.agents.a1.assign", ">"]}),
        ] {
            assert!(consumer_config(&agent(), &asked).is_err(), "{asked}");
        }
        assert!(consumer_config(&agent(), &json!({"deliver_subject": ""})).is_ok());
    }
}
