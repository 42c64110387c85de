//! What the monitor asks of others: `$SRV` scatter-gathers, JetStream infos,
//! read-only KV scans, the NATS server's monitoring endpoint.

use std::time::Duration;

use async_nats::jetstream;
use common::msg::StreamHealth;
use common::Error;
use futures::StreamExt;
use serde_json::Value;

/// Longest wait for the first answer of a scatter-gather, and for each next one.
const GATHER_FIRST: Duration = Duration::from_millis(1_000);
const GATHER_NEXT: Duration = Duration::from_millis(250);
/// Most records read from one bucket per request.
pub(super) const MAX_RECORDS: usize = 2_000;

/// Every answer to `subject` (each replica of each service answers once).
pub(super) async fn gather(nats: &async_nats::Client, subject: &str) -> Result<Vec<Value>, Error> {
    let inbox = nats.new_inbox();
    let mut sub = nats
        .subscribe(inbox.clone())
        .await
        .map_err(|e| Error::unavailable("subscribe", e))?;
    nats.publish_with_reply(subject.to_owned(), inbox, "".into())
        .await
        .map_err(|e| Error::unavailable(subject, e))?;
    let mut out = Vec::new();
    let mut wait = GATHER_FIRST;
    while let Ok(Some(msg)) = tokio::time::timeout(wait, sub.next()).await {
        if let Ok(v) = serde_json::from_slice(&msg.payload) {
            out.push(v);
        }
        wait = GATHER_NEXT;
    }
    let _ = sub.unsubscribe().await;
    Ok(out)
}

/// Every stream with its consumers' backlog.
pub(super) async fn streams(js: &jetstream::Context) -> Result<Vec<StreamHealth>, String> {
    let mut names = js.stream_names();
    let mut out = Vec::new();
    while let Some(name) = names.next().await {
        let name = name.map_err(|e| format!("list streams: {e}"))?;
        // KV buckets are streams too; their health is the services' business.
        if name.starts_with("KV_") {
            continue;
        }
        let mut stream = js
            .get_stream(&name)
            .await
            .map_err(|e| format!("stream {name}: {e}"))?;
        let info = stream
            .info()
            .await
            .map_err(|e| format!("stream {name}: {e}"))?;
        let mut h = StreamHealth {
            name: name.clone(),
            messages: info.state.messages,
            bytes: info.state.bytes,
            ..Default::default()
        };
        let mut consumers = stream.consumers();
        while let Some(c) = consumers.next().await {
            let c = c.map_err(|e| format!("consumers of {name}: {e}"))?;
            let id = c.config.durable_name.clone().unwrap_or(c.name.clone());
            h.consumer_pending.insert(id.clone(), c.num_pending);
            h.consumer_ack_pending.insert(id, c.num_ack_pending as u64);
        }
        out.push(h);
    }
    Ok(out)
}

/// Up to [`MAX_RECORDS`] `(key, record)` pairs of a bucket, as JSON; a missing
/// bucket reads as empty (the service owning it has not started yet).
pub(super) async fn records(
    js: &jetstream::Context,
    bucket: &str,
) -> Result<Vec<(String, Value)>, Error> {
    let store = match js.get_key_value(bucket).await {
        Ok(s) => s,
        Err(_) => return Ok(Vec::new()),
    };
    let mut keys = store
        .keys()
        .await
        .map_err(|e| Error::unavailable(format_args!("keys of {bucket}"), e))?;
    let mut out = Vec::new();
    while let Some(key) = keys.next().await {
        let Ok(key) = key else { continue };
        if out.len() >= MAX_RECORDS {
            break;
        }
        let value = store
            .get(&key)
            .await
            .map_err(|e| Error::unavailable(format_args!("{bucket}/{key}"), e))?;
        if let Some(bytes) = value {
            let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            out.push((key, v));
        }
    }
    Ok(out)
}

/// The flows bucket's records, with a large flow's page entries (`{flow}.p{n}`)
/// folded into its `tasks`, so every flow reads as one record.
pub(super) async fn flow_records(js: &jetstream::Context) -> Result<Vec<(String, Value)>, Error> {
    let mut flows = Vec::new();
    let mut pages: std::collections::HashMap<String, Vec<Value>> = Default::default();
    for (key, value) in records(js, common::nats::KV_FLOWS).await? {
        match key.split_once('.') {
            Some((flow, _)) => pages.entry(flow.to_owned()).or_default().push(value),
            None => flows.push((key, value)),
        }
    }
    for (key, flow) in &mut flows {
        let Some(Value::Object(tasks)) = flow.get_mut("tasks") else {
            continue;
        };
        for mut page in pages.remove(key.as_str()).unwrap_or_default() {
            if let Some(Value::Object(more)) = page.get_mut("tasks").map(Value::take) {
                tasks.extend(more);
            }
        }
    }
    Ok(flows)
}

/// Longest wait for the NATS monitoring endpoint.
const HTTP_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest monitoring document read.
const HTTP_MAX_BYTES: usize = 16 * 1024 * 1024;

/// The client for the NATS monitoring endpoint: plain HTTP (the monitoring
/// port speaks no TLS unless configured to), no redirects, a short timeout.
pub(super) fn http_client() -> Result<reqwest::Client, Error> {
    reqwest::Client::builder()
        .timeout(HTTP_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| Error::internal_from("HTTP client", e))
}

/// `GET {base}{path}`, JSON body.
pub(super) async fn http_get_json(
    client: &reqwest::Client,
    base: &str,
    path: &str,
) -> Result<Value, String> {
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let resp = client.get(&url).send().await.map_err(|e| {
        if e.is_timeout() {
            format!("{url}: no answer within {} s", HTTP_TIMEOUT.as_secs())
        } else {
            format!("{url}: {e}")
        }
    })?;
    let status = resp.status();
    if !status.is_success() {
        return Err(format!("{url}: HTTP {}", status.as_u16()));
    }
    let body = resp.bytes().await.map_err(|e| format!("{url}: {e}"))?;
    if body.len() > HTTP_MAX_BYTES {
        return Err(format!("{url}: answer larger than {HTTP_MAX_BYTES} bytes"));
    }
    serde_json::from_slice(&body).map_err(|e| format!("{url}: {e}"))
}
