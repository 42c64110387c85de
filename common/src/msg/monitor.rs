//! Monitor queries.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `coord.monitor.metrics` (empty request body or `{}`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MetricsRequest {}

/// Reply to `coord.monitor.metrics`: counts since the monitor started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SystemMetrics {
    pub since_ms: u64,
    pub at_ms: u64,
    pub messages_total: u64,
    pub bytes_total: u64,
    /// Messages per subject family (agent ids collapsed to `*`).
    #[serde(default)]
    pub messages_by_subject: BTreeMap<String, u64>,
    #[serde(default)]
    pub flows_created: u64,
    #[serde(default)]
    pub flows_completed: u64,
    #[serde(default)]
    pub tasks_assigned: u64,
    #[serde(default)]
    pub tasks_completed: u64,
    #[serde(default)]
    pub tasks_failed: u64,
}
