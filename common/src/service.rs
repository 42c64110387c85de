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

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

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

/// Environment variable naming a file where a service writes its instance id.
pub const INSTANCE_FILE_ENV: &str = "COORD_INSTANCE_FILE";

type ErrorCounts = Arc<Mutex<HashMap<String, (u64, Option<ErrorCode>)>>>;

/// A running micro service.
pub struct Service {
    inner: NatsService,
    errors: ErrorCounts,
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
        let errors: ErrorCounts = Arc::default();
        let stats_errors = errors.clone();
        let inner = client
            .service_builder()
            .description(description)
            .stats_handler(move |endpoint, _stats| {
                // Error replies carry a JSON body, so they are counted here rather
                // than in the built-in error counter (which only sees empty bodies).
                let counts = stats_errors
                    .lock()
                    .map(|m| m.get(&endpoint).cloned())
                    .ok()
                    .flatten();
                let (errors, last) = counts.unwrap_or((0, None));
                serde_json::json!({ "error_replies": errors, "last_error_code": last })
            })
            .start(name, VERSION)
            .await
            .map_err(|e| {
                Error::new(
                    ErrorCode::Unavailable,
                    format!("cannot start service {name}: {e}"),
                )
            })?;
        Ok(Service {
            inner,
            errors,
            tasks: tokio::task::JoinSet::new(),
            client: client.clone(),
        })
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
            .map_err(|e| {
                Error::new(
                    ErrorCode::Unavailable,
                    format!("cannot serve {subject}: {e}"),
                )
            })?;
        let errors = self.errors.clone();
        let client = self.client.clone();
        let limit = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        self.tasks.spawn(async move {
            while let Some(request) = endpoint.next().await {
                let Ok(permit) = limit.clone().acquire_owned().await else { break };
                let handler = handler.clone();
                let errors = errors.clone();
                let name = name.clone();
                let client = client.clone();
                let span = telemetry::message_span("request", subject, request.message.headers.as_ref());
                tokio::spawn(
                    async move {
                        let on = request.message.subject.to_string();
                        let result = match decode::<Req>(&request.message.payload) {
                            Ok(req) => handler(on, req).await,
                            Err(e) => Err(e),
                        };
                        let result = result
                            .and_then(|resp| encode(&resp))
                            .and_then(|body| fits(body, client.server_info().max_payload));
                        let sent = match result {
                            Ok(body) => request.respond(Ok(body.into())).await,
                            Err(err) => {
                                tracing::debug!(code = %err.code, message = %err.message, "error reply");
                                if let Ok(mut m) = errors.lock() {
                                    let entry = m.entry(name).or_default();
                                    entry.0 += 1;
                                    entry.1 = Some(err.code);
                                }
                                request.respond_with_headers(Ok(err.to_body().into()), error_headers(&err)).await
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

/// A container health check: pings this container's own instance (named in
/// the [`INSTANCE_FILE_ENV`] file) or, without one, any instance of `name`.
/// Returns whether it answered within two seconds.
pub async fn healthcheck(cfg: &crate::config::NatsConfig, name: &str) -> bool {
    let mut subject = format!("{}.{name}", crate::subject::SRV_PING);
    if let Some(id) =
        std::env::var_os(INSTANCE_FILE_ENV).and_then(|p| std::fs::read_to_string(p).ok())
    {
        subject = format!("{subject}.{}", id.trim());
    }
    let check = async {
        let client = crate::nats::connect(cfg, "healthcheck").await.ok()?;
        client.request(subject, "".into()).await.ok()
    };
    matches!(
        tokio::time::timeout(std::time::Duration::from_secs(2), check).await,
        Ok(Some(_))
    )
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
    serde_json::to_vec(value).map_err(|e| Error::internal(format!("reply encode: {e}")))
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
