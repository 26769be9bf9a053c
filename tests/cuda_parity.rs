//! The CUDA backend against the CPU backend, its executable specification:
//! every op on fresh random inputs with degenerate shapes (one-token
//! sequences, a batch of one, odd widths), outputs poisoned with NaN
//! (`AITL_CUDA_POISON`) so an element a kernel skips fails; then whole
//! models (embeddings cosine ≥ 0.9999 in f32 and ≥ 0.999 in bf16, cross-
//! encoder scores within 1e-3) and vector search (top-75 ids equal to the
//! exact host index on DSTC11 queries, except at exact ties).
//!
//! Needs a GPU; without one each test says it skipped. `scripts/gpu-check`
//! sets `AITL_REQUIRE_GPU`, which turns a skip into a failure.

mod common;

use std::path::Path;

use aitl::{
    backend::cuda::search::VectorPrecision,
    backend::{Activation, AttentionShape, Device, Precision, SeqLayout, half::f32_to_bf16},
    kb::{
        device_index::DeviceIndex,
        index::{ExactIndex, Hit, IndexEntry, Query, VectorIndex},
    },
    model::{cross_encoder::CrossEncoder, sentence::SentenceEmbedder},
    proto::KnowledgeFilter,
};
use common::parity::{close, gpu, on, random};
use rand::{Rng, SeedableRng, rngs::StdRng};

#[test]
fn linear_in_f32_and_bf16_matches_the_cpu() {
    let Some(cuda) = gpu("linear") else { return };
    let cpu = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(1);
    for (m, k, n) in [(1, 1, 1), (1, 384, 384), (7, 37, 1000), (130, 384, 1536), (513, 768, 3072)] {
        let (x, w, b) = (random(&mut rng, m * k, 1.0), random(&mut rng, k * n, 0.1), random(&mut rng, n, 0.5));
        for act in [Activation::None, Activation::Gelu, Activation::Tanh] {
            for bias in [false, true] {
                let run = |d: &Device, precision: Precision, x: &[f32], w: &[f32]| {
                    let weight = d.weight_in(precision, k, n, w.to_vec()).unwrap();
                    let bias = bias.then(|| on(d, &[n], &b));
                    d.linear(&on(d, &[m, k], x), &weight, bias.as_ref(), act).unwrap()
                };
                let what = format!("linear {m}×{k}×{n} {act:?} bias={bias}");
                close(&what, &run(&cuda, Precision::F32, &x, &w), &run(&cpu, Precision::F32, &x, &w), 1e-4);
                // bf16: both operands rounded, sums in f32; the CPU reference
                // takes the rounded operands in f32.
                let round =
                    |v: &[f32]| v.iter().map(|&a| f32::from_bits((f32_to_bf16(a) as u32) << 16)).collect::<Vec<_>>();
                let reference = run(&cpu, Precision::F32, &round(&x), &round(&w));
                close(&format!("{what} bf16"), &run(&cuda, Precision::Bf16, &x, &w), &reference, 1e-3);
            }
        }
    }
}

#[test]
fn norms_embeddings_and_elementwise_ops_match_the_cpu() {
    let Some(cuda) = gpu("norms") else { return };
    let cpu = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(2);
    for (rows, width) in [(1, 1), (1, 384), (9, 37), (130, 768), (3, 4099)] {
        let (x, r) = (random(&mut rng, rows * width, 3.0), random(&mut rng, rows * width, 1.0));
        let (g, b) = (random(&mut rng, width, 1.5), random(&mut rng, width, 0.5));
        for residual in [false, true] {
            let run = |d: &Device| {
                let mut t = on(d, &[rows, width], &x);
                let res = on(d, &[rows, width], &r);
                d.add_layer_norm(&mut t, residual.then_some(&res), &on(d, &[width], &g), &on(d, &[width], &b), 1e-12)
                    .unwrap();
                t
            };
            close(&format!("add_layer_norm {rows}×{width} residual={residual}"), &run(&cuda), &run(&cpu), 1e-5);
        }
        let rms = |d: &Device| d.rms_norm(&on(d, &[rows, width], &x), &on(d, &[width], &g), 1e-6).unwrap();
        close(&format!("rms_norm {rows}×{width}"), &rms(&cuda), &rms(&cpu), 1e-5);
        let l2 = |d: &Device| {
            let mut t = on(d, &[rows, width], &x);
            d.l2_normalize(&mut t).unwrap();
            t
        };
        close(&format!("l2_normalize {rows}×{width}"), &l2(&cuda), &l2(&cpu), 1e-6);
        let add = |d: &Device| {
            let mut t = on(d, &[rows, width], &x);
            d.add(&mut t, &on(d, &[rows, width], &r)).unwrap();
            d.add_bias(&mut t, &on(d, &[width], &b)).unwrap();
            t
        };
        close(&format!("add, add_bias {rows}×{width}"), &add(&cuda), &add(&cpu), 0.0);
        let gather: Vec<u32> = (0..5).map(|_| rng.random_range(0..rows as u32)).collect();
        let rows_of = |d: &Device| d.gather_rows(&on(d, &[rows, width], &x), &gather).unwrap();
        close(&format!("gather_rows {rows}×{width}"), &rows_of(&cuda), &rows_of(&cpu), 0.0);
        let slice = |d: &Device| d.slice_rows(&on(d, &[rows, width], &x), rows / 2..rows).unwrap();
        close(&format!("slice_rows {rows}×{width}"), &slice(&cuda), &slice(&cpu), 0.0);
    }
    // A fused projection's parts, and BERT's three embedding tables.
    for (tokens, widths) in [(1, [8, 8, 8]), (37, [384, 384, 384]), (5, [1, 30, 7])] {
        let width: usize = widths.iter().sum();
        let x = random(&mut rng, tokens * width, 1.0);
        let cpu_parts = cpu.split_columns(&on(&cpu, &[tokens, width], &x), &widths).unwrap();
        let cuda_parts = cuda.split_columns(&on(&cuda, &[tokens, width], &x), &widths).unwrap();
        for (i, (c, g)) in cpu_parts.iter().zip(&cuda_parts).enumerate() {
            close(&format!("split_columns {tokens}×{width} part {i}"), g, c, 0.0);
        }
    }
    for (tokens, width) in [(1, 32), (200, 384), (7, 1000)] {
        let (vocab, positions) = (300, 512);
        let tables = [
            random(&mut rng, vocab * width, 1.0),
            random(&mut rng, positions * width, 1.0),
            random(&mut rng, 2 * width, 1.0),
        ];
        let ids: Vec<u32> = (0..tokens).map(|_| rng.random_range(0..vocab as u32)).collect();
        let pos: Vec<u32> = (0..tokens as u32).collect();
        let types: Vec<u32> = (0..tokens).map(|_| rng.random_range(0..2)).collect();
        let (g, b) = (random(&mut rng, width, 1.5), random(&mut rng, width, 0.5));
        let run = |d: &Device| {
            let t = [
                on(d, &[vocab, width], &tables[0]),
                on(d, &[positions, width], &tables[1]),
                on(d, &[2, width], &tables[2]),
            ];
            let fused = d
                .embed_layer_norm(
                    &t[0],
                    &ids,
                    &[(&t[1], &pos), (&t[2], &types)],
                    (&on(d, &[width], &g), &on(d, &[width], &b)),
                    1e-12,
                )
                .unwrap();
            let plain = d.embed(&t[0], &ids, &[(&t[1], &pos)]).unwrap();
            (fused, plain)
        };
        let ((gf, gp), (cf, cp)) = (run(&cuda), run(&cpu));
        close(&format!("embed_layer_norm {tokens}×{width}"), &gf, &cf, 1e-5);
        close(&format!("embed {tokens}×{width}"), &gp, &cp, 0.0);
    }
}

#[test]
fn ragged_attention_and_pooling_match_the_cpu_for_every_head_size() {
    let Some(cuda) = gpu("attention") else { return };
    let cpu = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(3);
    for head_dim in [16, 32, 64, 128] {
        for (heads, lengths) in [(1, vec![1]), (12, vec![1, 1, 1]), (4, vec![150, 3, 300, 1, 64]), (2, vec![129])] {
            let layout = SeqLayout::from_lengths(&lengths);
            let tokens = layout.total_tokens();
            let qkv = random(&mut rng, tokens * 3 * heads * head_dim, 2.0);
            let shape = AttentionShape { heads, head_dim };
            let run = |d: &Device| d.attention(&on(d, &[tokens, 3 * heads * head_dim], &qkv), &layout, shape).unwrap();
            close(&format!("attention d={head_dim} heads={heads} {lengths:?}"), &run(&cuda), &run(&cpu), 1e-5);
        }
    }
    for (lengths, width) in [(vec![1], 1), (vec![3, 0, 5], 384), (vec![300, 1], 37)] {
        let layout = SeqLayout::from_lengths(&lengths);
        let x = random(&mut rng, layout.total_tokens() * width, 1.0);
        let mean = |d: &Device| d.mean_pool(&on(d, &[layout.total_tokens(), width], &x), &layout).unwrap();
        close(&format!("mean_pool {lengths:?}×{width}"), &mean(&cuda), &mean(&cpu), 1e-6);
        if !lengths.contains(&0) {
            let first = |d: &Device| d.first_rows(&on(d, &[layout.total_tokens(), width], &x), &layout).unwrap();
            close(&format!("first_rows {lengths:?}×{width}"), &first(&cuda), &first(&cpu), 0.0);
        }
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

fn golden_texts() -> Vec<String> {
    let fixture: serde_json::Value = serde_json::from_str(include_str!("fixtures/minilm_golden.json")).unwrap();
    fixture["cases"].as_array().unwrap().iter().map(|c| c["text"].as_str().unwrap().to_string()).collect()
}

#[test]
fn sentence_embeddings_match_the_cpu_in_f32_and_bf16() {
    let Some(cuda) = gpu("sentence_embeddings") else { return };
    let dir = common::default_embedder_dir();
    let texts = golden_texts();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let want = SentenceEmbedder::load(&Device::Cpu, &dir).unwrap().embed(&Device::Cpu, &refs, 8_192).unwrap();
    for (precision, floor) in [(Precision::F32, 0.9999), (Precision::Bf16, 0.999)] {
        let model = SentenceEmbedder::load_in(&cuda, &dir, precision).unwrap();
        // Batched, and one text at a time (a batch of one, no ragged neighbours).
        let batched = model.embed(&cuda, &refs, 8_192).unwrap();
        let single: Vec<Vec<f32>> = refs.iter().map(|t| model.embed(&cuda, &[t], 8_192).unwrap().remove(0)).collect();
        let mut worst = 1f64;
        for ((text, got), (one, want)) in refs.iter().zip(&batched).zip(single.iter().zip(&want)) {
            for c in [cosine(got, want), cosine(one, want)] {
                assert!(c >= floor, "{precision:?}: cosine {c} for {text:?}");
                worst = worst.min(c);
            }
        }
        println!("embeddings {precision:?}: worst cosine to the CPU over {} texts: {worst:.7}", refs.len());
    }
}

#[test]
fn cross_encoder_scores_match_the_cpu_within_1e_3() {
    let Some(cuda) = gpu("cross_encoder") else { return };
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut folders = vec![fixtures.join("cross-encoder-1"), fixtures.join("cross-encoder-3")];
    // scripts/gpu-check adds a MiniLM-shaped cross-encoder.
    folders.extend(std::env::var_os("AITL_TEST_CROSS_ENCODER").map(Into::into));
    let texts = golden_texts();
    let passages: Vec<&str> = texts.iter().map(String::as_str).collect();
    for folder in folders {
        let (cpu_model, cuda_model) = (
            CrossEncoder::load(&Device::Cpu, &folder, &Default::default()).unwrap(),
            CrossEncoder::load(&cuda, &folder, &Default::default()).unwrap(),
        );
        let pairs = cpu_model.tokenize_pairs("How long does a refund take to reach my card?", &passages).unwrap();
        let refs: Vec<_> = pairs.iter().collect();
        let (want, got) =
            (cpu_model.score_tokens(&Device::Cpu, &refs).unwrap(), cuda_model.score_tokens(&cuda, &refs).unwrap());
        let mut worst = 0f32;
        for (w, g) in want.iter().flatten().zip(got.iter().flatten()) {
            worst = worst.max((w - g).abs());
        }
        assert!(worst <= 1e-3, "{}: scores differ by {worst}", folder.display());
        println!("cross-encoder {}: worst score difference {worst:.2e}", folder.display());
    }
}

/// Ids in order, with each run of exactly tied scores sorted, so two
/// searches that break a tie differently still compare equal.
fn canonical(hits: &[Hit]) -> Vec<String> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < hits.len() {
        let tied = hits[at..].iter().take_while(|h| h.score == hits[at].score).count();
        let mut ids: Vec<String> = hits[at..at + tied].iter().map(|h| h.id.clone()).collect();
        ids.sort();
        out.extend(ids);
        at += tied;
    }
    out
}

#[test]
fn device_index_gives_the_exact_indexs_top_75_on_dstc11() {
    let Some(cuda) = gpu("device_index") else { return };
    let Device::Cuda(gpu) = cuda.clone() else { unreachable!("cuda_device gives a GPU") };
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/dstc11-track5");
    assert!(data.exists(), "the DSTC11 data is at {}", data.display());
    let objects = aitl::kb::read_dstc11(&data).unwrap();
    let queries = aitl::eval::dstc11::read_queries(&data, aitl::eval::dstc11::Split::Eval).unwrap();
    let model = SentenceEmbedder::load(&cuda, &common::default_embedder_dir()).unwrap();
    let texts: Vec<&str> = objects.iter().map(|o| o.text.as_str()).collect();
    let vectors = model.embed(&cuda, &texts, 8_192).unwrap();
    let compose = aitl::kb::QueryComposition { context_turns: 3 };
    let query_texts: Vec<String> = queries.iter().map(|q| compose.compose(&q.query, &q.context)).collect();
    let query_refs: Vec<&str> = query_texts.iter().map(String::as_str).collect();
    let query_vectors = model.embed(&cuda, &query_refs, 8_192).unwrap();

    let dim = vectors[0].len();
    let host = ExactIndex::new(dim, "v");
    for (object, vector) in objects.iter().zip(&vectors) {
        host.upsert(IndexEntry::of(object), vector);
    }
    // Removals and a kind filter, so dead slots and masks are exercised.
    for object in objects.iter().step_by(97) {
        host.remove(&object.id);
    }
    let kinds = KnowledgeFilter { kinds: vec![objects[0].kind], ..Default::default() };
    let filters = [KnowledgeFilter::default(), kinds];
    for precision in [VectorPrecision::F32, VectorPrecision::F16, VectorPrecision::Bf16] {
        let device = DeviceIndex::new(gpu.clone(), dim, "v", precision).unwrap();
        for (object, vector) in objects.iter().zip(&vectors) {
            device.upsert(IndexEntry::of(object), vector);
        }
        for object in objects.iter().step_by(97) {
            device.remove(&object.id);
        }
        for filter in &filters {
            let batch: Vec<Query> =
                query_vectors.iter().map(|v| Query { vector: v.clone(), k: 75, filter: filter.clone() }).collect();
            let (want, got) = (host.search_many(&batch), device.search_many(&batch));
            let (mut shared, mut total) = (0usize, 0usize);
            for (i, (w, g)) in want.iter().zip(&got).enumerate() {
                assert_eq!(w.len(), g.len(), "query {i}: as many hits");
                if precision == VectorPrecision::F32 {
                    assert_eq!(canonical(g), canonical(w), "query {i}, filter {filter:?}");
                    for (a, b) in w.iter().zip(g) {
                        assert!((a.score - b.score).abs() <= 1e-5, "query {i}: score {} against {}", b.score, a.score);
                    }
                }
                let ids: std::collections::HashSet<&str> = w.iter().map(|h| h.id.as_str()).collect();
                shared += g.iter().filter(|h| ids.contains(h.id.as_str())).count();
                total += w.len();
            }
            let overlap = shared as f64 / total.max(1) as f64;
            println!(
                "device index {precision:?}, kinds {:?}: top-75 overlap with the exact index {overlap:.4}",
                filter.kinds
            );
            assert!(overlap >= 0.95, "{precision:?}: overlap {overlap}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrieve_runs_on_the_gpu_and_says_so() {
    if gpu("retrieve_on_gpu").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config_with_embedder(dir.path());
    config.device = aitl::backend::DeviceChoice::Cuda(0);
    let server = aitl::server::start(config).await.unwrap();
    let (mut support, mut kb) = common::clients(&server).await;
    let objects = vec![
        common::knowledge("refund", "Refunds reach the card in five days."),
        common::knowledge("parking", "Parking is free for guests."),
    ];
    kb.upsert_knowledge(tokio_stream::iter(vec![aitl::proto::UpsertKnowledgeRequest { objects }])).await.unwrap();
    let answer = support
        .retrieve(aitl::proto::RetrieveRequest {
            query: "when is my refund back?".into(),
            top_k: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.results[0].knowledge.as_ref().unwrap().id, "refund");
    let device = answer.timings.unwrap().device;
    assert!(device.starts_with("cuda:0"), "{device}");
}
