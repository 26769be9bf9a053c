//! kill -9 at random moments while agents submit annotations: after every
//! restart each acknowledged annotation is in the log exactly once.
//! `AITL_KILL9_ROUNDS=1000 cargo test --test crash -- --nocapture` is the
//! long mode; the default is 50 rounds.

mod common;

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aitl::{
    feedback::InteractionBook,
    kb::KnowledgeStore,
    proto::{InteractionRecord, SubmitAnnotationRequest, support_service_client::SupportServiceClient},
    trainlog::{LogOptions, TrainingLog},
};
use common::*;

const ROUNDS: usize = 50;
const CLIENTS: usize = 16;

/// Knowledge and interactions, written with the library as the engines will.
async fn seed(data_dir: &Path) -> Vec<InteractionRecord> {
    let kb = KnowledgeStore::open(&data_dir.join("knowledge.redb")).unwrap();
    kb.upsert_batch(aitl::tenancy::DEFAULT_TENANT, vec![knowledge("k1", "Refunds."), knowledge("k2", "Returns.")])
        .unwrap();
    let (log, _) = TrainingLog::open(&data_dir.join("log"), LogOptions::default()).unwrap();
    let book = InteractionBook::new(log.clone(), Default::default());
    let mut records = Vec::new();
    for _ in 0..4 {
        let record = generate_interaction(&["k1", "k2"]);
        book.record(record.clone()).await.unwrap();
        records.push(record);
    }
    log.close();
    records
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_annotation() {
    let dir = tempfile::tempdir().unwrap();
    let interactions = seed(dir.path()).await;
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let started = Instant::now();
    let rounds = std::env::var("AITL_KILL9_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(ROUNDS);
    for round in 0..rounds {
        let (mut child, addr) = serve_process(dir.path(), None);
        let channel =
            tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
        let clients: Vec<_> = (0..CLIENTS)
            .map(|client| {
                let mut support = SupportServiceClient::new(channel.clone());
                let acked = acked.clone();
                let ix = interactions[client % interactions.len()].clone();
                tokio::spawn(async move {
                    for n in 0.. {
                        let id = format!("r{round}-c{client}-n{n}");
                        let request = SubmitAnnotationRequest { annotation: Some(preference(&id, &ix, "")) };
                        match support.submit_annotation(request).await {
                            Ok(answer) => {
                                assert!(!answer.into_inner().duplicate);
                                acked.lock().unwrap().push(id);
                            }
                            Err(_) => return, // the server died mid-call: not acknowledged
                        }
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(rand::random_range(20..120))).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        for client in clients {
            client.await.unwrap();
        }
    }

    // One more start proves recovery; then read the log directly.
    let (mut child, _) = serve_process(dir.path(), None);
    child.kill().unwrap();
    child.wait().unwrap();
    let counts = annotation_counts(&dir.path().join("log"));
    let acked = acked.lock().unwrap();
    let lost = acked.iter().filter(|id| !counts.contains_key(*id)).count();
    let repeated = counts.values().filter(|&&n| n > 1).count();
    println!(
        "kill -9 x{rounds}: acked {} / recovered {} / lost {lost} / duplicated {repeated} ({} unacknowledged but durable) in {:.1?}",
        acked.len(),
        acked.len() - lost,
        counts.len() - (acked.len() - lost),
        started.elapsed()
    );
    assert!(acked.len() > rounds * 10, "the loop must acknowledge real work");
    assert_eq!(lost, 0);
    assert_eq!(repeated, 0);
}
