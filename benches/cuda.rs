//! The CUDA backend's figures, printed as a table: the peers' E1 and E2
//! embedding workloads (../shared/peers/workloads) at batch 32 and 256 in
//! f32 and bf16, single-query latency, Rank pairs/s, vector search over
//! 1,000,000 vectors (p50/p99, f32 and f16 rows, against the host index),
//! and each op's achieved GB/s or TFLOP/s beside the device's measured
//! copy bandwidth and matrix rates. Timings synchronize the GPU; each
//! figure is the median of several runs after a warm-up.
//!
//! `cargo bench --bench cuda` on a machine with an NVIDIA GPU (it says so
//! and stops where there is none). `AITL_TEST_EMBEDDER` and
//! `AITL_TEST_CROSS_ENCODER` name the models (scripts/gpu-check sets them).

mod workloads;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aitl::{
    backend::{
        Activation, AttentionShape, Device, DeviceChoice, Precision, SeqLayout,
        cuda::{KernelCache, search::VectorPrecision},
    },
    kb::{
        device_index::DeviceIndex,
        index::{ExactIndex, IndexEntry, Query, VectorIndex},
    },
    model::{cross_encoder::CrossEncoder, sentence::SentenceEmbedder},
    proto::KnowledgeFilter,
};

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() - 1) as f64 * p).round() as usize]
}

/// Median wall time of `f` over `runs` runs after one warm-up, GPU work included.
fn time(device: &Device, runs: usize, mut f: impl FnMut()) -> Duration {
    f();
    device.synchronize().unwrap();
    median(
        (0..runs)
            .map(|_| {
                let started = Instant::now();
                f();
                device.synchronize().unwrap();
                started.elapsed()
            })
            .collect(),
    )
}

struct Table(Vec<String>);

impl Table {
    fn row(&mut self, what: &str, figure: String) {
        let line = format!("| {what} | {figure} |");
        println!("{line}");
        self.0.push(line);
    }
}

fn embed_batches(model: &SentenceEmbedder, device: &Device, texts: &[String], batch: usize) -> usize {
    let mut tokens = 0;
    for chunk in texts.chunks(batch) {
        let toks: Vec<_> = chunk.iter().map(|t| model.tokenize(t).unwrap()).collect();
        tokens += toks.iter().map(|t| t.ids.len()).sum::<usize>();
        let refs: Vec<_> = toks.iter().collect();
        std::hint::black_box(model.embed_tokens(device, &refs).unwrap());
    }
    tokens
}

fn model_dir(var: &str) -> Option<PathBuf> {
    std::env::var_os(var).map(PathBuf::from)
}

fn main() {
    let cache = KernelCache::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("target/kernel-cache"));
    let device = match Device::select(DeviceChoice::Cuda(0), &cache) {
        Ok((device, _)) => device,
        Err(e) => {
            println!("cuda bench: skipped, no GPU: {e}");
            return;
        }
    };
    let mut table = Table(Vec::new());
    println!("device: {}\n\n| figure | value |\n| --- | --- |", device.label());
    ceilings(&device, &mut table);
    ops(&device, &mut table);

    let embedder = model_dir("AITL_TEST_EMBEDDER").unwrap_or_else(|| {
        aitl::provision::ensure(
            &aitl::provision::DEFAULT_EMBEDDER,
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-models"),
        )
        .unwrap()
    });
    embeddings(&device, &embedder, &mut table);
    if let Some(dir) = model_dir("AITL_TEST_CROSS_ENCODER") {
        rank(&device, &dir, &mut table);
    } else {
        println!("rank: skipped, AITL_TEST_CROSS_ENCODER names no cross-encoder");
    }
    search(&device, &mut table);
}

/// What the device can do: a device-to-device copy (bytes read + written)
/// and large matrix products through cuBLAS in f32 and bf16.
fn ceilings(device: &Device, table: &mut Table) {
    let rows = 1 << 18;
    let x = device.tensor(&[rows, 1024], vec![1.0; rows * 1024]).unwrap();
    let t = time(device, 10, || drop(device.slice_rows(&x, 0..rows).unwrap()));
    let bytes = 2.0 * (rows * 1024 * 4) as f64;
    table.row("device copy (1 GiB read + written)", format!("{:.0} GB/s", bytes / t.as_secs_f64() / 1e9));
    let n = 8192;
    let a = device.tensor(&[n, n], (0..n * n).map(|i| ((i % 7) as f32 - 3.0) * 0.01).collect()).unwrap();
    for precision in [Precision::F32, Precision::Bf16] {
        let w = device.weight_in(precision, n, n, (0..n * n).map(|i| ((i % 5) as f32 - 2.0) * 0.01).collect()).unwrap();
        let t = time(device, 5, || drop(device.linear(&a, &w, None, Activation::None).unwrap()));
        let flops = 2.0 * (n as f64).powi(3);
        table.row(
            &format!("cuBLAS {n}³ product, {precision:?}"),
            format!("{:.1} TFLOP/s", flops / t.as_secs_f64() / 1e12),
        );
    }
}

/// Each hand-written kernel at a size that fills the GPU, with the bytes or
/// FLOPs it must move or do.
fn ops(device: &Device, table: &mut Table) {
    let (rows, width) = (65_536, 768);
    let values: Vec<f32> = (0..rows * width).map(|i| ((i % 13) as f32 - 6.0) * 0.1).collect();
    let mut x = device.tensor(&[rows, width], values.clone()).unwrap();
    let residual = device.tensor(&[rows, width], values).unwrap();
    let (gamma, beta) =
        (device.tensor(&[width], vec![1.0; width]).unwrap(), device.tensor(&[width], vec![0.0; width]).unwrap());
    let t = time(device, 10, || device.add_layer_norm(&mut x, Some(&residual), &gamma, &beta, 1e-12).unwrap());
    let bytes = 3.0 * (rows * width * 4) as f64;
    table.row(
        "add_layer_norm 65536×768 (x, residual read, x written)",
        format!("{:.0} GB/s", bytes / t.as_secs_f64() / 1e9),
    );
    let t = time(device, 10, || device.l2_normalize(&mut x).unwrap());
    table.row("l2_normalize 65536×768", format!("{:.0} GB/s", 2.0 * (rows * width * 4) as f64 / t.as_secs_f64() / 1e9));
    for (head_dim, heads) in [(32, 12), (64, 12)] {
        let lengths = vec![256; 64];
        let layout = SeqLayout::from_lengths(&lengths);
        let tokens = layout.total_tokens();
        let qkv = device.tensor(&[tokens, 3 * heads * head_dim], vec![0.01; tokens * 3 * heads * head_dim]).unwrap();
        let shape = AttentionShape { heads, head_dim };
        let t = time(device, 10, || drop(device.attention(&qkv, &layout, shape).unwrap()));
        let flops = 4.0 * lengths.iter().map(|&l| (l * l) as f64).sum::<f64>() * (heads * head_dim) as f64;
        table.row(
            &format!("attention 64×256 tokens, {heads} heads of {head_dim}"),
            format!("{:.1} TFLOP/s", flops / t.as_secs_f64() / 1e12),
        );
    }
}

fn embeddings(device: &Device, dir: &Path, table: &mut Table) {
    let queries = workloads::texts("e1_queries.jsonl");
    let passages = workloads::texts("e2_passages.jsonl");
    for precision in [Precision::F32, Precision::Bf16] {
        let model = SentenceEmbedder::load_in(device, dir, precision).unwrap();
        for batch in [32, 256] {
            let mut tokens = 0;
            let t = time(device, 5, || tokens = embed_batches(&model, device, &queries, batch));
            table.row(
                &format!("E1 {precision:?} batch {batch}"),
                format!(
                    "{:.0} embeddings/s ({:.0} tokens/s)",
                    queries.len() as f64 / t.as_secs_f64(),
                    tokens as f64 / t.as_secs_f64()
                ),
            );
            let t = time(device, 5, || tokens = embed_batches(&model, device, &passages, batch));
            table.row(
                &format!("E2 {precision:?} batch {batch}"),
                format!(
                    "{:.0} passages/s ({:.0} tokens/s)",
                    passages.len() as f64 / t.as_secs_f64(),
                    tokens as f64 / t.as_secs_f64()
                ),
            );
        }
        let mut single: Vec<Duration> = queries[..500]
            .iter()
            .map(|q| {
                let started = Instant::now();
                model.embed(device, &[q], 8_192).unwrap();
                started.elapsed()
            })
            .collect();
        table.row(
            &format!("E1 {precision:?} single query, text to vector"),
            format!("p50 {:.2?}, p99 {:.2?}", percentile(&mut single, 0.5), percentile(&mut single, 0.99)),
        );
    }
}

fn rank(device: &Device, dir: &Path, table: &mut Table) {
    let passages = workloads::texts("e2_passages.jsonl");
    let model = CrossEncoder::load(device, dir, &Default::default()).unwrap();
    let query = "Can I get a refund if my booking is cancelled?";
    let refs: Vec<&str> = passages.iter().map(String::as_str).collect();
    let pairs = model.tokenize_pairs(query, &refs).unwrap();
    for batch in [32, 75] {
        let t = time(device, 5, || {
            for chunk in pairs.chunks(batch) {
                let refs: Vec<_> = chunk.iter().collect();
                std::hint::black_box(model.score_tokens(device, &refs).unwrap());
            }
        });
        table.row(
            &format!("Rank batch {batch} (E2 passages)"),
            format!("{:.0} pairs/s", pairs.len() as f64 / t.as_secs_f64()),
        );
    }
}

/// 1,000,000 random unit vectors of 384: one query at a time (p50/p99) and
/// batches of 16, on the device in f32 and f16 and on the host.
fn search(device: &Device, table: &mut Table) {
    let Device::Cuda(gpu) = device else { return };
    let (count, dim) = (1_000_000, 384);
    let mut seed = 7u64;
    let mut next = move || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
    };
    let unit = |v: Vec<f32>| {
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / norm).collect::<Vec<_>>()
    };
    let vectors: Vec<Vec<f32>> = (0..count).map(|_| unit((0..dim).map(|_| next()).collect())).collect();
    let queries: Vec<Vec<f32>> = (0..200).map(|_| unit((0..dim).map(|_| next()).collect())).collect();
    let entry =
        |i: usize| IndexEntry { id: format!("o{i}"), version: 1, kind: (i % 4) as i32, metadata: Default::default() };
    let host = ExactIndex::new(dim, "v");
    for (i, v) in vectors.iter().enumerate() {
        host.upsert(entry(i), v);
    }
    let indexes: Vec<(String, Box<dyn VectorIndex>)> = [VectorPrecision::F32, VectorPrecision::F16]
        .into_iter()
        .map(|p| {
            let index = DeviceIndex::new(gpu.clone(), dim, "v", p).unwrap();
            for (i, v) in vectors.iter().enumerate() {
                index.upsert(entry(i), v);
            }
            (format!("GPU {p:?}"), Box::new(index) as Box<dyn VectorIndex>)
        })
        .chain([("host (all cores)".to_string(), Box::new(host) as Box<dyn VectorIndex>)])
        .collect();
    for (name, index) in &indexes {
        let filter = KnowledgeFilter::default();
        index.search(&queries[0], 75, &filter); // the first search uploads the rows
        let mut single: Vec<Duration> = queries
            .iter()
            .map(|q| {
                let started = Instant::now();
                std::hint::black_box(index.search(q, 75, &filter));
                started.elapsed()
            })
            .collect();
        table.row(
            &format!("search 1M×384, top 75, {name}, one query"),
            format!("p50 {:.2?}, p99 {:.2?}", percentile(&mut single, 0.5), percentile(&mut single, 0.99)),
        );
        let batch: Vec<Query> =
            queries[..16].iter().map(|q| Query { vector: q.clone(), k: 75, filter: filter.clone() }).collect();
        let t = time(device, 10, || drop(index.search_many(&batch)));
        let row_bytes = if name.contains("F16") { 2 } else { 4 };
        table.row(
            &format!("search 1M×384, top 75, {name}, 16 queries"),
            format!(
                "{:.2?} per batch, {:.0} queries/s, rows read at {:.0} GB/s",
                t,
                16.0 / t.as_secs_f64(),
                (count * dim * row_bytes) as f64 / t.as_secs_f64() / 1e9
            ),
        );
    }
}
