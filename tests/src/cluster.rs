//! A JetStream cluster of real nats-servers on loopback, whose nodes a test
//! can kill, resume, or cut off from their peers while they keep running.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use common::config::NatsConfig;

use crate::{eventually, nats_server_bin, spawn};

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
            let dir = crate::server_dir();
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
