//! Each service is a NATS micro service: `$SRV.PING` from any client gets
//! answers from four distinct services, `$SRV.INFO` lists each one's endpoints,
//! `$SRV.STATS` counts requests, and replicas share the work.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::subject;
use futures::StreamExt;
use testkit::{eventually, start_service, System, SERVICES};

async fn gather(nats: &async_nats::Client, subject: &str) -> Vec<serde_json::Value> {
    let inbox = nats.new_inbox();
    let mut sub = nats.subscribe(inbox.clone()).await.unwrap();
    nats.publish_with_reply(subject.to_owned(), inbox, "".into())
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(500), sub.next()).await {
        out.push(serde_json::from_slice(&msg.payload).unwrap());
    }
    out
}

#[tokio::test]
async fn srv_ping_answers_from_four_services_and_info_lists_endpoints() {
    let sys = System::start().await;
    let pings = gather(&sys.nats, subject::SRV_PING).await;
    let names: BTreeSet<&str> = pings.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, SERVICES.into_iter().collect());
    for p in &pings {
        assert_eq!(p["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(p["type"], "io.nats.micro.v1.ping_response");
    }

    let infos = gather(&sys.nats, subject::SRV_INFO).await;
    let endpoints: BTreeMap<&str, Vec<&str>> = infos
        .iter()
        .map(|i| {
            let subjects = i["endpoints"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["subject"].as_str().unwrap())
                .collect();
            (i["name"].as_str().unwrap(), subjects)
        })
        .collect();
    assert!(endpoints["orchestrator"].contains(&subject::FLOW_CREATE));
    assert!(endpoints["orchestrator"].contains(&subject::FLOW_STATUS));
    assert!(endpoints["allocator"].contains(&subject::ALLOCATE));
    assert!(endpoints["allocator"].contains(&subject::AGENT_REGISTER));
    assert!(endpoints["allocator"].contains(&subject::AGENT_REGISTER_ALL));
    assert!(endpoints["synchronizer"].contains(&subject::STATE_PUT));
    assert!(endpoints["synchronizer"].contains(&subject::AGENT_STATE_PUT_ALL));
    assert!(endpoints["monitor"].contains(&subject::MONITOR_METRICS));
    for i in &infos {
        assert!(!i["description"].as_str().unwrap().is_empty());
    }
}

#[tokio::test]
async fn replicas_share_a_queue_group_and_stats_count_requests() {
    let sys = System::start().await;
    // A second allocator replica on the same server.
    let second = start_service("allocator", sys.server.config());
    let ping = format!("{}.allocator", subject::SRV_PING);
    eventually(
        Duration::from_secs(10),
        "two allocator instances answer PING",
        || async { (gather(&sys.nats, &ping).await.len() == 2).then_some(()) },
    )
    .await;

    // Releases of allocations nobody holds: an endpoint no service or the
    // monitor calls on its own (the monitor reads capacity with each health
    // check), so every request counted here is one of these.
    for i in 0..20 {
        let release: common::msg::ReleaseRequest =
            serde_json::from_value(serde_json::json!({ "allocation_id": format!("nobody-{i}") }))
                .unwrap();
        sys.client.release(&release).await.unwrap();
    }
    let stats = gather(&sys.nats, &format!("{}.allocator", subject::SRV_STATS)).await;
    let served: Vec<u64> = stats
        .iter()
        .map(|s| {
            s["endpoints"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["subject"] == subject::RELEASE)
                .map(|e| e["num_requests"].as_u64().unwrap())
                .unwrap()
        })
        .collect();
    assert_eq!(
        served.iter().sum::<u64>(),
        20,
        "each request served once: {served:?}"
    );
    second.stop().await.unwrap();
}

/// A replica names itself in the file `COORD_INSTANCE_FILE` gives, so a
/// container's health check pings that replica and not whichever answers
/// first: with another replica up, the one that died is reported as dead.
#[tokio::test]
async fn a_health_check_pings_its_own_replica_not_any() {
    common::telemetry::init_for_tests();
    let server = testkit::NatsServer::start();
    let nats = server.connect().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("coord-instance");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_coord-proc"));
    cmd.args(["--nats-url", server.url(), "allocator"])
        .env(common::service::INSTANCE_FILE_ENV, &file);
    let replica = testkit::Process::command(cmd);
    testkit::wait_for_service(&nats, "allocator").await;
    let id = eventually(
        Duration::from_secs(10),
        "the replica writes its id",
        || async { std::fs::read_to_string(&file).ok() },
    )
    .await;
    let info = gather(&nats, &format!("{}.allocator", subject::SRV_INFO)).await;
    assert_eq!(
        info.iter()
            .map(|i| i["id"].as_str().unwrap())
            .collect::<Vec<_>>(),
        [id.as_str()],
        "the file names the replica that wrote it"
    );
    let cfg = server.config();
    assert!(common::service::ping(&cfg, "allocator", Some(&id)).await);

    let _other = testkit::Replica::start("allocator", server.config());
    drop(replica);
    eventually(
        Duration::from_secs(10),
        "another replica answers",
        || async {
            common::service::ping(&cfg, "allocator", None)
                .await
                .then_some(())
        },
    )
    .await;
    assert!(
        !common::service::ping(&cfg, "allocator", Some(&id)).await,
        "the replica that died is reported dead while another answers"
    );
}
