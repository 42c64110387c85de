//! `common::nats`'s KV plumbing against a real server: a conditional write
//! or delete made from a revision the entry has moved on from stores nothing
//! and says so, and an atomic batch whose commit loses stores none of its
//! entries.

use async_nats::jetstream::{self, kv};
use common::nats::{self as bus, Written};
use testkit::NatsServer;

async fn bucket(server: &NatsServer) -> (async_nats::Client, kv::Store) {
    let nats = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(nats.clone());
    let kv = js
        .create_key_value(kv::Config {
            bucket: "plumbing".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap();
    bus::allow_atomic_batches(&js, &kv).await.unwrap();
    (nats, kv)
}

async fn stored(kv: &kv::Store, key: &str, body: &'static str, expected: Option<u64>) -> u64 {
    match bus::write_at(kv, key, body.into(), expected).await.unwrap() {
        Written::Stored(rev) => rev,
        Written::Lost => panic!("{key} not stored"),
    }
}

#[tokio::test]
async fn a_conditional_write_or_delete_from_an_old_revision_loses_and_changes_nothing() {
    let server = NatsServer::start();
    let (_nats, kv) = bucket(&server).await;
    let first = stored(&kv, "k", "1", None).await;
    let lost = bus::write_at(&kv, "k", "x".into(), None).await.unwrap();
    assert_eq!(lost, Written::Lost, "a create of a key that exists");
    let second = stored(&kv, "k", "2", Some(first)).await;
    let lost = bus::write_at(&kv, "k", "x".into(), Some(first))
        .await
        .unwrap();
    assert_eq!(lost, Written::Lost, "an update from an old revision");
    assert_eq!(kv.get("k").await.unwrap().unwrap(), "2");

    assert!(!bus::delete_at(&kv, "k", first).await.unwrap());
    assert_eq!(bus::keys(&kv).await.unwrap(), ["k"]);
    assert!(bus::delete_at(&kv, "k", second).await.unwrap());
    assert!(bus::keys(&kv).await.unwrap().is_empty());
    // A deleted key is absent again: a create takes it.
    stored(&kv, "k", "3", None).await;
}

#[tokio::test]
async fn an_atomic_batch_stores_all_its_entries_or_none() {
    let server = NatsServer::start();
    let (nats, kv) = bucket(&server).await;
    let head = stored(&kv, "head", "h0", None).await;
    let pages = [("p0", "a".into()), ("p1", "b".into())];
    let Written::Stored(next) = bus::write_batch(&nats, &kv, pages, ("head", "h1".into()), head)
        .await
        .unwrap()
    else {
        panic!("the batch lost against nobody");
    };
    assert!(next > head);
    for (key, value) in [("head", "h1"), ("p0", "a"), ("p1", "b")] {
        assert_eq!(kv.get(key).await.unwrap().unwrap(), value, "{key}");
    }

    // From the old revision of the head: nothing of it is stored.
    let stale = [("p0", "x".into()), ("p2", "y".into())];
    let lost = bus::write_batch(&nats, &kv, stale, ("head", "h2".into()), head)
        .await
        .unwrap();
    assert_eq!(lost, Written::Lost);
    assert_eq!(kv.get("head").await.unwrap().unwrap(), "h1");
    assert_eq!(kv.get("p0").await.unwrap().unwrap(), "a");
    let mut keys = bus::keys(&kv).await.unwrap();
    keys.sort();
    assert_eq!(keys, ["head", "p0", "p1"]);
}
