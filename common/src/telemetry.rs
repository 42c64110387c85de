//! Logging and tracing set-up, and W3C trace context in NATS headers.
//!
//! A tracer provider is always installed, so every span has a real trace id that
//! travels in a `traceparent` header on every message; spans are *exported* only
//! when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or `…_TRACES_ENDPOINT`) is set.
//! One task's path through all services is then one trace.
//!
//! Spans follow OpenTelemetry's messaging conventions: a service answering a
//! request is a SERVER span, a request sent a CLIENT span, a message published
//! a PRODUCER span and one taken from a subject or stream a CONSUMER span, each
//! with `messaging.*` attributes; the resource names the service, its version
//! and its instance (the NATS micro id, as `$SRV.INFO` shows it).
//!
//! Tests install a provider that can also keep finished spans in memory
//! ([`SpanCapture`]), so a test can check how spans link without an exporter.
//!
//! Logs go to stderr as text, coloured only when stderr is a terminal (never
//! escape codes in a file or a pipe, nor with `NO_COLOR` set), or as one JSON
//! object per line with `LOG_FORMAT=json`, for log collectors.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use async_nats::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanProcessor};
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

mod instance;
pub use instance::set_instance_id;
use instance::InstanceExporter;

/// Environment variable choosing the log format: `json`, or text (anything else).
pub const LOG_FORMAT_ENV: &str = "LOG_FORMAT";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// For people; ANSI colours only when `ansi`.
    Text { ansi: bool },
    /// One JSON object per line: `timestamp`, `level`, `fields` (with
    /// `message`), and the current span and its parents.
    Json,
}

impl LogFormat {
    /// From [`LOG_FORMAT_ENV`], and whether stderr is a terminal and
    /// `NO_COLOR` is unset.
    pub fn from_env() -> Self {
        use std::io::IsTerminal;
        let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        Self::choose(std::env::var(LOG_FORMAT_ENV).ok().as_deref(), colour)
    }

    /// `format` as [`LOG_FORMAT_ENV`] gives it; `colour` when colour may be used.
    pub fn choose(format: Option<&str>, colour: bool) -> Self {
        match format.map(str::trim) {
            Some(f) if f.eq_ignore_ascii_case("json") => LogFormat::Json,
            _ => LogFormat::Text { ansi: colour },
        }
    }

    /// The log layer writing this format to `writer`.
    pub fn layer<S, W>(self, writer: W) -> Box<dyn Layer<S> + Send + Sync + 'static>
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a>,
        W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
    {
        let fmt = tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_target(false);
        match self {
            LogFormat::Text { ansi } => fmt.with_ansi(ansi).boxed(),
            LogFormat::Json => fmt
                .json()
                .with_current_span(true)
                .with_span_list(true)
                .boxed(),
        }
    }
}

/// Flushes pending spans when dropped (at the end of `main`).
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            if let Err(e) = p.shutdown() {
                eprintln!("telemetry shutdown: {e}");
            }
        }
    }
}

fn otlp_enabled() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|k| std::env::var(k).map(|v| !v.is_empty()).unwrap_or(false))
}

fn provider(service: &str, capture: bool) -> SdkTracerProvider {
    let resource = Resource::builder()
        .with_service_name(service.to_owned())
        .with_attribute(KeyValue::new("service.version", crate::service::VERSION))
        .build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    if capture {
        builder = builder.with_span_processor(CaptureProcessor);
    }
    if otlp_enabled() {
        match opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
        {
            Ok(exporter) => builder = builder.with_batch_exporter(InstanceExporter::new(exporter)),
            Err(e) => eprintln!("OTLP exporter disabled: {e}"),
        }
    }
    builder.build()
}

/// The one subscriber set-up for binaries: `RUST_LOG`-filtered logs on stderr
/// (default `info`; text or JSON, see [`LogFormat`]), spans filtered by
/// [`TRACE_FILTER_ENV`] alone and sent to OTLP when configured. Call once at
/// the top of `main`.
pub fn init(service: &str) -> TelemetryGuard {
    install(service, true, false)
}

/// For tests: trace context on, logs only when `TEST_LOG` is set. Safe to call
/// from every test; only the first call installs anything.
pub fn init_for_tests() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let guard = install(
            "coordkit-test",
            std::env::var_os("TEST_LOG").is_some(),
            true,
        );
        // The test process never flushes; keep the provider alive for its lifetime.
        std::mem::forget(guard);
    });
}

/// Environment variable filtering the spans that make traces, in `RUST_LOG`'s
/// syntax (default [`DEFAULT_FILTER`]). Apart from `RUST_LOG`, which filters
/// only the logs: quieter logs must not cut a task's trace in pieces.
pub const TRACE_FILTER_ENV: &str = "COORD_TRACE_FILTER";

/// What logs and traces keep unless told otherwise.
const DEFAULT_FILTER: &str = "info,async_nats=warn,opentelemetry=warn,opentelemetry_sdk=warn";

fn filter_from(var: &str) -> EnvFilter {
    EnvFilter::try_from_env(var).unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER))
}

/// Logs filtered by `log`'s filter, trace spans by `traces`, each on its own: a
/// span the log filter drops still carries the trace context.
fn layers<S>(
    log: Option<(LogFormat, EnvFilter)>,
    traces: EnvFilter,
    tracer: opentelemetry_sdk::trace::Tracer,
) -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    let fmt = log.map(|(format, filter)| format.layer(std::io::stderr).with_filter(filter));
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(traces);
    Layer::and_then(fmt, otel)
}

fn install(service: &str, logs: bool, capture: bool) -> TelemetryGuard {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let provider = provider(service, capture);
    let tracer = provider.tracer(service.to_owned());
    let log = logs.then(|| (LogFormat::from_env(), filter_from(EnvFilter::DEFAULT_ENV)));
    // A second install in one process (tests) keeps the first; that is fine.
    let _ = tracing_subscriber::registry()
        .with(layers(log, filter_from(TRACE_FILTER_ENV), tracer))
        .try_init();
    opentelemetry::global::set_tracer_provider(provider.clone());
    TelemetryGuard {
        provider: Some(provider),
    }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}

/// Writes the current span's trace context into `headers`.
pub fn inject(headers: &mut HeaderMap) {
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut HeaderInjector(headers))
    });
}

/// Fresh headers carrying the current trace context.
pub fn headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    inject(&mut h);
    h
}

/// A span of a message exchange, by OpenTelemetry's messaging conventions:
/// named `{operation} {subject family}` (ids collapsed, so span names stay
/// few), the concrete subject in `messaging.destination.name`.
fn messaging_span(
    kind: &'static str,
    operation: &'static str,
    operation_type: &'static str,
    subject: &str,
) -> tracing::Span {
    let family = crate::subject::family(subject);
    tracing::info_span!(
        "message",
        otel.name = %format_args!("{operation} {family}"),
        otel.kind = kind,
        messaging.system = "nats",
        messaging.operation.name = operation,
        messaging.operation.type = operation_type,
        messaging.destination.name = %subject,
        messaging.destination.template = %family,
    )
}

/// Continues the sender's trace when its headers carry one. Without a
/// `traceparent` the span starts a new trace rather than being orphaned under
/// a bogus parent.
fn continue_from(span: tracing::Span, headers: Option<&HeaderMap>) -> tracing::Span {
    if let Some(h) = headers {
        if h.get("traceparent").is_some() {
            let parent =
                opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(h)));
            let _ = span.set_parent(parent);
        }
    }
    span
}

/// A SERVER span: a service answering the request on `subject`.
pub fn server_span(subject: &str, headers: Option<&HeaderMap>) -> tracing::Span {
    continue_from(
        messaging_span("server", "process", "process", subject),
        headers,
    )
}

/// A CONSUMER span: processing a message taken from `subject` (a report, an
/// assignment, an event), continuing its sender's trace.
pub fn consumer_span(subject: &str, headers: Option<&HeaderMap>) -> tracing::Span {
    continue_from(
        messaging_span("consumer", "process", "process", subject),
        headers,
    )
}

/// A CLIENT span: a request sent to `subject`, its answer awaited. Inject the
/// headers inside it, so the server's span is its child.
pub fn client_span(subject: &str) -> tracing::Span {
    messaging_span("client", "request", "send", subject)
}

/// A PRODUCER span: a message published to `subject`. Inject the headers
/// inside it, so whoever processes the message continues from it.
pub fn producer_span(subject: &str) -> tracing::Span {
    messaging_span("producer", "publish", "send", subject)
}

/// Headers for one message published to `subject`, carrying the context of
/// a PRODUCER span of its own (ended here, when the message is made): whoever
/// processes the message continues from it.
pub fn producer_headers(subject: &str) -> HeaderMap {
    let span = producer_span(subject);
    let _in = span.enter();
    headers()
}

/// The current span's context as a W3C `traceparent` value, to store with
/// state that outlives the span (a flow remembers the trace that created it).
pub fn traceparent() -> Option<String> {
    let cx = tracing::Span::current().context();
    let mut fields = HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut fields));
    fields.remove("traceparent")
}

/// Makes `span`, one step of work done on behalf of several `causes` (a batch
/// of commands, each sent from its own span), continue the first cause's trace
/// and link to every other cause. When no cause has a trace, the step
/// continues the stored `fallback` `traceparent` instead, if there is one.
/// `span` must not have been entered yet: a started span's parent is fixed.
pub fn join_causes(span: &tracing::Span, causes: &[tracing::Span], fallback: Option<&str>) {
    /// Links beyond this many add little to a trace and cost memory per span.
    const MAX_LINKS: usize = 32;
    let mut contexts = causes
        .iter()
        .filter(|c| !c.is_disabled())
        .map(|c| c.context())
        .filter(|cx| cx.span().span_context().is_valid());
    let Some(parent) = contexts.next() else {
        if let Some(tp) = fallback {
            let fields = HashMap::from([("traceparent".to_owned(), tp.to_owned())]);
            let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&fields));
            if cx.span().span_context().is_valid() {
                let _ = span.set_parent(cx);
            }
        }
        return;
    };
    let mut linked = vec![parent.span().span_context().span_id()];
    let _ = span.set_parent(parent);
    for cx in contexts {
        if linked.len() > MAX_LINKS {
            break;
        }
        let sc = cx.span().span_context().clone();
        if !linked.contains(&sc.span_id()) {
            linked.push(sc.span_id());
            span.add_link(sc);
        }
    }
}

/// Every span that ended while at least one capture was alive, kept in memory
/// for a test to inspect. Spans of the whole process are kept (services run
/// in-process in tests), so a test picks its own by trace id; that also keeps
/// tests that share a process (`cargo test`) out of each other's way.
/// Needs the provider [`init_for_tests`] installs (which `start` calls).
pub struct SpanCapture(());

static CAPTURES: AtomicUsize = AtomicUsize::new(0);
static CAPTURED: Mutex<Vec<SpanData>> = Mutex::new(Vec::new());
/// Spans kept at most while capturing, so a forgotten capture cannot eat memory.
const MAX_CAPTURED: usize = 200_000;

impl SpanCapture {
    pub fn start() -> SpanCapture {
        init_for_tests();
        CAPTURES.fetch_add(1, Ordering::SeqCst);
        SpanCapture(())
    }

    /// The spans called `name` that have ended so far, of any trace.
    pub fn named(&self, name: &str) -> Vec<SpanData> {
        CAPTURED
            .lock()
            .map(|spans| spans.iter().filter(|s| s.name == name).cloned().collect())
            .unwrap_or_default()
    }

    /// The spans of `trace_id` (hex, as in `traceparent`) that have ended so far.
    pub fn trace(&self, trace_id: &str) -> Vec<SpanData> {
        CAPTURED
            .lock()
            .map(|spans| {
                spans
                    .iter()
                    .filter(|s| s.span_context.trace_id().to_string() == trace_id)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for SpanCapture {
    fn drop(&mut self) {
        if CAPTURES.fetch_sub(1, Ordering::SeqCst) == 1 {
            if let Ok(mut spans) = CAPTURED.lock() {
                spans.clear();
            }
        }
    }
}

/// Hands ended spans to [`CAPTURED`] while a [`SpanCapture`] is alive.
#[derive(Debug)]
struct CaptureProcessor;

impl SpanProcessor for CaptureProcessor {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        if CAPTURES.load(Ordering::SeqCst) == 0 {
            return;
        }
        if let Ok(mut spans) = CAPTURED.lock() {
            if spans.len() < MAX_CAPTURED {
                spans.push(span);
            }
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: std::time::Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// The trace id in a `traceparent` header, for tests and logs.
pub fn trace_id(headers: &HeaderMap) -> Option<String> {
    let tp = headers.get("traceparent")?.as_str();
    tp.split('-').nth(1).map(str::to_owned)
}

#[cfg(test)]
mod filter_tests {
    use super::*;

    /// `RUST_LOG=warn` (logs only) leaves spans at `info` with their trace
    /// context; the trace filter alone decides.
    #[test]
    fn a_quieter_log_filter_keeps_the_trace_context() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let provider = SdkTracerProvider::builder().build();
        let traced = |logs: &str, traces: &str| {
            let subscriber = tracing_subscriber::registry().with(layers(
                Some((LogFormat::Text { ansi: false }, EnvFilter::new(logs))),
                EnvFilter::new(traces),
                provider.tracer("filter-test"),
            ));
            tracing::subscriber::with_default(subscriber, || {
                let span = tracing::info_span!("request");
                let _in = span.enter();
                traceparent()
            })
        };
        assert!(
            traced("warn", "info").is_some(),
            "logs at warn cut the trace"
        );
        assert!(traced("info", "info").is_some());
        assert!(
            traced("info", "warn").is_none(),
            "the trace filter is not obeyed"
        );
    }
}

#[cfg(test)]
mod log_tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A writer into shared memory, to read what the layer wrote.
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn written(format: LogFormat) -> String {
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::registry().with(format.layer(move || out.clone()));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("request", subject = "coord.x");
            let _in = span.enter();
            tracing::warn!(code = "internal", "reply not sent");
        });
        let bytes = buf.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn the_format_follows_the_environment_and_the_terminal() {
        assert_eq!(LogFormat::choose(Some("json"), true), LogFormat::Json);
        assert_eq!(LogFormat::choose(Some(" JSON "), false), LogFormat::Json);
        assert_eq!(
            LogFormat::choose(None, false),
            LogFormat::Text { ansi: false }
        );
        assert_eq!(
            LogFormat::choose(Some("text"), true),
            LogFormat::Text { ansi: true }
        );
    }

    #[test]
    fn text_without_a_terminal_has_no_escape_codes_and_json_is_one_object_a_line() {
        let text = written(LogFormat::Text { ansi: false });
        assert!(text.contains("reply not sent"), "{text}");
        assert!(!text.contains('\x1b'), "{text:?}");
        assert!(written(LogFormat::Text { ansi: true }).contains('\x1b'));

        let json = written(LogFormat::Json);
        let lines: Vec<&str> = json.lines().collect();
        assert_eq!(lines.len(), 1, "{json}");
        let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(v["level"], "WARN");
        assert_eq!(v["fields"]["message"], "reply not sent");
        assert_eq!(v["fields"]["code"], "internal");
        assert_eq!(v["span"]["subject"], "coord.x");
    }
}
