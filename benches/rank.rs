//! Rank throughput and latency: one query against 75 passages of about 64
//! tokens (the first 48 words of the peers' E2 passages; the query is the
//! first E1 question), at 1 and 8 concurrent Rank calls over gRPC on
//! loopback, plus the model alone without gRPC. The cross-encoder is
//! all-MiniLM-L6-v2's encoder with a seeded random classifier head: the size
//! and shape of the common MiniLM-L6 cross-encoders, built here because no
//! trained one ships with a PyPI package. `benches/peers/rank_st.py` times
//! sentence-transformers' CrossEncoder on the same folder and pairs.
//!
//! `cargo bench --bench rank` (prints pairs/s and p50/p99 per call)

mod loopback;
mod workloads;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use aitl::{
    backend::Device,
    config::Config,
    model::cross_encoder::CrossEncoder,
    proto::{Passages, RankRequest, rank_request::Candidates},
    provision,
};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

const PASSAGES: usize = 75;
const PASSAGE_WORDS: usize = 48;

/// all-MiniLM-L6-v2 as a one-label BertForSequenceClassification folder.
fn minilm_cross_encoder() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    let source = provision::ensure(&provision::DEFAULT_EMBEDDER, &root.join("test-models")).unwrap();
    let dir = root.join("bench-models/minilm-l6-cross-encoder");
    if dir.join("model.safetensors").exists() {
        return dir;
    }
    std::fs::create_dir_all(&dir).unwrap();
    for file in ["tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"] {
        std::fs::copy(source.join(file), dir.join(file)).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("config.json")).unwrap()).unwrap();
    config["architectures"] = serde_json::json!(["BertForSequenceClassification"]);
    config["id2label"] = serde_json::json!({"0": "LABEL_0"});
    config["label2id"] = serde_json::json!({"LABEL_0": 0});
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config).unwrap()).unwrap();
    std::fs::write(
        dir.join("config_sentence_transformers.json"),
        r#"{"activation_fn": "torch.nn.modules.activation.Sigmoid", "model_type": "CrossEncoder"}"#,
    )
    .unwrap();

    let bytes = std::fs::read(source.join("model.safetensors")).unwrap();
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    let hidden = config["hidden_size"].as_u64().unwrap() as usize;
    let mut seed = 7u64;
    let head: Vec<u8> = (0..hidden)
        .flat_map(|_| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (((seed >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 0.2).to_le_bytes()
        })
        .collect();
    let bias = 0f32.to_le_bytes();
    let mut out: HashMap<String, TensorView> = tensors.tensors().into_iter().collect();
    out.insert("classifier.weight".into(), TensorView::new(Dtype::F32, vec![1, hidden], &head).unwrap());
    out.insert("classifier.bias".into(), TensorView::new(Dtype::F32, vec![1], &bias).unwrap());
    safetensors::serialize_to_file(out, None, &dir.join("model.safetensors")).unwrap();
    dir
}

fn rank(c: &mut Criterion) {
    let model_dir = minilm_cross_encoder();
    let query = workloads::texts("e1_queries.jsonl").swap_remove(0);
    let passages: Vec<String> = workloads::texts("e2_passages.jsonl")[..PASSAGES]
        .iter()
        .map(|p| p.split_whitespace().take(PASSAGE_WORDS).collect::<Vec<_>>().join(" "))
        .collect();

    let device = Device::Cpu;
    let model = CrossEncoder::load(&device, &model_dir, &Default::default()).unwrap();
    let texts: Vec<&str> = passages.iter().map(String::as_str).collect();
    let pairs = model.tokenize_pairs(&query, &texts).unwrap();
    let tokens: usize = pairs.iter().map(|p| p.ids.len()).sum();
    println!("rank workload: {PASSAGES} pairs, {:.1} tokens per pair on average", tokens as f64 / PASSAGES as f64);
    // For the peer script to compare against sentence-transformers' scores.
    let scores: Vec<f32> =
        pairs.iter().map(|p| model.ranking_score(&model.score_tokens(&device, &[p]).unwrap()[0])).collect();
    std::fs::write(model_dir.join("aitl_scores.json"), serde_json::to_string(&scores).unwrap()).unwrap();

    let mut group = c.benchmark_group("rank");
    group.sample_size(10).measurement_time(Duration::from_secs(8)).throughput(Throughput::Elements(PASSAGES as u64));
    group.bench_function("model_75_pairs", |b| {
        b.iter(|| {
            let pairs = model.tokenize_pairs(&query, &texts).unwrap();
            let mut sorted: Vec<_> = pairs.iter().collect();
            sorted.sort_by_key(|p| p.ids.len());
            std::hint::black_box(model.score_tokens(&device, &sorted).unwrap())
        })
    });

    let dir = tempfile::tempdir_in(Path::new(env!("CARGO_MANIFEST_DIR")).join("target")).unwrap();
    let mut config =
        Config { listen: "127.0.0.1:0".parse().unwrap(), data_dir: dir.path().into(), ..Config::default() };
    config.models.generator = "none".into();
    config.models.embedder = "none".into();
    config.models.ranker = model_dir.display().to_string();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let server = runtime.block_on(aitl::server::start(config)).unwrap();
    let request = RankRequest {
        query: query.clone(),
        candidates: Some(Candidates::Passages(Passages { texts: passages.clone() })),
        top_n: 8,
        ..Default::default()
    };
    for clients in [1usize, 8] {
        let connected = runtime.block_on(loopback::connect(server.addr, clients));
        let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
        let request = request.clone();
        group.bench_function(format!("grpc_{clients}_concurrent"), |b| {
            b.iter_custom(|iters| {
                let request = request.clone();
                loopback::run_calls(&runtime, &connected, iters, &latencies, move |mut client, _, _| {
                    let request = request.clone();
                    async move {
                        client.rank(request).await.unwrap();
                    }
                })
            })
        });
        loopback::print_percentiles(&format!("rank/grpc_{clients}_concurrent"), &latencies);
    }
    group.finish();

    runtime.block_on(server.shutdown()).unwrap();
}

criterion_group!(benches, rank);
criterion_main!(benches);
