//! Connection settings shared by every binary, from flags or the environment.

use std::path::PathBuf;
use std::time::Duration;

/// How to reach NATS. Every flag also reads an environment variable, so the same
/// binary runs unchanged under docker-compose, systemd or a test.
#[derive(clap::Args, Debug, Clone)]
pub struct NatsConfig {
    /// NATS server URL(s), comma-separated.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// NATS credentials file (JWT + nkey seed).
    #[arg(long, env = "NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// User name for user/password authentication.
    #[arg(long, env = "NATS_USER")]
    pub nats_user: Option<String>,
    /// Password for user/password authentication.
    #[arg(long, env = "NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,
    /// CA certificate (PEM) to verify the server with.
    #[arg(long, env = "NATS_TLS_CA")]
    pub nats_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS; needs --nats-tls-key.
    #[arg(long, env = "NATS_TLS_CERT", requires = "nats_tls_key")]
    pub nats_tls_cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    #[arg(long, env = "NATS_TLS_KEY", requires = "nats_tls_cert")]
    pub nats_tls_key: Option<PathBuf>,
    /// Refuse to connect without TLS.
    #[arg(long, env = "NATS_TLS_REQUIRED")]
    pub nats_tls_required: bool,
    /// Prefix of this connection's reply subjects (default `_INBOX`). An agent
    /// on a server that isolates agents uses `_INBOX_{its id}`, the only inbox
    /// it may subscribe to, so no one else can read the replies it is sent
    /// (JetStream delivers pulled assignments to an inbox too).
    #[arg(long, env = "NATS_INBOX_PREFIX")]
    pub nats_inbox_prefix: Option<String>,
    /// Replicas for the JetStream streams and KV buckets a service creates
    /// (3 on a 3-node cluster). Existing ones are left as they are.
    #[arg(long, env = "COORD_JS_REPLICAS", default_value_t = 1)]
    pub js_replicas: usize,
    /// Deadline for every request this process makes, in milliseconds.
    #[arg(long, env = "COORD_REQUEST_TIMEOUT_MS", default_value_t = 5_000)]
    pub request_timeout_ms: u64,
    /// How often the connection pings a silent server, in milliseconds; after
    /// three unanswered pings it moves to another server. A server cut off by
    /// the network (not stopped) closes nothing, so this bounds how long a
    /// process stays on it: 15 s at the default (the client library's own
    /// default, 60 s, made it three minutes).
    #[arg(long, env = "NATS_PING_INTERVAL_MS", default_value_t = 5_000)]
    pub ping_interval_ms: u64,
}

impl NatsConfig {
    /// Defaults for a server at `url`, for tests and embedding.
    pub fn new(url: impl Into<String>) -> Self {
        NatsConfig {
            nats_url: url.into(),
            nats_creds: None,
            nats_user: None,
            nats_password: None,
            nats_tls_ca: None,
            nats_tls_cert: None,
            nats_tls_key: None,
            nats_tls_required: false,
            nats_inbox_prefix: None,
            js_replicas: 1,
            request_timeout_ms: 5_000,
            ping_interval_ms: 5_000,
        }
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms.max(1))
    }

    pub fn ping_interval(&self) -> Duration {
        Duration::from_millis(self.ping_interval_ms.max(100))
    }
}
