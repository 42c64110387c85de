//! NATS micro-service plumbing: every request/reply API of every service goes
//! through [`Service::serve`], so decoding, size limits, error replies, tracing
//! and concurrency are the same everywhere.
//!
//! Each service registers under its own name, so `$SRV.PING`, `$SRV.INFO` and
//! `$SRV.STATS` answer per service; replicas share the default queue group and
//! split the requests between them.
//!
//! What an agent asks about itself is served on a per-agent wildcard
//! ([`Service::serve_agent`]): the agent is the one the subject names, which
//! the server's permissions can confine, so an agent cannot act for another.
//!
//! Replies go only to inboxes ([`ReplyPrefixes`]). The server does not check a
//! reply subject against the requester's permissions, and the services may
//! publish anywhere, so answering any reply subject would let an agent have
//! a service write, on its behalf, to a KV bucket or another agent's subjects.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::service::{Service as NatsService, ServiceExt};
use async_nats::HeaderMap;
use futures::StreamExt;
use serde::{de::DeserializeOwned, Serialize};
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::error::{Error, ErrorCode};
use crate::id::AgentId;
use crate::msg::{
    DeregisterAgent, LeaveAgent, RegisterAgent, StateDelete, StateGet, StateHistoryRequest,
    StatePut,
};
use crate::{subject, telemetry};

/// Largest request body accepted, in bytes (NATS's default `max_payload`).
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;
/// Requests handled at once per endpoint per replica; more wait in the subscription.
pub const MAX_IN_FLIGHT: usize = 1024;
/// Version every coordkit service reports.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

mod health;
mod main;
use health::write_instance_file;
pub use health::{healthcheck, ping};
pub use main::{main, Shutdown};

/// Environment variable naming a file where a service writes its instance id.
pub const INSTANCE_FILE_ENV: &str = "COORD_INSTANCE_FILE";

/// Environment variable with extra reply-subject prefixes the services answer
/// (comma-separated, e.g. `_REPLIES,_OPS`), for clients whose inbox prefix is
/// neither `_INBOX` nor `_INBOX_{id}`.
pub const REPLY_PREFIXES_ENV: &str = "COORD_REPLY_PREFIXES";

/// At most one warning per endpoint this often about refused reply subjects;
/// the count in `$SRV.STATS` keeps every one.
const REFUSAL_WARN_EVERY: Duration = Duration::from_secs(10);

/// What `$SRV.STATS` reports per endpoint beyond the built-in counters
/// (`num_errors` and `last_error` count failures only, see
/// [`ErrorCode::is_failure`]).
#[derive(Default)]
struct EndpointCounts {
    /// Every error reply, refusals included.
    error_replies: u64,
    /// Error replies per code (at most one entry per [`ErrorCode`]).
    errors_by_code: BTreeMap<&'static str, u64>,
    last_error_code: Option<ErrorCode>,
    /// Requests dropped unanswered because their reply subject is no inbox.
    refused_replies: u64,
    last_warned: Option<Instant>,
}

type Counts = Arc<Mutex<HashMap<String, EndpointCounts>>>;

/// The reply subjects a service answers: inboxes, `_INBOX.…` (the default of
/// every NATS client), `_INBOX_{id}.…` (an isolated agent's) and `_R_.…` (a
/// request from another account, mapped by the server), plus any
/// prefix listed in [`REPLY_PREFIXES_ENV`]. Anything else (`$KV.…`,
/// `coord.…`, `$JS.…`) would be a write on the requester's behalf.
#[derive(Clone, Debug, Default)]
pub struct ReplyPrefixes {
    extra: Vec<String>,
}

impl ReplyPrefixes {
    /// The inboxes plus the prefixes in [`REPLY_PREFIXES_ENV`].
    pub fn from_env() -> Self {
        let listed = std::env::var(REPLY_PREFIXES_ENV).unwrap_or_default();
        Self::with_extra(listed.split(','))
    }

    /// The inboxes plus `extra` (each a subject prefix, its own tokens whole).
    pub fn with_extra<'a>(extra: impl IntoIterator<Item = &'a str>) -> Self {
        let extra = extra
            .into_iter()
            .map(|p| p.trim().trim_end_matches('.'))
            // A wildcard or an empty prefix would let every subject through.
            .filter(|p| !p.is_empty() && !p.contains(['*', '>', ' ']))
            .map(|p| format!("{p}."))
            .collect();
        ReplyPrefixes { extra }
    }

    /// Whether a reply may be published on `reply`.
    pub fn allows(&self, reply: &str) -> bool {
        let Some((first, rest)) = reply.split_once('.') else {
            return false;
        };
        if rest.is_empty() {
            return false;
        }
        // `_R_.…` is what the server puts in place of the reply subject of a
        // request that came through an import from another account (an
        // isolated agent's); the server carries the answer back into the
        // requester's account and nowhere else.
        let inbox = first == "_INBOX"
            || first == "_R_"
            || first
                .strip_prefix("_INBOX_")
                .is_some_and(|id| !id.is_empty());
        inbox || self.extra.iter().any(|p| reply.starts_with(p.as_str()))
    }
}

/// A running micro service.
pub struct Service {
    inner: NatsService,
    counts: Counts,
    replies: ReplyPrefixes,
    tasks: tokio::task::JoinSet<()>,
    client: async_nats::Client,
}

impl Service {
    /// Registers the service (`name` is what `$SRV.PING.{name}` answers to).
    pub async fn start(
        client: &async_nats::Client,
        name: &str,
        description: &str,
    ) -> Result<Self, Error> {
        let counts: Counts = Arc::default();
        let stats_counts = counts.clone();
        let inner = client
            .service_builder()
            .description(description)
            .stats_handler(move |endpoint, _stats| {
                // Every error reply by code, refusals included; the built-in
                // `num_errors` counts the failures among them.
                let (errors, by_code, last, refused) = stats_counts
                    .lock()
                    .ok()
                    .and_then(|m| {
                        m.get(&endpoint).map(|c| {
                            (
                                c.error_replies,
                                c.errors_by_code.clone(),
                                c.last_error_code,
                                c.refused_replies,
                            )
                        })
                    })
                    .unwrap_or_default();
                serde_json::json!({
                    "error_replies": errors,
                    "errors_by_code": by_code,
                    "last_error_code": last,
                    "refused_replies": refused,
                })
            })
            .start(name, VERSION)
            .await
            .map_err(|e| Error::unavailable(format_args!("cannot start service {name}"), e))?;
        let id = inner.info().await.id;
        crate::telemetry::set_instance_id(&id);
        if let Some(path) = std::env::var_os(INSTANCE_FILE_ENV) {
            write_instance_file(std::path::Path::new(&path), &id);
        }
        Ok(Service {
            inner,
            counts,
            replies: ReplyPrefixes::from_env(),
            tasks: tokio::task::JoinSet::new(),
            client: client.clone(),
        })
    }

    /// This replica's id, as `$SRV.PING` answers name it.
    pub async fn instance_id(&self) -> String {
        self.inner.info().await.id
    }

    /// Serves `subject` with `handler`: JSON in, JSON out, typed errors.
    pub async fn serve<Req, Resp, H, Fut>(
        &mut self,
        subject: &'static str,
        handler: H,
    ) -> Result<(), Error>
    where
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
        H: Fn(Req) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<Resp, Error>> + Send + 'static,
    {
        self.serve_on(subject, move |_: String, req| handler(req))
            .await
    }

    /// Serves a per-agent wildcard (`coord.agents.*.…`) with `handler`, which
    /// only sees requests whose body names the agent of the subject they came
    /// on; any other is refused with [`ErrorCode::Forbidden`]. The subject is
    /// what the server lets an agent publish on, so it is the sender's
    /// identity and the body must agree with it.
    pub async fn serve_agent<Req, Resp, H, Fut>(
        &mut self,
        subject: &'static str,
        handler: H,
    ) -> Result<(), Error>
    where
        Req: AgentRequest + DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
        H: Fn(Req) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<Resp, Error>> + Send + 'static,
    {
        self.serve_on(subject, move |on: String, req: Req| {
            let handler = handler.clone();
            async move {
                same_agent(&on, req.agent_id())?;
                handler(req).await
            }
        })
        .await
    }

    /// Serves `subject` with a handler that also gets the subject each request came on.
    async fn serve_on<Req, Resp, H, Fut>(
        &mut self,
        subject: &'static str,
        handler: H,
    ) -> Result<(), Error>
    where
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
        H: Fn(String, Req) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<Resp, Error>> + Send + 'static,
    {
        self.serve_messages(subject, move |msg: async_nats::Message| {
            let handler = handler.clone();
            async move {
                let req = decode::<Req>(&msg.payload)?;
                handler(msg.subject.to_string(), req).await
            }
        })
        .await
    }

    /// Serves `subject` with a handler that gets the whole message: its
    /// subject, headers, raw body and whether anyone waits for a reply. For
    /// endpoints that also take plain publishes and must answer a refusal
    /// some other way (agent events: on the agent's `rejected` subject).
    pub async fn serve_messages<Resp, H, Fut>(
        &mut self,
        subject: &'static str,
        handler: H,
    ) -> Result<(), Error>
    where
        Resp: Serialize + Send + 'static,
        H: Fn(async_nats::Message) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<Resp, Error>> + Send + 'static,
    {
        // Endpoint names are tokens: a wildcard's `*` becomes `id`.
        let name = subject
            .strip_prefix("coord.")
            .unwrap_or(subject)
            .replace(".*.", ".id.")
            .replace('.', "-");
        let mut endpoint = self
            .inner
            .endpoint_builder()
            .name(&name)
            .add(subject)
            .await
            .map_err(|e| Error::unavailable(format_args!("cannot serve {subject}"), e))?;
        let counts = self.counts.clone();
        let replies = self.replies.clone();
        let client = self.client.clone();
        let limit = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        self.tasks.spawn(async move {
            while let Some(request) = endpoint.next().await {
                // Refused before the handler runs: a request whose answer would
                // land outside an inbox changes nothing either.
                if let Some(reply) = &request.message.reply {
                    if !replies.allows(reply) {
                        refuse_reply(&counts, &name, &request.message.subject, reply);
                        continue;
                    }
                }
                let Ok(permit) = limit.clone().acquire_owned().await else { break };
                let handler = handler.clone();
                let counts = counts.clone();
                let name = name.clone();
                let client = client.clone();
                let span = telemetry::server_span(&request.message.subject, request.message.headers.as_ref());
                tokio::spawn(
                    async move {
                        let result = handler(request.message.clone()).await;
                        let result = result
                            .and_then(|resp| encode(&resp))
                            .and_then(|body| fits(body, client.server_info().max_payload));
                        let sent = match result {
                            Ok(body) => request.respond(Ok(body.into())).await,
                            Err(err) => {
                                tracing::debug!(code = %err.code, message = %err.message, "error reply");
                                if let Ok(mut m) = counts.lock() {
                                    let entry = m.entry(name).or_default();
                                    entry.error_replies += 1;
                                    *entry.errors_by_code.entry(err.code.as_str()).or_default() += 1;
                                    entry.last_error_code = Some(err.code);
                                }
                                if err.code.is_failure() {
                                    respond_failure(&client, request, &err).await
                                } else {
                                    request.respond_with_headers(Ok(err.to_body().into()), error_headers(&err)).await
                                }
                            }
                        };
                        if let Err(e) = sent {
                            tracing::debug!(error = %e, "reply not sent");
                        }
                        drop(permit);
                    }
                    .instrument(span),
                );
            }
        });
        Ok(())
    }

    /// Stops answering: in-flight requests finish, the service unregisters.
    pub async fn stop(mut self) {
        self.tasks.abort_all();
        let _ = self.inner.stop().await;
    }
}

/// Answers a failure so that `$SRV.STATS` counts it in `num_errors` and
/// `last_error`. The micro library counts an error only when it sends the
/// reply itself, and then with an empty body; coordkit's error replies carry
/// a JSON body callers read. So the caller gets the usual reply from here, and
/// the library's empty one goes to a fresh inbox nobody listens on.
async fn respond_failure(
    client: &async_nats::Client,
    mut request: async_nats::service::Request,
    err: &Error,
) -> Result<(), async_nats::PublishError> {
    if let Some(reply) = request.message.reply.take() {
        client
            .publish_with_headers(reply, error_headers(err), err.to_body().into())
            .await?;
    }
    request.message.reply = Some(client.new_inbox().into());
    request
        .respond(Err(async_nats::service::error::Error {
            status: err.message.clone(),
            code: err.code.status().into(),
        }))
        .await
}

/// Counts a request dropped for its reply subject and warns, at most once per
/// endpoint every [`REFUSAL_WARN_EVERY`].
fn refuse_reply(counts: &Counts, endpoint: &str, subject: &str, reply: &str) {
    let Ok(mut m) = counts.lock() else { return };
    let entry = m.entry(endpoint.to_owned()).or_default();
    entry.refused_replies += 1;
    let due = entry
        .last_warned
        .is_none_or(|at| at.elapsed() >= REFUSAL_WARN_EVERY);
    if due {
        entry.last_warned = Some(Instant::now());
        tracing::warn!(
            subject,
            reply,
            refused = entry.refused_replies,
            "request dropped unanswered: its reply subject is not an inbox"
        );
    }
}

/// A request about one agent, named in its body.
pub trait AgentRequest {
    fn agent_id(&self) -> &AgentId;
}

macro_rules! agent_request {
    ($($t:ty),*) => {$(
        impl AgentRequest for $t {
            fn agent_id(&self) -> &AgentId {
                &self.agent_id
            }
        }
    )*};
}

agent_request!(
    RegisterAgent,
    DeregisterAgent,
    LeaveAgent,
    StateGet,
    StatePut,
    StateDelete,
    StateHistoryRequest
);

/// Checks that a request on `on` (an agent's own subject) names that agent.
pub fn same_agent(on: &str, named: &AgentId) -> Result<(), Error> {
    match subject::agent_of(on) {
        Some(sender) if &sender == named => Ok(()),
        Some(sender) => Err(Error::new(
            ErrorCode::Forbidden,
            format!("{on} is {sender}'s subject but the request names {named}"),
        )
        .with_details(serde_json::json!({ "subject_agent": sender, "agent_id": named }))),
        None => Err(Error::bad_request(format!("{on} names no agent"))),
    }
}

/// Reads a request the way every endpoint does: the size limit, an empty body
/// as `{}`, then JSON into `T`; every failure is a typed [`Error`].
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, Error> {
    if payload.len() > MAX_REQUEST_BYTES {
        return Err(Error::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "request is {} bytes, at most {MAX_REQUEST_BYTES} allowed",
                payload.len()
            ),
        ));
    }
    // An empty body means "no parameters", so `nats req coord.monitor.metrics ''` works.
    let payload: &[u8] = if payload.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        payload
    };
    serde_json::from_slice(payload).map_err(|e| Error::decode(&e))
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(value).map_err(|e| Error::internal_from("reply encode", e))
}

/// A reply the server would refuse to carry becomes an error the caller can
/// read, rather than a request that times out.
fn fits(body: Vec<u8>, max_payload: usize) -> Result<Vec<u8>, Error> {
    if max_payload > 0 && body.len() > max_payload {
        return Err(Error::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "the reply would be {} bytes, more than the server's max_payload of {max_payload}",
                body.len()
            ),
        ));
    }
    Ok(body)
}

/// The micro-service error headers, alongside the JSON body.
pub fn error_headers(err: &Error) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        async_nats::service::NATS_SERVICE_ERROR,
        err.message.as_str(),
    );
    h.insert(
        async_nats::service::NATS_SERVICE_ERROR_CODE,
        err.code.status().to_string().as_str(),
    );
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_classifies_bad_input() {
        #[derive(serde::Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        struct Req {
            #[serde(default)]
            _n: u32,
        }
        assert!(decode::<Req>(b"").is_ok());
        assert_eq!(
            decode::<Req>(b"not json").unwrap_err().code,
            ErrorCode::BadRequest
        );
        assert_eq!(
            decode::<Req>(br#"{"x":1}"#).unwrap_err().code,
            ErrorCode::BadRequest
        );
        let big = vec![b' '; MAX_REQUEST_BYTES + 1];
        assert_eq!(
            decode::<Req>(&big).unwrap_err().code,
            ErrorCode::PayloadTooLarge
        );
    }

    #[test]
    fn a_reply_larger_than_the_server_carries_is_an_error() {
        assert_eq!(fits(vec![b'x'; 10], 10).unwrap().len(), 10);
        assert_eq!(
            fits(vec![b'x'; 11], 10).unwrap_err().code,
            ErrorCode::PayloadTooLarge
        );
        assert!(fits(vec![b'x'; 11], 0).is_ok(), "no limit known");
    }

    #[test]
    fn replies_go_only_to_inboxes() {
        let only_inboxes = ReplyPrefixes::default();
        for ok in [
            "_INBOX.abc",
            "_INBOX.abc.1",
            "_INBOX_w1.abc",
            "_INBOX_w-1.x.y",
            "_R_.abc.def",
        ] {
            assert!(only_inboxes.allows(ok), "{ok}");
        }
        for refused in [
            "$KV.coord_state.default.b",
            "$KV.coord_agents.b",
            "$JS.API.CONSUMER.DELETE.COORD_ASSIGN.agent-b",
            "coord.agents.b.heartbeat",
            "coord.events.injected",
            "_INBOX",
            "_INBOX.",
            "_INBOX_.x",
            "_INBOXES.x",
            "_INBOX_w1",
            "x._INBOX.y",
            "_R_",
            "_R_X.a",
        ] {
            assert!(!only_inboxes.allows(refused), "{refused}");
        }
        let extra = ReplyPrefixes::with_extra([" _REPLIES ", "_OPS.", "", ">", "*"]);
        assert!(extra.allows("_REPLIES.1"));
        assert!(extra.allows("_OPS.a.b"));
        assert!(!extra.allows("_REPLIESX.1"));
        assert!(!extra.allows("coord.agents.b.cancel"));
    }

    #[test]
    fn an_agent_subject_must_agree_with_the_body() {
        let (a, b) = (AgentId::new("a").unwrap(), AgentId::new("b").unwrap());
        assert!(same_agent(&subject::agent_state_put(&a), &a).is_ok());
        let refused = same_agent(&subject::agent_register(&a), &b).unwrap_err();
        assert_eq!(refused.code, ErrorCode::Forbidden);
        assert_eq!(refused.details["subject_agent"], "a");
        assert_eq!(
            same_agent(subject::FLOW_CREATE, &a).unwrap_err().code,
            ErrorCode::BadRequest
        );
    }
}
