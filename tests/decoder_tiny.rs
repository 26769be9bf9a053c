//! Tiny random decoders made with transformers (tests/fixtures/
//! make_tiny_decoders.py) against transformers' own logits: a Mixtral (8
//! experts, 2 per token) read from its safetensors folder, from GGUF in f32
//! and from GGUF in Q8_0 (against llama.cpp on that file), and a dense bf16
//! Llama with a chat tokenizer. The
//! prompts of one and three tokens leave most experts without a token.

mod common;

use std::path::{Path, PathBuf};

use aitl::{
    backend::{Device, Precision},
    engine::generator::GeneratorOptions,
    model::{
        chat::{ChatTokenizer, Role},
        gguf::GgufFile,
        llama::{Llama, Step},
    },
};

/// Absolute, in logits of magnitude ≤ 6, for files that hold float weights:
/// aitl and PyTorch compute in f32 from the same values and differ only in
/// summation order.
const FLOAT_TOLERANCE: f32 = 1e-4;

/// For the Q8_0 file, against llama.cpp on the same file (f32 KV cache, no
/// flash attention): both quantize activations to 8 bits per block for the
/// integer dot products, and agree to the bit today. (Against transformers
/// on the file's dequantized weights, which keeps activations in f32, both
/// differ by up to 0.9 on these random high-gain weights.)
const Q8_0_TOLERANCE: f32 = 1e-4;

/// The bf16 prefill on the Q8_0 file, against llama.cpp and against
/// transformers on the file's dequantized weights (f32 activations). These
/// random weights amplify any rounding: llama.cpp's own 8-bit activations
/// put it 0.92 from transformers. Observed for the bf16 prefill (on the
/// 64-token prompt, the one long enough to take it): 0.94 from llama.cpp,
/// 0.91 from transformers. The kernels' own tests are the tight ones.
const BF16_PREFILL_TOLERANCE: f32 = 1.0;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn golden() -> serde_json::Value {
    serde_json::from_str(include_str!("fixtures/tiny_decoders_golden.json")).expect("fixture parses")
}

fn ids(value: &serde_json::Value) -> Vec<u32> {
    value.as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect()
}

fn argmax(logits: &[f32]) -> u32 {
    logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i as u32).unwrap()
}

/// Every case's last-position logits, from one prefill, from a prefill of
/// all but the last token plus one cached step, and from a prefill in
/// chunks of three tokens (as the decoding engine prefills long prompts).
fn check(model: &Llama, cases: &serde_json::Value, tolerance: f32, what: &str, reference: &str) {
    let device = Device::Cpu;
    let mut worst = 0f32;
    for case in cases.as_array().unwrap() {
        let tokens = ids(&case["tokens"]);
        let want: Vec<f32> = case["logits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        let mut cache = model.new_cache();
        let whole = model.forward(&device, &mut [Step { tokens: &tokens, cache: &mut cache }]).unwrap().remove(0);
        let mut stepped = whole.clone();
        if tokens.len() > 1 {
            let (head, last) = tokens.split_at(tokens.len() - 1);
            let mut cache = model.new_cache();
            model.forward(&device, &mut [Step { tokens: head, cache: &mut cache }]).unwrap();
            stepped = model.forward(&device, &mut [Step { tokens: last, cache: &mut cache }]).unwrap().remove(0);
        }
        let mut chunked = whole.clone();
        if tokens.len() > 3 {
            let mut cache = model.new_cache();
            for chunk in tokens.chunks(3) {
                chunked = model.forward(&device, &mut [Step { tokens: chunk, cache: &mut cache }]).unwrap().remove(0);
            }
        }
        assert_eq!(whole.len(), want.len());
        for (label, got) in [("prefill", &whole), ("cached step", &stepped), ("prefill in chunks of 3", &chunked)] {
            for (id, (a, b)) in got.iter().zip(&want).enumerate() {
                let diff = (a - b).abs();
                worst = worst.max(diff);
                assert!(
                    diff <= tolerance,
                    "{what}, {} tokens, {label}: logit {id} is {a}, {reference} {b}",
                    tokens.len()
                );
            }
        }
    }
    println!("{what}: worst logit difference to {reference} {worst:.2e}");
}

#[test]
fn fixture_covers_experts_that_receive_no_tokens() {
    let golden = golden();
    let counts: Vec<Vec<u64>> = golden["tiny-mixtral"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|case| case["expert_tokens"].as_array().unwrap().iter())
        .map(|layer| layer.as_array().unwrap().iter().map(|c| c.as_u64().unwrap()).collect())
        .collect();
    assert!(counts.iter().any(|layer| layer.contains(&0)), "some layer routes no token to an expert");
    assert!(counts.iter().any(|layer| !layer.contains(&0)), "and some layer uses every expert");
}

/// Qwen2-MoE: softmax routing without renormalisation, the always-on shared
/// expert behind its sigmoid gate, and Q/K/V biases.
#[test]
fn qwen_moe_safetensors_matches_transformers() {
    let golden: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/tiny_qwen_moe_golden.json")).expect("fixture parses");
    let model = Llama::from_hf_folder(&Device::Cpu, &fixtures().join("tiny-qwen-moe")).unwrap();
    let moe = model.config().moe.unwrap();
    assert_eq!((moe.experts, moe.used, moe.normalize, moe.shared_ffn), (6, 2, false, Some(48)));
    assert!(model.config().qkv_bias);
    check(&model, &golden["tiny-qwen-moe"], FLOAT_TOLERANCE, "tiny Qwen2-MoE, safetensors f32", "transformers");
}

#[test]
fn mixtral_safetensors_matches_transformers() {
    let model = Llama::from_hf_folder(&Device::Cpu, &fixtures().join("tiny-mixtral")).unwrap();
    assert!(model.config().moe.is_some());
    check(&model, &golden()["tiny-mixtral"], FLOAT_TOLERANCE, "tiny Mixtral, safetensors f32", "transformers");
}

#[test]
fn mixtral_gguf_f32_matches_transformers() {
    let file = GgufFile::open(&fixtures().join("tiny-mixtral-f32.gguf")).unwrap();
    let model = Llama::from_gguf(&Device::Cpu, &file).unwrap();
    check(&model, &golden()["tiny-mixtral"], FLOAT_TOLERANCE, "tiny Mixtral, GGUF f32", "transformers");
}

#[test]
fn mixtral_gguf_q8_0_matches_llama_cpp() {
    let file = GgufFile::open(&fixtures().join("tiny-mixtral-q8_0.gguf")).unwrap();
    let model = Llama::from_gguf_in(&Device::Cpu, &file, Precision::F32).unwrap();
    check(
        &model,
        &golden()["tiny-mixtral-q8_0.gguf/llama.cpp"],
        Q8_0_TOLERANCE,
        "tiny Mixtral, GGUF Q8_0",
        "llama.cpp",
    );
}

/// The default prefill (bf16 tiles on AMX for prompts of 32 tokens or more;
/// the 64-token case takes it) against llama.cpp's 8-bit block arithmetic.
#[test]
fn mixtral_gguf_q8_0_bf16_prefill_stays_near_llama_cpp() {
    let file = GgufFile::open(&fixtures().join("tiny-mixtral-q8_0.gguf")).unwrap();
    let model = Llama::from_gguf_in(&Device::Cpu, &file, Precision::Bf16).unwrap();
    check(
        &model,
        &golden()["tiny-mixtral-q8_0.gguf/llama.cpp"],
        BF16_PREFILL_TOLERANCE,
        "tiny Mixtral, GGUF Q8_0, bf16 prefill",
        "llama.cpp",
    );
    check(
        &model,
        &golden()["tiny-mixtral-q8_0.gguf"],
        BF16_PREFILL_TOLERANCE,
        "tiny Mixtral, GGUF Q8_0, bf16 prefill",
        "transformers on the file's dequantized weights",
    );
}

#[test]
fn dense_llama_bf16_safetensors_matches_transformers() {
    let model = Llama::from_hf_folder(&Device::Cpu, &fixtures().join("tiny-llama")).unwrap();
    assert!(model.config().moe.is_none() && model.config().tied_embeddings);
    check(&model, &golden()["tiny-llama"], FLOAT_TOLERANCE, "tiny Llama, safetensors bf16", "transformers");
}

/// The folder as a chat model: its tokenizer.json and ChatML template give
/// transformers' prompt tokens, and greedy decoding its tokens.
#[test]
fn dense_llama_folder_chats_like_transformers() {
    let dir = fixtures().join("tiny-llama");
    let case = &golden()["tiny-llama-chat"];
    let tokenizer = ChatTokenizer::from_hf_folder(&dir).unwrap();
    let messages: Vec<(Role, &str)> = case["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let role = match m["role"].as_str().unwrap() {
                "system" => Role::System,
                "user" => Role::User,
                _ => Role::Assistant,
            };
            (role, m["content"].as_str().unwrap())
        })
        .collect();
    let prompt = tokenizer.render(&messages);
    assert_eq!(prompt, case["text"].as_str().unwrap());
    let tokens = tokenizer.encode(&prompt).unwrap();
    assert_eq!(tokens, ids(&case["prompt"]));

    let device = Device::Cpu;
    let model = Llama::from_hf_folder(&device, &dir).unwrap();
    let mut cache = model.new_cache();
    let mut logits = model.forward(&device, &mut [Step { tokens: &tokens, cache: &mut cache }]).unwrap().remove(0);
    let mut greedy = Vec::new();
    for _ in 0..ids(&case["greedy"]).len() {
        let next = argmax(&logits);
        greedy.push(next);
        logits = model.forward(&device, &mut [Step { tokens: &[next], cache: &mut cache }]).unwrap().remove(0);
    }
    assert_eq!(greedy, ids(&case["greedy"]));
}

#[test]
fn unsupported_checkpoints_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let source = fixtures().join("tiny-llama");
    std::fs::copy(source.join("model.safetensors"), dir.path().join("model.safetensors")).unwrap();
    let config = std::fs::read_to_string(source.join("config.json")).unwrap();

    let scaled = config.replace("\"rope_type\": \"default\"", "\"rope_type\": \"llama3\"");
    std::fs::write(dir.path().join("config.json"), scaled).unwrap();
    let err = Llama::from_hf_folder(&Device::Cpu, dir.path()).err().unwrap().to_string();
    assert!(err.contains("rotary scaling"), "{err}");

    let other = config.replace("\"model_type\": \"llama\"", "\"model_type\": \"gpt2\"");
    std::fs::write(dir.path().join("config.json"), other).unwrap();
    let err = Llama::from_hf_folder(&Device::Cpu, dir.path()).err().unwrap().to_string();
    assert!(err.contains("model_type \"gpt2\""), "{err}");

    let narrow = config.replace("\"hidden_size\": 64", "\"hidden_size\": 48");
    std::fs::write(dir.path().join("config.json"), narrow).unwrap();
    let err = Llama::from_hf_folder(&Device::Cpu, dir.path()).err().unwrap().to_string();
    assert!(err.contains("dims"), "{err}");
}

/// The decoding engine serves the folder as it serves GGUF files: two
/// greedy candidates from one shared prefill, both transformers' text,
/// whether the prompt is prefilled whole or in chunks of three tokens.
#[test]
fn decoding_engine_serves_a_hugging_face_folder() {
    let case = &golden()["tiny-llama-chat"];
    assert!(ids(&case["prompt"]).len() > 6, "the prompt spans several chunks");
    for prefill_chunk in [GeneratorOptions::default().prefill_chunk, 3] {
        common::chat::serve_the_chat_case(
            Device::Cpu,
            GeneratorOptions { queue_capacity: 4, max_sequences: 4, prefill_chunk, ..Default::default() },
        );
    }
}
