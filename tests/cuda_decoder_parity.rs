//! The decoder on a GPU against the CPU backend and the reference models
//! (CUDA part 2): every decoder op on fresh random inputs with outputs
//! poisoned (`AITL_CUDA_POISON`), the paged KV cache through forks and
//! truncation, mixture-of-experts routing and products, the tiny Llama,
//! Mixtral and Qwen2-MoE fixtures against transformers' logits, SmolLM2's
//! greedy path against the CPU's, and the decoding engine serving two
//! candidates on the GPU.
//!
//! Tolerances (against the CPU backend unless said):
//! - products in f32 (decoding, and prompts in `Precision::F32`): both
//!   quantize activations to the same 8-bit blocks (float weights: f32);
//!   1e-5 of Σ|wᵢ·xᵢ| (summation order);
//! - prompts with a bf16 prefill: bf16 weights and activations on tensor
//!   cores against the CPU's 8-bit block arithmetic: 2e-2 of the output's rms;
//! - embeddings, KV writes: bit for bit; rope, SwiGLU, norms, attention
//!   over f16-rounded keys and values, routing weights: 1e-5 · max(1, |x|);
//! - whole tiny models against transformers (f32 KV there, f16 here):
//!   2e-2 absolute on logits of magnitude ≤ 6;
//! - SmolLM2: the same argmax at every step where the CPU's two best
//!   logits are more than 1.0 apart (teacher-forced along llama.cpp's path).
//!
//! Needs a GPU; without one each test says it skipped. `scripts/gpu-check`
//! sets `AITL_REQUIRE_GPU`, which turns a skip into a failure.

mod common;

use std::path::{Path, PathBuf};

use aitl::{
    backend::{
        AttentionShape, CachedRows, Device, KvLayer, Precision, RopeStyle, StackedExperts,
        cuda::paged_kv::KvPool,
        half::{f16_to_f32, f32_to_f16},
        quant::{GgmlType, dequantize_activations, dequantize_row, quantize_activations},
    },
    engine::generator::GeneratorOptions,
    model::{
        gguf::GgufFile,
        llama::{Llama, Step},
    },
};
use common::parity::{close, gpu, on, random, random_weights};
use rand::{SeedableRng, rngs::StdRng};

const TYPES: [GgmlType; 9] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::Bf16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q8_0,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
];

#[test]
fn quantized_products_and_embeddings_match_the_cpu_for_every_type() {
    let Some(cuda) = gpu("quantized_products") else { return };
    let cpu = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(61);
    let (k, n) = (512, 301);
    for dtype in TYPES {
        let bytes = random_weights(&mut rng, dtype, k, n);
        let (w_cpu, w_gpu) = (
            cpu.quant_matrix(dtype, k, n, bytes.clone()).unwrap(),
            cuda.quant_matrix(dtype, k, n, bytes.clone()).unwrap(),
        );
        let w_bf16 = w_gpu.clone().with_prefill(Precision::Bf16);
        // Decoding batches (one group of eight, more), and prompts: in f32
        // (the block arithmetic, or f32 cuBLAS for float weights), and with a
        // bf16 prefill (tensor cores, for block-quantized weights).
        for m in [1usize, 3, 8, 9, 33, 80] {
            let x = random(&mut rng, m * k, 2.0);
            let want = cpu.linear_quantized(&on(&cpu, &[m, k], &x), &w_cpu).unwrap().to_host().unwrap();
            let got = cuda.linear_quantized(&on(&cuda, &[m, k], &x), &w_gpu).unwrap().to_host().unwrap();
            let what = format!("linear_quantized {dtype:?} {m}×{k}·{n}");
            let row_bytes = dtype.row_bytes(k);
            let mut worst = 0f32;
            for r in 0..m {
                let a = dequantize_activations(&quantize_activations(dtype, &x[r * k..(r + 1) * k]));
                for j in 0..n {
                    let mut w = vec![0f32; k];
                    dequantize_row(dtype, &bytes[j * row_bytes..(j + 1) * row_bytes], &mut w);
                    let scale: f32 = w.iter().zip(&a).map(|(w, x)| (w * x).abs()).sum::<f32>().max(1e-6);
                    let (g, e) = (got[r * n + j], want[r * n + j]);
                    let error = (g - e).abs() / scale;
                    assert!(error <= 1e-5, "{what}: row {r} column {j}: {g} against {e}");
                    worst = worst.max(error);
                }
            }
            println!("{what}: worst error {worst:.2e} of Σ|w·x|");
            if m > 32 && dtype.is_quantized() {
                let tiles = cuda.linear_quantized(&on(&cuda, &[m, k], &x), &w_bf16).unwrap().to_host().unwrap();
                let rms = (want.iter().map(|v| v * v).sum::<f32>() / want.len() as f32).sqrt();
                let worst = tiles.iter().zip(&want).map(|(g, e)| (g - e).abs()).fold(0f32, f32::max);
                assert!(tiles.iter().all(|g| !g.is_nan()), "{what}, bf16 prefill: unwritten elements");
                assert!(worst <= 2e-2 * rms, "{what}, bf16 prefill: worst {worst} against rms {rms}");
                println!("{what}, bf16 prefill: worst {:.2e} of the output's rms", worst / rms);
            }
        }
        let ids = [300u32, 0, 7, 7, 150];
        let embed = |d: &Device, w| d.embed_quantized(w, &ids).unwrap();
        close(&format!("embed_quantized {dtype:?}"), &embed(&cuda, &w_gpu), &embed(&cpu, &w_cpu), 0.0);
    }
}

#[test]
fn rope_swiglu_gates_and_the_fused_norm_match_the_cpu() {
    let Some(cuda) = gpu("decoder_ops") else { return };
    let cpu = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(62);
    let positions = [0u32, 1, 9, 511, 4095, 30_000];
    for (heads, head_dim) in [(9, 64), (2, 128), (4, 16)] {
        let x = random(&mut rng, positions.len() * heads * head_dim, 2.0);
        for style in [RopeStyle::Normal, RopeStyle::Neox] {
            let run = |d: &Device| {
                let mut t = on(d, &[positions.len(), heads * head_dim], &x);
                d.rope(&mut t, &positions, head_dim, 10_000.0, style).unwrap();
                t
            };
            close(&format!("rope {style:?} {heads}×{head_dim}"), &run(&cuda), &run(&cpu), 1e-5);
        }
    }
    for (rows, width) in [(1, 576), (7, 1536), (3, 4099)] {
        let (g, u) = (random(&mut rng, rows * width, 8.0), random(&mut rng, rows * width, 2.0));
        let silu = |d: &Device| {
            let mut t = on(d, &[rows, width], &g);
            d.silu_mul(&mut t, &on(d, &[rows, width], &u)).unwrap();
            t
        };
        close(&format!("silu_mul {rows}×{width}"), &silu(&cuda), &silu(&cpu), 1e-5);
        let gate = random(&mut rng, rows, 6.0);
        let gated = |d: &Device| {
            let mut t = on(d, &[rows, width], &u);
            d.add_gated(&mut t, &on(d, &[rows, width], &g), &on(d, &[rows, 1], &gate)).unwrap();
            t
        };
        close(&format!("add_gated {rows}×{width}"), &gated(&cuda), &gated(&cpu), 1e-5);
        let gamma = random(&mut rng, width, 1.5);
        let fused = |d: &Device| {
            let mut h = on(d, &[rows, width], &g);
            let normed = d.add_rms_norm(&mut h, &on(d, &[rows, width], &u), &on(d, &[width], &gamma), 1e-5).unwrap();
            (h, normed)
        };
        let ((h_gpu, n_gpu), (h_cpu, n_cpu)) = (fused(&cuda), fused(&cpu));
        close(&format!("add_rms_norm residual {rows}×{width}"), &h_gpu, &h_cpu, 0.0);
        close(&format!("add_rms_norm {rows}×{width}"), &n_gpu, &n_cpu, 1e-5);
    }
}

/// Keys and values rounded to f16 first, so the CPU's f32 cache holds what
/// the GPU's f16 pages do.
fn f16_rounded(rng: &mut StdRng, n: usize) -> Vec<f32> {
    random(rng, n, 2.0).into_iter().map(|v| f16_to_f32(f32_to_f16(v))).collect()
}

#[test]
fn paged_attention_through_forks_and_truncation_matches_cached_attention() {
    let Some(cuda) = gpu("paged_attention") else { return };
    let Device::Cuda(gpu_device) = &cuda else { unreachable!("a GPU device") };
    let cpu = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(63);
    for (heads, kv_heads, head_dim) in [(9, 3, 64), (32, 8, 128), (4, 2, 16), (8, 8, 32)] {
        let width = kv_heads * head_dim;
        let pool = KvPool::new(gpu_device, 4096, width).unwrap();
        let mut layers = (KvLayer::new(width), KvLayer::paged(&pool));
        let append = |layers: &mut (KvLayer, KvLayer), rows: usize, rng: &mut StdRng| {
            let (k, v) = (f16_rounded(rng, rows * width), f16_rounded(rng, rows * width));
            layers.0.append(&on(&cpu, &[rows, width], &k), &on(&cpu, &[rows, width], &v)).unwrap();
            layers.1.append(&on(&cuda, &[rows, width], &k), &on(&cuda, &[rows, width], &v)).unwrap();
        };
        // A 40-position prompt; a fork cut back to 35 (inside a shared page)
        // that writes three of its own; another fork one position on; a
        // fresh 20-row prompt; a context long enough to split (700).
        append(&mut layers, 40, &mut rng);
        let mut cut = layers.clone();
        cut.0.truncate(35);
        cut.1.truncate(35);
        append(&mut cut, 3, &mut rng);
        let mut next = layers.clone();
        append(&mut next, 1, &mut rng);
        let mut fresh = (KvLayer::new(width), KvLayer::paged(&pool));
        append(&mut fresh, 20, &mut rng);
        let mut long = (KvLayer::new(width), KvLayer::paged(&pool));
        append(&mut long, 700, &mut rng);
        // (cache, past, rows): one decode row each, the fresh prompt's 20 rows at once.
        let plan = [(&layers, 39, 1), (&cut, 37, 1), (&next, 40, 1), (&fresh, 0, 20), (&long, 699, 1)];
        let rows: usize = plan.iter().map(|p| p.2).sum();
        let q = random(&mut rng, rows * heads * head_dim, 1.0);
        let shape = AttentionShape { heads, head_dim };
        let attend = |d: &Device, gpu_side: bool| {
            let sequences: Vec<CachedRows> = plan
                .iter()
                .map(|(c, past, rows)| CachedRows {
                    cache: if gpu_side { &c.1 } else { &c.0 },
                    past: *past,
                    rows: *rows,
                })
                .collect();
            d.cached_attention(&on(d, &[rows, heads * head_dim], &q), &sequences, shape, kv_heads, false).unwrap()
        };
        close(
            &format!("paged attention {heads}/{kv_heads}×{head_dim}"),
            &attend(&cuda, true),
            &attend(&cpu, false),
            1e-5,
        );
    }
}

#[test]
fn routing_and_expert_products_match_the_cpu() {
    let Some(cuda) = gpu("experts") else { return };
    let cpu = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(64);
    // Mixtral's 8 top-2 renormalised; Qwen-MoE's 60 top-4 kept.
    for (count, used, normalize, dtype) in [(8, 2, true, GgmlType::Q4K), (60, 4, false, GgmlType::Q8_0)] {
        let (hidden, ffn) = (256, 512);
        let gate = random_weights(&mut rng, dtype, hidden, count * ffn);
        let up = random_weights(&mut rng, dtype, hidden, count * ffn);
        let down = random_weights(&mut rng, dtype, ffn, count * hidden);
        let experts = |d: &Device| {
            StackedExperts::new(
                count,
                d.quant_matrix(dtype, hidden, count * ffn, gate.clone()).unwrap(),
                d.quant_matrix(dtype, hidden, count * ffn, up.clone()).unwrap(),
                d.quant_matrix(dtype, ffn, count * hidden, down.clone()).unwrap(),
            )
            .unwrap()
        };
        let (e_cpu, e_gpu) = (experts(&cpu), experts(&cuda));
        for tokens in [1usize, 5, 40] {
            let logits = random(&mut rng, tokens * count, 3.0);
            let x = random(&mut rng, tokens * hidden, 1.0);
            let r_cpu = cpu.route_top_k(&on(&cpu, &[tokens, count], &logits), used, normalize).unwrap();
            let r_gpu = cuda.route_top_k(&on(&cuda, &[tokens, count], &logits), used, normalize).unwrap();
            assert_eq!(r_gpu.experts().unwrap(), r_cpu.experts().unwrap(), "{count} experts, {tokens} tokens: choices");
            let (wg, wc) = (r_gpu.weights().unwrap(), r_cpu.weights().unwrap());
            close(
                &format!("routing weights {count}/{used}"),
                &on(&cpu, &[wg.len()], &wg),
                &on(&cpu, &[wc.len()], &wc),
                1e-5,
            );
            let want = cpu.experts_swiglu(&on(&cpu, &[tokens, hidden], &x), &r_cpu, &e_cpu).unwrap().to_host().unwrap();
            let got =
                cuda.experts_swiglu(&on(&cuda, &[tokens, hidden], &x), &r_gpu, &e_gpu).unwrap().to_host().unwrap();
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
            assert!(
                worst <= 1e-4 * scale,
                "experts {count}/{used} {dtype:?}, {tokens} tokens: worst {worst} of {scale}"
            );
            println!(
                "experts {count}/{used} {dtype:?}, {tokens} tokens: worst {:.2e} of the output's scale",
                worst / scale
            );
        }
    }
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn ids(value: &serde_json::Value) -> Vec<u32> {
    value.as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect()
}

fn argmax(logits: &[f32]) -> u32 {
    logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i as u32).unwrap()
}

/// A whole prompt at once, and all but its last token then one cached step.
fn check_tiny(cuda: &Device, model: &Llama, cases: &serde_json::Value, what: &str) {
    let mut worst = 0f32;
    for case in cases.as_array().unwrap() {
        let tokens = ids(&case["tokens"]);
        let want: Vec<f32> = case["logits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        let mut cache = model.new_cache();
        let whole = model.forward(cuda, &mut [Step { tokens: &tokens, cache: &mut cache }]).unwrap().remove(0);
        let mut stepped = whole.clone();
        if tokens.len() > 1 {
            let (head, last) = tokens.split_at(tokens.len() - 1);
            let mut cache = model.new_cache();
            model.forward(cuda, &mut [Step { tokens: head, cache: &mut cache }]).unwrap();
            stepped = model.forward(cuda, &mut [Step { tokens: last, cache: &mut cache }]).unwrap().remove(0);
        }
        for (label, got) in [("prefill", &whole), ("cached step", &stepped)] {
            for (id, (a, b)) in got.iter().zip(&want).enumerate() {
                worst = worst.max((a - b).abs());
                assert!(
                    (a - b).abs() <= 2e-2,
                    "{what}, {} tokens, {label}: logit {id} is {a}, transformers {b}",
                    tokens.len()
                );
            }
        }
    }
    println!("{what} on the GPU: worst logit difference to transformers {worst:.2e}");
}

#[test]
fn tiny_dense_and_moe_decoders_on_the_gpu_match_transformers() {
    let Some(cuda) = gpu("tiny_decoders") else { return };
    let golden: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/tiny_decoders_golden.json")).expect("fixture parses");
    let qwen: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/tiny_qwen_moe_golden.json")).expect("fixture parses");
    let llama = Llama::from_hf_folder(&cuda, &fixtures().join("tiny-llama")).unwrap();
    check_tiny(&cuda, &llama, &golden["tiny-llama"], "tiny Llama, safetensors bf16");
    let mixtral = Llama::from_hf_folder(&cuda, &fixtures().join("tiny-mixtral")).unwrap();
    check_tiny(&cuda, &mixtral, &golden["tiny-mixtral"], "tiny Mixtral, safetensors f32");
    let file = GgufFile::open(&fixtures().join("tiny-mixtral-f32.gguf")).unwrap();
    check_tiny(&cuda, &Llama::from_gguf(&cuda, &file).unwrap(), &golden["tiny-mixtral"], "tiny Mixtral, GGUF f32");
    let moe = Llama::from_hf_folder(&cuda, &fixtures().join("tiny-qwen-moe")).unwrap();
    check_tiny(&cuda, &moe, &qwen["tiny-qwen-moe"], "tiny Qwen2-MoE, safetensors f32");
}

/// SmolLM2-135M, teacher-forced on both devices along the golden
/// prompts: the provisioned Q4_1 GGUF, or `AITL_TEST_GENERATOR` (a GGUF
/// file or a Hugging Face folder; `scripts/gpu-check` writes one with
/// SmolLM2's shapes and random weights, as the GPU machine has no network).
#[test]
fn smollm2_on_the_gpu_follows_the_cpus_decisive_steps() {
    let Some(cuda) = gpu("smollm2") else { return };
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/smollm2_golden.json")).expect("fixture parses");
    let path = std::env::var_os("AITL_TEST_GENERATOR").map_or_else(common::default_generator_gguf, PathBuf::from);
    let load = |device: &Device| match path.is_dir() {
        true => Llama::from_hf_folder(device, &path).unwrap(),
        false => Llama::from_gguf(device, &GgufFile::open(&path).unwrap()).unwrap(),
    };
    let (cpu_model, gpu_model) = (load(&Device::Cpu), load(&cuda));
    let (mut decisive, mut agree, mut steps, mut worst) = (0, 0, 0, 0f32);
    for case in fixture["cases"].as_array().unwrap() {
        // Token ids from the fixture (llama.cpp's prompt, then its greedy
        // path, teacher-forced): the same sequence on both devices.
        let (prompt, path) = (ids(&case["tokens"]), ids(&case["greedy"]));
        let (mut cpu_cache, mut gpu_cache) = (cpu_model.new_cache(), gpu_model.new_cache());
        let mut cpu_logits =
            cpu_model.forward(&Device::Cpu, &mut [Step { tokens: &prompt, cache: &mut cpu_cache }]).unwrap().remove(0);
        let mut gpu_logits =
            gpu_model.forward(&cuda, &mut [Step { tokens: &prompt, cache: &mut gpu_cache }]).unwrap().remove(0);
        for (step, &next) in path.iter().enumerate() {
            let mut sorted = cpu_logits.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let (cpu_pick, gpu_pick) = (argmax(&cpu_logits), argmax(&gpu_logits));
            steps += 1;
            agree += usize::from(cpu_pick == gpu_pick);
            worst = gpu_logits.iter().zip(&cpu_logits).map(|(g, c)| (g - c).abs()).fold(worst, f32::max);
            if sorted[0] - sorted[1] > 1.0 {
                decisive += 1;
                assert_eq!(gpu_pick, cpu_pick, "step {step} of {:?}: the GPU and the CPU disagree", case["messages"]);
            }
            cpu_logits = cpu_model
                .forward(&Device::Cpu, &mut [Step { tokens: &[next], cache: &mut cpu_cache }])
                .unwrap()
                .remove(0);
            gpu_logits =
                gpu_model.forward(&cuda, &mut [Step { tokens: &[next], cache: &mut gpu_cache }]).unwrap().remove(0);
        }
    }
    println!(
        "SmolLM2 ({}) on the GPU: {agree} of {steps} steps pick the CPU's token, all {decisive} decisive ones; \
         worst logit difference {worst:.3}",
        path.display()
    );
}

#[test]
fn the_decoding_engine_serves_two_candidates_on_the_gpu() {
    let Some(cuda) = gpu("engine") else { return };
    common::chat::serve_the_chat_case(cuda, GeneratorOptions::default());
}
