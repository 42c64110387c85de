//! `service.instance.id` in the trace resource: the replica's NATS micro id,
//! known only once the service has registered, after tracing is installed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use opentelemetry::KeyValue;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use opentelemetry_sdk::Resource;

/// This process's service instance id, once its service has registered.
static INSTANCE_ID: OnceLock<String> = OnceLock::new();

/// Names this process's service instance (its NATS micro id) in the trace
/// resource, as `service.instance.id`. The first call wins: a service process
/// is one instance (tests running several services in one process keep the
/// first).
pub fn set_instance_id(id: &str) {
    let _ = INSTANCE_ID.set(id.to_owned());
}

/// The OTLP exporter, told the instance id once it is known: the id is given
/// by the service registration, after tracing is installed, and a provider's
/// resource is fixed when it is built.
#[derive(Debug)]
pub(super) struct InstanceExporter {
    inner: tokio::sync::Mutex<opentelemetry_otlp::SpanExporter>,
    resource: Resource,
    named: AtomicBool,
}

impl InstanceExporter {
    pub(super) fn new(inner: opentelemetry_otlp::SpanExporter) -> Self {
        InstanceExporter {
            inner: tokio::sync::Mutex::new(inner),
            resource: Resource::builder_empty().build(),
            named: AtomicBool::new(false),
        }
    }
}

impl SpanExporter for InstanceExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let mut inner = self.inner.lock().await;
        if !self.named.load(Ordering::Relaxed) {
            if let Some(id) = INSTANCE_ID.get() {
                let named = Resource::builder_empty()
                    .with_attributes(
                        self.resource
                            .iter()
                            .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
                    )
                    .with_attribute(KeyValue::new("service.instance.id", id.clone()))
                    .build();
                inner.set_resource(&named);
                self.named.store(true, Ordering::Relaxed);
            }
        }
        inner.export(batch).await
    }

    fn shutdown_with_timeout(&self, timeout: std::time::Duration) -> OTelSdkResult {
        match self.inner.try_lock() {
            Ok(inner) => inner.shutdown_with_timeout(timeout),
            // An export is under way; the batch processor stops after it.
            Err(_) => Ok(()),
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        match self.inner.try_lock() {
            Ok(inner) => inner.force_flush(),
            Err(_) => Ok(()),
        }
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.resource = resource.clone();
        self.inner.get_mut().set_resource(resource);
    }
}
