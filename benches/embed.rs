//! Embedding throughput and latency on the peers' fixed workloads
//! (../shared/peers/workloads): E1 short questions at batch 32, E1 single
//! query latency, E2 passages at batch 32 (truncated at 256 tokens). Batches
//! are formed in file order as the peers do; aitl runs them ragged (no
//! padding). Timed from text to unit vector.
//!
//! Each runs in f32 and in the opt-in bf16 mode (Intel AMX).
//!
//! `cargo bench --bench embed` (prints p50/p99 for single queries)

mod workloads;

use std::{path::Path, time::Instant};

use aitl::{
    backend::{Device, Precision},
    model::sentence::SentenceEmbedder,
    provision,
};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn embed_batches(model: &SentenceEmbedder, device: &Device, texts: &[String]) -> usize {
    let mut tokens = 0;
    for batch in texts.chunks(32) {
        let toks: Vec<_> = batch.iter().map(|t| model.tokenize(t).unwrap()).collect();
        tokens += toks.iter().map(|t| t.ids.len()).sum::<usize>();
        let refs: Vec<_> = toks.iter().collect();
        std::hint::black_box(model.embed_tokens(device, &refs).unwrap());
    }
    tokens
}

fn embeddings(c: &mut Criterion) {
    let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-models");
    let dir = provision::ensure(&provision::DEFAULT_EMBEDDER, &cache).unwrap();
    let device = Device::Cpu;
    let model = SentenceEmbedder::load(&device, &dir).unwrap();
    let queries = workloads::texts("e1_queries.jsonl");
    let passages = workloads::texts("e2_passages.jsonl");
    let e1 = &queries[..512];
    let e2 = &passages[..128];

    // The opt-in bf16 mode (f32 where this CPU has no AMX; the name says which ran).
    let bf16 = SentenceEmbedder::load_in(&device, &dir, Precision::Bf16).unwrap();
    let bf16_name = match Precision::Bf16.effective(&device) {
        Precision::Bf16 => "bf16",
        Precision::F32 => "bf16-unavailable-f32",
    };
    let models = [("f32", &model), (bf16_name, &bf16)];

    let mut group = c.benchmark_group("embed");
    group.sample_size(10);
    for (name, model) in models {
        group.throughput(Throughput::Elements(e1.len() as u64));
        group.bench_function(format!("e1_batch32/{name}"), |b| b.iter(|| embed_batches(model, &device, e1)));
        group.throughput(Throughput::Elements(e2.len() as u64));
        group.bench_function(format!("e2_batch32/{name}"), |b| b.iter(|| embed_batches(model, &device, e2)));
    }
    group.finish();

    for (name, model) in models {
        let e2_tokens = embed_batches(model, &device, e2);
        let started = Instant::now();
        embed_batches(model, &device, e2);
        println!(
            "embed/e2_batch32/{name}: {:.0} tokens/s ({} real tokens)",
            e2_tokens as f64 / started.elapsed().as_secs_f64(),
            e2_tokens
        );

        let mut latencies: Vec<f64> = queries[..200]
            .iter()
            .map(|q| {
                let started = Instant::now();
                std::hint::black_box(model.embed(&device, &[q.as_str()], 8192).unwrap());
                started.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        latencies.sort_by(f64::total_cmp);
        println!("embed/e1_batch1/{name}: p50 {:.3} ms, p99 {:.3} ms (200 calls)", latencies[100], latencies[198]);
    }
}

criterion_group!(benches, embeddings);
criterion_main!(benches);
