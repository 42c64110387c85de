//! An agent declared lost while its connection hung, whose `agent.lost`
//! event never reached it, and whose connection then dropped and came back
//! within milliseconds (as it does when a client moves to another node of
//! a cluster), registers again and is active: the runtime hears the
//! disconnect itself, however short, not only from polling the
//! connection's state.
//!
//! The agent reaches the server through a forwarder the test holds (nothing
//! crosses either way, so its heartbeats stop and the event waits unread)
//! and then cuts (the connections it carries are dropped with whatever
//! they held, a new one is carried at once).

use std::sync::Arc;
use std::time::Duration;

use common::msg::AgentStatus;
use common::subject;
use common::AgentId;
use futures::StreamExt;
use testkit::{eventually, System};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::contract::status_of;
use crate::orchestrator::{cpu_task, spawn_agent, tid};

/// A TCP forwarder to `server` that can hold and cut what it carries.
struct Forwarder {
    port: u16,
    held: watch::Sender<bool>,
    /// Moves on every cut: connections carried before it end.
    cuts: watch::Sender<u64>,
}

impl Forwarder {
    async fn start(server: u16) -> Forwarder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (held, _) = watch::channel(false);
        let (cuts, _) = watch::channel(0u64);
        let (h, c) = (held.clone(), cuts.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(upstream) = TcpStream::connect(("127.0.0.1", server)).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (ur, uw) = upstream.into_split();
                let mut cut = c.subscribe();
                cut.mark_unchanged();
                let (up, down) = (pump(cr, uw, h.subscribe()), pump(ur, cw, h.subscribe()));
                tokio::spawn(async move {
                    tokio::select! {
                        _ = cut.changed() => {}
                        _ = async { tokio::join!(up, down) } => {}
                    }
                });
            }
        });
        Forwarder { port, held, cuts }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn hold(&self, on: bool) {
        self.held.send_replace(on);
    }

    /// Drops every connection carried now, unread bytes and all.
    fn cut(&self) {
        self.cuts.send_modify(|n| *n += 1);
        self.hold(false);
    }
}

/// Copies `from` to `to`, reading nothing while held.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut held: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if held.wait_for(|h| !h).await.is_err() {
            return;
        }
        let n = tokio::select! {
            n = from.read(&mut buf) => n,
            _ = held.wait_for(|h| *h) => continue,
        };
        match n {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_lost_unawares_registers_again_after_a_reconnect_of_milliseconds() {
    let sys = System::start().await;
    let server = sys
        .server
        .url()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the server's port");
    let link = Arc::new(Forwarder::start(server).await);
    let cfg = common::config::NatsConfig::new(link.url());
    let agent_nats = common::nats::connect(&cfg, "blip-agent").await.unwrap();
    let mut lost = sys
        .nats
        .subscribe(subject::event::AGENT_LOST)
        .await
        .unwrap();
    sys.nats.flush().await.unwrap();
    let (stop, run) = spawn_agent(&agent_nats, "w1", 1.0, |_| async {
        Ok(serde_json::Value::Null)
    });
    eventually(Duration::from_secs(20), "w1 active", || async {
        (status_of(&sys, &AgentId::new("w1").unwrap()).await? == AgentStatus::Active).then_some(())
    })
    .await;

    // Held: its heartbeats (every 500 ms) stop, and it is declared lost; the
    // event waits unread in the held connection.
    link.hold(true);
    tokio::time::timeout(Duration::from_secs(20), lost.next())
        .await
        .expect("w1 declared lost")
        .unwrap();
    assert_eq!(
        status_of(&sys, &AgentId::new("w1").unwrap()).await,
        Some(AgentStatus::Lost)
    );
    // Cut: the event goes with the connection, and the client is carried
    // again at once.
    link.cut();

    eventually(Duration::from_secs(20), "w1 active again", || async {
        (status_of(&sys, &AgentId::new("w1").unwrap()).await? == AgentStatus::Active).then_some(())
    })
    .await;
    // And it takes work.
    let flow = sys
        .client
        .create_flow(&common::msg::FlowSpec::new(
            "after the blip",
            vec![cpu_task("a", &[])],
        ))
        .await
        .unwrap();
    let done =
        crate::orchestrator::wait_finished(&sys.client, &flow.flow_id, Duration::from_secs(30))
            .await;
    assert_eq!(
        done.state,
        common::msg::FlowState::Succeeded,
        "{:?}",
        done.tasks.iter().find(|t| t.task_id == tid("a"))
    );
    let _ = stop.send(());
    let _ = run.await;
}

/// An agent whose record says `lost` but which never heard so (no event, no
/// reconnect: as after a partition that left its connection up) is told in
/// answer to its next heartbeat, registers again and is active. The record
/// is marked lost here by hand, with no event, which is what such an agent
/// sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_lost_unawares_is_told_on_its_heartbeat_and_registers_again() {
    let sys = System::start().await;
    let mut registered = sys
        .nats
        .subscribe(subject::event::AGENT_REGISTERED)
        .await
        .unwrap();
    sys.nats.flush().await.unwrap();
    let (stop, run) = spawn_agent(&sys.nats, "w1", 1.0, |_| async {
        Ok(serde_json::Value::Null)
    });
    registered.next().await.expect("w1 registered");
    mark_lost(&sys.nats, "w1").await;

    // Registered again, unprompted by any event or reconnect.
    tokio::time::timeout(Duration::from_secs(20), registered.next())
        .await
        .expect("w1 registers again")
        .unwrap();
    eventually(Duration::from_secs(20), "w1 active again", || async {
        (status_of(&sys, &AgentId::new("w1").unwrap()).await? == AgentStatus::Active).then_some(())
    })
    .await;
    let _ = stop.send(());
    let _ = run.await;
}

/// Marks `agent`'s record `lost` in the agents' bucket, with no event: what
/// an agent cut off from the allocator's side of a partition sees. A
/// compare-and-set, read again when the allocator wrote the record
/// meanwhile (a heartbeat, a booking).
pub(crate) async fn mark_lost(nats: &async_nats::Client, agent: &str) {
    let js = async_nats::jetstream::new(nats.clone());
    let agents = js.get_key_value(common::nats::KV_AGENTS).await.unwrap();
    for _ in 0..100 {
        let entry = agents
            .entry(agent)
            .await
            .unwrap()
            .expect("the agent's record");
        let mut record: serde_json::Value = serde_json::from_slice(&entry.value).unwrap();
        record["status"] = "lost".into();
        let body = serde_json::to_vec(&record).unwrap();
        match agents.update(agent, body.into(), entry.revision).await {
            Ok(_) => return,
            Err(e) if e.kind() == async_nats::jetstream::kv::UpdateErrorKind::WrongLastRevision => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("the agent's record not written: {e}"),
        }
    }
    panic!("the agent's record kept changing: not marked lost");
}
