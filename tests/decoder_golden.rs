//! SmolLM2-135M-Instruct (Q4_1 GGUF) on aitl's decoder against llama.cpp on
//! the same file (tests/fixtures/smollm2_golden.json, made by
//! tests/fixtures/make_smollm2_golden.py with llama-cpp-python, default
//! settings): the same prompt tokens; last-position logits within
//! LOGIT_TOLERANCE on llama.cpp's 64 largest; along llama.cpp's 32 greedy
//! tokens, the same choice at every step llama.cpp itself is decisive about;
//! and free-running greedy text equal to llama.cpp's up to its first near-tie.
//!
//! Why not all 32 tokens unconditionally: this model's greedy path is full of
//! near-ties (40% of steps have the two best logits within 1.0), and
//! llama.cpp's own attention modes (flash or not, f16 or f32 KV cache) move
//! its logits by up to 0.45 and change its greedy text on half of these
//! prompts. Free-running agreement to 32 tokens is printed.

mod common;

use aitl::{
    backend::Device,
    model::{
        chat::{ChatTokenizer, Role},
        gguf::GgufFile,
        llama::{Llama, Step},
    },
};

/// Absolute, in logits (the largest are about 25–35): both sides quantize
/// activations to 8 bits per block the same way, but this model amplifies
/// any change in float order: llama.cpp's flash and plain attention differ by
/// up to 0.45, and a 2e-7-accurate polynomial exp in aitl's softmax instead of
/// libm's moved aitl's logits by 0.4. Observed worst against llama.cpp: 0.49.
const LOGIT_TOLERANCE: f32 = 1.0;

/// A greedy step is decisive when llama.cpp's two best logits are further
/// apart than two logits can move between implementations (2 × 0.5).
const TIE: f64 = 1.0;

fn role(name: &str) -> Role {
    match name {
        "system" => Role::System,
        "user" => Role::User,
        "assistant" => Role::Assistant,
        other => panic!("role {other}"),
    }
}

fn argmax(logits: &[f32]) -> u32 {
    logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i as u32).unwrap()
}

#[test]
fn smollm2_matches_llama_cpp() {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/smollm2_golden.json")).expect("fixture parses");
    let file = GgufFile::open(&common::default_generator_gguf()).unwrap();
    let device = Device::Cpu;
    let model = Llama::from_gguf(&device, &file).unwrap();
    let tokenizer = ChatTokenizer::from_gguf(&file).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    let (mut worst, mut forced_agree, mut forced_total, mut identical) = (0f32, 0, 0, 0);
    for case in cases {
        let messages: Vec<(Role, &str)> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| (role(m[0].as_str().unwrap()), m[1].as_str().unwrap()))
            .collect();
        let prompt = tokenizer.render(&messages);
        assert_eq!(prompt, case["prompt"].as_str().unwrap());
        let tokens = tokenizer.encode(&prompt).unwrap();
        let want: Vec<u32> = case["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
        assert_eq!(tokens, want, "prompt tokens of {prompt:?}");

        let mut cache = model.new_cache();
        let mut logits = model.forward(&device, &mut [Step { tokens: &tokens, cache: &mut cache }]).unwrap().remove(0);
        for pair in case["top_logits"].as_array().unwrap() {
            let (id, value) = (pair[0].as_u64().unwrap() as usize, pair[1].as_f64().unwrap() as f32);
            let diff = (logits[id] - value).abs();
            worst = worst.max(diff);
            assert!(diff <= LOGIT_TOLERANCE, "token {id}: {} vs llama.cpp {value} in {prompt:?}", logits[id]);
        }
        let reference: Vec<u32> =
            case["greedy"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
        let margins: Vec<f64> =
            case["greedy_margins"].as_array().unwrap().iter().map(|m| m.as_f64().unwrap()).collect();
        let prompt_logits = logits.clone();
        let prefix_cache = cache.clone();

        // Teacher-forced along llama.cpp's path: every decisive step agrees.
        for (step, &want) in reference.iter().enumerate() {
            let ours = argmax(&logits);
            if ours == want {
                forced_agree += 1;
            } else {
                assert!(
                    margins[step] < TIE,
                    "step {step} of {prompt:?}: aitl picks {ours}, llama.cpp {want} with margin {}",
                    margins[step]
                );
            }
            forced_total += 1;
            if want == tokenizer.eos {
                break;
            }
            logits = model.forward(&device, &mut [Step { tokens: &[want], cache: &mut cache }]).unwrap().remove(0);
        }

        // Free running: equal up to llama.cpp's first near-tie.
        let (mut logits, mut cache) = (prompt_logits, prefix_cache);
        let first_tie = margins.iter().position(|&m| m < TIE).unwrap_or(reference.len());
        let mut greedy = Vec::new();
        for _ in 0..reference.len() {
            let next = argmax(&logits);
            greedy.push(next);
            if next == tokenizer.eos {
                break;
            }
            logits = model.forward(&device, &mut [Step { tokens: &[next], cache: &mut cache }]).unwrap().remove(0);
        }
        assert_eq!(
            greedy[..first_tie.min(greedy.len())],
            reference[..first_tie],
            "greedy continuation of {prompt:?}: {:?} vs llama.cpp {:?}",
            tokenizer.decode(&greedy).unwrap(),
            case["greedy_text"]
        );
        if greedy == reference {
            identical += 1;
        }
    }
    println!(
        "worst logit difference to llama.cpp on its top 64: {worst}; teacher-forced greedy agreement \
         {forced_agree}/{forced_total}; free-running greedy identical on {identical}/{} prompts",
        cases.len()
    );
}
