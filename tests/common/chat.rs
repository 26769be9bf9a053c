//! The decoding engine serving the tiny Llama fixture's chat case
//! (tests/fixtures/tiny-llama, `tiny-llama-chat` in tiny_decoders_golden.json)
//! on a given device: shared by the CPU's and the GPU's tests.

use std::path::Path;

use aitl::{
    backend::Device,
    engine::{
        generator::{GenerateEvent, GenerateJob, GeneratorEngine, GeneratorOptions},
        sampler::SamplingConfig,
    },
};

fn ids(value: &serde_json::Value) -> Vec<u32> {
    value.as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect()
}

/// Two greedy candidates forked from one prefill on `device`, each with
/// transformers' text and token count.
pub fn serve_the_chat_case(device: Device, options: GeneratorOptions) {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let golden: serde_json::Value =
        serde_json::from_str(include_str!("../fixtures/tiny_decoders_golden.json")).expect("fixture parses");
    let case = &golden["tiny-llama-chat"];
    let engine = GeneratorEngine::load(device, &fixtures.join("tiny-llama"), options).unwrap();
    assert!(engine.version().starts_with("tiny-llama@"), "{}", engine.version());
    let greedy = ids(&case["greedy"]);
    let (events, mut replies) = tokio::sync::mpsc::unbounded_channel();
    engine
        .submit(GenerateJob {
            prompt: ids(&case["prompt"]),
            candidates: 2,
            sampling: SamplingConfig::default(),
            max_new_tokens: greedy.len(),
            stop: Vec::new(),
            events,
        })
        .unwrap();
    let expected = engine.tokenizer().decode(&greedy).unwrap();
    let mut finished = 0;
    while let Some(event) = replies.blocking_recv() {
        match event {
            GenerateEvent::Finished { text, completion_tokens, .. } => {
                assert_eq!((text.as_str(), completion_tokens), (expected.as_str(), greedy.len()));
                finished += 1;
            }
            GenerateEvent::Failed(why) => panic!("{why}"),
            GenerateEvent::Delta { .. } | GenerateEvent::Admitted => {}
        }
        if finished == 2 {
            break;
        }
    }
    assert_eq!(finished, 2);
}
