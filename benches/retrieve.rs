//! Retrieve over gRPC on loopback against a 100,000-object knowledge base,
//! at 1 and 16 concurrent clients (each on its own connection); also prints
//! how long the server takes to load the 100k stored vectors at start.
//! Queries are embedded for real; the 100k objects get random unit vectors
//! stored under the model's version (embedding 100k texts would take
//! minutes and measure ingestion, not retrieval).
//!
//! `cargo bench --bench retrieve`

mod loopback;

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aitl::{
    config::Config,
    kb::KnowledgeStore,
    model::sentence::SentenceEmbedder,
    proto::{KnowledgeKind, KnowledgeObject, RetrieveRequest},
    provision,
};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const OBJECTS: usize = 100_000;
const QUERIES: [&str; 3] =
    ["Can I get a refund for a damaged item?", "Is there free parking at the hotel?", "How do I reset my password?"];

fn retrieve(c: &mut Criterion) {
    let model_dir = provision::ensure(
        &provision::DEFAULT_EMBEDDER,
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-models"),
    )
    .unwrap();
    let version = SentenceEmbedder::load(&aitl::backend::Device::Cpu, &model_dir).unwrap().version().to_string();
    let dir = tempfile::tempdir_in(Path::new(env!("CARGO_MANIFEST_DIR")).join("target")).unwrap();
    let mut config =
        Config { listen: "127.0.0.1:0".parse().unwrap(), data_dir: dir.path().into(), ..Config::default() };
    config.models.generator = "none".into();
    config.models.embedder = model_dir.display().to_string();
    {
        let store = KnowledgeStore::open(&config.knowledge_path()).unwrap();
        let mut seed = 1u64;
        let mut next = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        for start in (0..OBJECTS).step_by(1000) {
            let objects: Vec<KnowledgeObject> = (start..start + 1000)
                .map(|i| KnowledgeObject {
                    id: format!("doc-{i:06}"),
                    kind: KnowledgeKind::Faq as i32,
                    title: format!("Topic {}", i % 500),
                    text: format!("Synthetic knowledge object {i} about topic {}.", i % 500),
                    metadata: [("shard".to_string(), (i % 8).to_string())].into(),
                    ..Default::default()
                })
                .collect();
            store.upsert_batch(aitl::tenancy::DEFAULT_TENANT, objects).unwrap();
            let vectors: Vec<(String, u64, Vec<f32>)> = (start..start + 1000)
                .map(|i| {
                    let v: Vec<f32> = (0..384).map(|_| next()).collect();
                    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                    (format!("doc-{i:06}"), 1, v.into_iter().map(|x| x / norm).collect())
                })
                .collect();
            store.put_vectors(&version, aitl::tenancy::DEFAULT_TENANT, &vectors).unwrap();
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let started = Instant::now();
    let server = runtime.block_on(aitl::server::start(config)).unwrap();
    println!("server start with {OBJECTS} stored vectors (model load + index load): {:.2?}", started.elapsed());

    let mut group = c.benchmark_group("retrieve_100k");
    group.throughput(Throughput::Elements(1)).sample_size(10).measurement_time(Duration::from_secs(8));
    for clients in [1usize, 16] {
        let connected = runtime.block_on(loopback::connect(server.addr, clients));
        let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
        group.bench_function(format!("{clients}_clients_top75"), |b| {
            b.iter_custom(|iters| {
                loopback::run_calls(&runtime, &connected, iters, &latencies, move |mut client, c, i| async move {
                    let query = QUERIES[(c + i as usize) % QUERIES.len()];
                    let request = RetrieveRequest { query: query.into(), top_k: 75, ..Default::default() };
                    let answer = client.retrieve(request).await.unwrap().into_inner();
                    if c == 0 && i == 0 {
                        let timings = answer.timings.unwrap_or_default();
                        println!(
                            "  server timings: embed queue {:.2} ms, embed compute {:.2} ms, total before logging {:.2} ms",
                            timings.queue_ns as f64 / 1e6,
                            timings.compute_ns as f64 / 1e6,
                            timings.total_ns as f64 / 1e6
                        );
                    }
                })
            })
        });
        loopback::print_percentiles(&format!("retrieve_100k/{clients}_clients"), &latencies);
    }
    group.finish();
    runtime.block_on(server.shutdown()).unwrap();
}

criterion_group!(benches, retrieve);
criterion_main!(benches);
