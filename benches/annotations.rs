//! SubmitAnnotation through gRPC on loopback with fsync on, at 1, 16 and 64
//! concurrent clients (each on its own connection, as separate CRM backends
//! would be). Criterion reports time per annotation (throughput = its
//! inverse); p50/p99 of single calls are printed after each group.
//!
//! The same again against a server with API keys, the calls presenting an
//! agent key: the authentication layer's cost, side by side.
//!
//! `cargo bench --bench annotations`

mod loopback;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use aitl::{
    config::Config,
    feedback::new_interaction_id,
    kb::KnowledgeStore,
    keys::{KeyStore, Role},
    proto::{self, Candidate, InteractionKind, InteractionRecord, SubmitAnnotationRequest},
};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn interaction() -> InteractionRecord {
    let interaction_id = new_interaction_id();
    InteractionRecord {
        candidates: (0..2)
            .map(|i| Candidate { candidate_id: format!("{interaction_id}/c{i}"), ..Default::default() })
            .collect(),
        interaction_id,
        kind: InteractionKind::Generate as i32,
        ..Default::default()
    }
}

fn annotation(id: String, ix: &InteractionRecord) -> SubmitAnnotationRequest {
    let shown_at = SystemTime::now() - Duration::from_secs(5);
    SubmitAnnotationRequest {
        annotation: Some(proto::Annotation {
            annotation_id: id,
            interaction_id: ix.interaction_id.clone(),
            agent_id: "agent-bench".into(),
            shown_at: Some(shown_at.into()),
            annotated_at: Some((shown_at + Duration::from_secs(2)).into()),
            kind: Some(proto::annotation::Kind::Preference(proto::PairwisePreference {
                preferred_candidate_id: ix.candidates[0].candidate_id.clone(),
                other_candidate_id: ix.candidates[1].candidate_id.clone(),
                strength: proto::PreferenceStrength::Better as i32,
                rationale: "Cites the refund policy and answers the question directly.".into(),
            })),
            ..Default::default()
        }),
    }
}

fn submit_annotation(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    // Without and with API keys, in one run: the second server checks an
    // agent key on every call (the auth layer's cost).
    for keyed in [false, true] {
        // On the working disk, not tmpfs: the point is to pay for real fsyncs.
        let dir = tempfile::tempdir_in(std::env::current_dir().unwrap().join("target")).unwrap();
        let mut config =
            Config { listen: "127.0.0.1:0".parse().unwrap(), data_dir: dir.path().into(), ..Config::default() };
        config.models.generator = "none".into();
        KnowledgeStore::open(&config.knowledge_path()).unwrap();
        let key = keyed.then(|| {
            let mut keys = KeyStore::default();
            let (key, _) = keys.create("bench", Role::Agent, Some("agent-bench")).unwrap();
            keys.save(dir.path()).unwrap();
            key
        });
        let server = runtime.block_on(aitl::server::start(config)).unwrap();
        // Shown to the key's tenant, which alone may annotate it.
        let tenant = if keyed { "bench" } else { aitl::tenancy::DEFAULT_TENANT };
        let ix = InteractionRecord { tenant: tenant.into(), ..interaction() };
        runtime.block_on(server.state.interactions.record(ix.clone())).unwrap();
        let ix = Arc::new(ix);
        let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));

        let name = if keyed { "submit_annotation_with_key" } else { "submit_annotation" };
        let mut group = c.benchmark_group(name);
        group.throughput(Throughput::Elements(1)).sample_size(10).measurement_time(Duration::from_secs(6));
        for clients in [1usize, 16, 64] {
            let connected = runtime.block_on(loopback::connect(server.addr, clients));
            let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
            group.bench_function(format!("{clients}_clients"), |b| {
                b.iter_custom(|iters| {
                    let (ix, counter, key) = (ix.clone(), counter.clone(), key.clone());
                    loopback::run_calls(&runtime, &connected, iters, &latencies, move |mut client, _, _| {
                        let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let mut request = tonic::Request::new(annotation(format!("bench-{n}"), &ix));
                        if let Some(key) = &key {
                            request.metadata_mut().insert("authorization", format!("Bearer {key}").parse().unwrap());
                        }
                        async move {
                            client.submit_annotation(request).await.unwrap();
                        }
                    })
                })
            });
            loopback::print_percentiles(&format!("{name}/{clients}_clients"), &latencies);
        }
        group.finish();
        runtime.block_on(server.shutdown()).unwrap();
    }
}

criterion_group!(benches, submit_annotation);
criterion_main!(benches);
