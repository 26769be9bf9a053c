//! Decoding speed on the peers' G1 workload (../shared/peers/workloads:
//! two ~500-token chat-formatted grounded prompts, token ids as llama.cpp
//! tokenizes them): prefill tokens/s, then 128 greedy tokens, for one
//! sequence and for both prompts decoded together (2 threads, the default
//! generator SmolLM2-135M-Instruct Q4_1). Compare with
//! ../shared/peers/bench_llama.py in the same session.
//!
//! Also time to first token and inter-token latency of GenerateStream over
//! gRPC on loopback (the first G1 conversation, greedy, one candidate).
//!
//! `cargo bench --bench generate`

use std::{path::Path, time::Instant};

use aitl::{
    backend::Device,
    engine::sampler::argmax,
    model::{
        gguf::GgufFile,
        llama::{KvCache, Llama, Step},
    },
    provision,
};
use criterion::{Criterion, criterion_group, criterion_main};

const NEW_TOKENS: usize = 128;

fn prompts() -> Vec<Vec<u32>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/peers/workloads/g1_tokens.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    value["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect())
        .collect()
}

/// Prefills each prompt in its own cache (one forward for all), then decodes
/// greedily; returns (prefill seconds, decode seconds).
fn run(model: &Llama, device: &Device, prompts: &[Vec<u32>]) -> (f64, f64) {
    let mut caches: Vec<KvCache> = prompts.iter().map(|_| model.new_cache()).collect();
    let started = Instant::now();
    let mut steps: Vec<Step> =
        prompts.iter().zip(caches.iter_mut()).map(|(p, cache)| Step { tokens: p, cache }).collect();
    let mut next: Vec<u32> = model.forward(device, &mut steps).unwrap().iter().map(|l| argmax(l)).collect();
    let prefill = started.elapsed().as_secs_f64();
    let started = Instant::now();
    for _ in 1..NEW_TOKENS {
        let tokens: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let mut steps: Vec<Step> =
            tokens.iter().zip(caches.iter_mut()).map(|(t, cache)| Step { tokens: t, cache }).collect();
        next = model.forward(device, &mut steps).unwrap().iter().map(|l| argmax(l)).collect();
    }
    (prefill, started.elapsed().as_secs_f64())
}

fn generate(c: &mut Criterion) {
    let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-models");
    let model_file = provision::DEFAULT_GENERATOR;
    let gguf = provision::ensure(&model_file, &cache).unwrap().join(model_file.weights);
    let device = Device::Cpu;
    let model = Llama::from_gguf(&device, &GgufFile::open(&gguf).unwrap()).unwrap();
    let prompts = prompts();

    for (name, batch) in [("single", &prompts[..1]), ("batch2", &prompts[..2])] {
        let tokens: usize = batch.iter().map(Vec::len).sum();
        let mut figures: Vec<(f64, f64)> = (0..5).map(|_| run(&model, &device, batch)).collect();
        figures.sort_by(|a, b| a.0.total_cmp(&b.0));
        let prefill = figures[2].0;
        figures.sort_by(|a, b| a.1.total_cmp(&b.1));
        let decode = figures[2].1;
        println!(
            "generate/{name}: prefill {:.0} tokens/s ({tokens} tokens), decode {:.1} tokens/s aggregate \
             ({} sequences × {} steps), medians of 5",
            tokens as f64 / prefill,
            (batch.len() * (NEW_TOKENS - 1)) as f64 / decode,
            batch.len(),
            NEW_TOKENS - 1
        );
    }
    stream_latency(&gguf);

    let mut group = c.benchmark_group("generate");
    group.sample_size(10);
    group.bench_function("prefill_509", |b| {
        b.iter(|| {
            let mut cache = model.new_cache();
            model.forward(&device, &mut [Step { tokens: &prompts[0], cache: &mut cache }]).unwrap()
        })
    });
    group.finish();
}

/// Time to first delta and the gaps between deltas of GenerateStream, medians over 5 calls.
fn stream_latency(gguf: &Path) {
    use aitl::proto::{
        ConversationTurn, GenerateRequest, SamplingParams, Speaker, generate_event::Event,
        support_service_client::SupportServiceClient,
    };
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/peers/workloads/g1_prompts.jsonl");
    let line = std::fs::read_to_string(&path).unwrap().lines().next().unwrap().to_string();
    let prompt: serde_json::Value = serde_json::from_str(&line).unwrap();
    let question = prompt["messages"].as_array().unwrap().last().unwrap()["content"].as_str().unwrap().to_string();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir_in(Path::new(env!("CARGO_MANIFEST_DIR")).join("target")).unwrap();
    let mut config = aitl::config::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().into(),
        ..Default::default()
    };
    config.models.embedder = "none".into();
    config.models.generator = gguf.display().to_string();
    runtime.block_on(async {
        let server = aitl::server::start(config).await.unwrap();
        let mut client = SupportServiceClient::connect(format!("http://{}", server.addr)).await.unwrap();
        let (mut first, mut gaps) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            let request = GenerateRequest {
                conversation: vec![ConversationTurn { speaker: Speaker::Customer as i32, text: question.clone() }],
                num_candidates: 1,
                sampling: Some(SamplingParams { max_new_tokens: 64, ..Default::default() }),
                ..Default::default()
            };
            let started = Instant::now();
            let mut stream = client.generate_stream(request).await.unwrap().into_inner();
            let mut last: Option<Instant> = None;
            while let Some(event) = stream.message().await.unwrap() {
                if let Some(Event::Delta(_)) = event.event {
                    let now = Instant::now();
                    match last {
                        None => first.push(now.duration_since(started).as_secs_f64() * 1e3),
                        Some(previous) => gaps.push(now.duration_since(previous).as_secs_f64() * 1e3),
                    }
                    last = Some(now);
                }
            }
        }
        first.sort_by(f64::total_cmp);
        gaps.sort_by(f64::total_cmp);
        let at = |v: &[f64], p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)];
        println!(
            "generate/stream over gRPC: time to first token p50 {:.0} ms (prompt of ~500 tokens), inter-token \
             p50 {:.1} ms, p99 {:.1} ms",
            at(&first, 0.5),
            at(&gaps, 0.5),
            at(&gaps, 0.99)
        );
        server.shutdown().await.unwrap();
    });
}

criterion_group!(benches, generate);
criterion_main!(benches);
