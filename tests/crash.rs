//! kill -9 at random moments while agents submit annotations: after every
//! restart each acknowledged annotation is in the log exactly once.
//! `AITL_KILL9_ROUNDS=1000 cargo test --test crash -- --nocapture` is the
//! long mode; the default is 50 rounds.

mod common;

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
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
    kb.upsert_batch(vec![knowledge("k1", "Refunds."), knowledge("k2", "Returns.")]).unwrap();
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

fn spawn_server(data_dir: &Path) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_aitl"))
        .args(["--data-dir", data_dir.to_str().unwrap(), "serve", "--listen", "127.0.0.1:0"])
        .env("AITL_LOG", "warn")
        .env("AITL_EMBEDDER", "none")
        .env("AITL_GENERATOR", "none")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.split_whitespace().nth(3).unwrap_or_else(|| panic!("server did not start: {line:?}")).to_string();
    (child, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_annotation() {
    let dir = tempfile::tempdir().unwrap();
    let interactions = seed(dir.path()).await;
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let started = Instant::now();
    let rounds = std::env::var("AITL_KILL9_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(ROUNDS);
    for round in 0..rounds {
        let (mut child, addr) = spawn_server(dir.path());
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
    let (mut child, _) = spawn_server(dir.path());
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
