//! ORPO training speed on the default generator (SmolLM2-135M-Instruct,
//! Q4_1 GGUF, kept quantized; LoRA rank 8 on every projection): seconds
//! per 100 preference pairs, on grounded prompts shaped like Generate's
//! (a system message with five knowledge passages, a question) and replies
//! of about 40 words. Prints the figure; the device is the CPU unless
//! `AITL_TRAIN_DEVICE=cuda` (a build with the `cuda` feature).
//!
//! `cargo bench --bench train_generator`

mod workloads;

use std::{path::Path, time::Instant};

use aitl::{
    provision,
    worker::{
        datasets::{GeneratorRow, Message},
        train_bert::TrainingDevice,
        train_generator::{self, GeneratorTraining},
    },
};

const STEPS: usize = 8;
const BATCH: usize = 1;

fn main() {
    let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-models");
    let model = provision::DEFAULT_GENERATOR;
    let base = provision::ensure(&model, &cache).unwrap().join(model.weights);
    let passages = workloads::texts("e2_passages.jsonl");
    let questions = workloads::texts("e1_queries.jsonl");
    let message = |role: &str, content: String| Message { role: role.into(), content };
    let words = |text: &str, n: usize| text.split_whitespace().take(n).collect::<Vec<_>>().join(" ");
    let rows: Vec<GeneratorRow> = (0..STEPS * BATCH + 8)
        .map(|i| {
            let grounding: Vec<String> =
                (0..5).map(|j| format!("[{}] {}", j + 1, words(&passages[(i * 5 + j) % passages.len()], 50))).collect();
            GeneratorRow {
                prompt: vec![
                    message(
                        "system",
                        format!("Answer from the knowledge below and cite it.\n{}", grounding.join("\n")),
                    ),
                    message("user", questions[i % questions.len()].clone()),
                ],
                chosen: vec![message("assistant", format!("{} [1]", words(&passages[(i * 5) % passages.len()], 40)))],
                rejected: vec![message("assistant", words(&passages[(i * 7 + 3) % passages.len()], 40))],
                weight: 1.0,
            }
        })
        .collect();
    let (train, heldout) = rows.split_at(STEPS * BATCH);
    let mut options = GeneratorTraining::default();
    options.schedule.batch_size = BATCH;
    options.schedule.max_steps = STEPS;
    if std::env::var("AITL_TRAIN_DEVICE").as_deref() == Ok("cuda") {
        options.schedule.device = TrainingDevice::Cuda;
    }
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let report =
        train_generator::train_generator(&base, train, heldout, &dir.path().join("adapter"), &options, |_, _, _| {})
            .unwrap();
    let seconds = started.elapsed().as_secs_f64();
    let tokens: usize = train
        .iter()
        .map(|r| r.prompt.iter().chain(&r.chosen).chain(&r.rejected).map(|m| m.content.len() / 4).sum::<usize>())
        .sum();
    println!(
        "ORPO on LoRA r={} over {} ({}): {} steps of {BATCH} pairs in {seconds:.1} s (the held-out scoring of {} pairs \
         before and after included): {:.0} s per 100 pairs, ~{} tokens per pair",
        options.lora.rank,
        model.weights,
        report.device,
        report.steps,
        heldout.len(),
        seconds / train.len() as f64 * 100.0,
        tokens / train.len()
    );
}
