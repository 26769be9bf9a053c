//! ORPO on LoRA adapters against the reference tools: the tiny Llama's
//! logits against transformers (tests/fixtures/tiny_decoders_golden.json),
//! with an adapter against PEFT, and TRL's ORPOTrainer's tokenization, loss,
//! terms, per-pair log-probabilities and every adapter gradient
//! (tests/fixtures/orpo-golden, made by make_orpo_golden.py); then the
//! trainer itself: its PEFT folder, a short run that learns, and resume.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use aitl::worker::{
    datasets::{GeneratorRow, Message},
    train_bert::TrainingDevice,
    train_generator::{
        self, GeneratorTraining, NllTokens, TokenizedPair, base_tokenizer, orpo_loss, read_adapter, tokenize_pair,
    },
    train_llama::{LoraConfig, Pass, TrainLlama},
};
use candle_core::{Device, Tensor};

/// Absolute, on logits of magnitude ≤ 6: f32 against PyTorch's f32, which
/// differ only in summation order.
const LOGIT_TOLERANCE: f32 = 1e-4;
/// Relative (to the larger of the value and 1e-2), for the loss, its terms,
/// the log-probabilities and the gradients.
const RELATIVE_TOLERANCE: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn golden() -> serde_json::Value {
    serde_json::from_str(include_str!("fixtures/orpo-golden/golden.json")).expect("fixture parses")
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn fixture_lora() -> LoraConfig {
    LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
            .map(String::from)
            .to_vec(),
    }
}

/// The tiny Llama with the fixture's adapter.
fn adapted() -> TrainLlama {
    let model = TrainLlama::load(&fixtures().join("tiny-llama"), &fixture_lora(), &Device::Cpu, 0).unwrap();
    read_adapter(&model, &fixtures().join("orpo-golden/adapter")).unwrap();
    model
}

fn last_logits(model: &TrainLlama, tokens: &[u32]) -> Vec<f32> {
    let input = Tensor::new(tokens, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let logits = model.logits(&input, Pass::Evaluate).unwrap();
    logits.squeeze(0).unwrap().get(tokens.len() - 1).unwrap().to_vec1().unwrap()
}

fn worst_difference(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max)
}

fn assert_close(what: &str, got: f32, want: f32) {
    let relative = (got - want).abs() / want.abs().max(1e-2);
    println!("{what}: relative difference {relative:.1e}");
    assert!(relative <= RELATIVE_TOLERANCE, "{what}: {got}, reference {want} (relative {relative:.1e})");
}

fn pairs_file() -> Vec<GeneratorRow> {
    std::fs::read_to_string(fixtures().join("orpo-golden/pairs.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn tokenized() -> Vec<TokenizedPair> {
    let tokenizer = base_tokenizer(&fixtures().join("tiny-llama")).unwrap();
    pairs_file().iter().map(|row| tokenize_pair(&tokenizer, row, 512).unwrap()).collect()
}

#[test]
fn base_logits_match_transformers() {
    let cases: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/tiny_decoders_golden.json")).expect("fixture parses");
    // Adapters start with B = 0: the model is the base.
    let model = TrainLlama::load(&fixtures().join("tiny-llama"), &LoraConfig::default(), &Device::Cpu, 7).unwrap();
    let mut worst = 0f32;
    for case in cases["tiny-llama"].as_array().unwrap() {
        let diff = worst_difference(&last_logits(&model, &ids(&case["tokens"])), &floats(&case["logits"]));
        worst = worst.max(diff);
    }
    println!("tiny Llama base: worst logit difference to transformers {worst:.2e}");
    assert!(worst <= LOGIT_TOLERANCE, "{worst}");
}

#[test]
fn adapter_logits_match_peft() {
    let golden = golden();
    let model = adapted();
    let mut worst = 0f32;
    for case in golden["serving"].as_array().unwrap() {
        let got = last_logits(&model, &ids(&case["tokens"]));
        worst = worst.max(worst_difference(&got, &floats(&case["adapter"])));
    }
    println!("tiny Llama + adapter: worst logit difference to PEFT {worst:.2e}");
    assert!(worst <= LOGIT_TOLERANCE, "{worst}");
    // The unmerged adapter equals PEFT's merged weights (merge_and_unload).
    for case in golden["serving"].as_array().unwrap() {
        let got = last_logits(&model, &ids(&case["tokens"]));
        assert!(worst_difference(&got, &floats(&case["merged"])) <= LOGIT_TOLERANCE);
    }
    // And decodes PEFT's greedy tokens.
    let mut tokens = ids(&golden["greedy"]["prompt"]);
    let prompt = tokens.len();
    for _ in 0..ids(&golden["greedy"]["tokens"]).len() {
        let logits = last_logits(&model, &tokens);
        tokens.push(logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 as u32);
    }
    assert_eq!(tokens[prompt..], ids(&golden["greedy"]["tokens"]));
}

/// Mixtral's experts through the same code, from safetensors, GGUF f32
/// and GGUF Q8_0 (kept quantized; against transformers on the file's
/// dequantized weights).
#[test]
fn mixture_of_experts_logits_match_transformers_from_every_source() {
    let cases: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/tiny_decoders_golden.json")).expect("fixture parses");
    let sources = [
        ("tiny-mixtral", "tiny-mixtral", LOGIT_TOLERANCE),
        ("tiny-mixtral-f32.gguf", "tiny-mixtral", LOGIT_TOLERANCE),
        ("tiny-mixtral-q8_0.gguf", "tiny-mixtral-q8_0.gguf", LOGIT_TOLERANCE),
    ];
    for (source, reference, tolerance) in sources {
        let model = TrainLlama::load(&fixtures().join(source), &LoraConfig::default(), &Device::Cpu, 7).unwrap();
        // Q8_0: every block-quantized matrix stays so (2 layers × (4 attention + 8 experts × 3 + router) + embeddings + head).
        let quantized = if source.contains("q8_0") { 2 * (4 + 8 * 3 + 1) + 2 } else { 0 };
        assert_eq!(model.quantized_matrices(), quantized, "{source}");
        assert!(model.adapters().iter().any(|(m, _)| m.ends_with("block_sparse_moe.experts.7.w2")));
        let mut worst = 0f32;
        for case in cases[reference].as_array().unwrap() {
            worst = worst.max(worst_difference(&last_logits(&model, &ids(&case["tokens"])), &floats(&case["logits"])));
        }
        println!("{source}: worst logit difference to transformers {worst:.2e}");
        assert!(worst <= tolerance, "{source}: {worst}");
    }
}

#[test]
fn pairs_tokenize_as_trl_does() {
    let golden = golden();
    for (pair, want) in tokenized().iter().zip(golden["pairs"].as_array().unwrap()) {
        assert_eq!(pair.chosen.ids, ids(&want["chosen_ids"]));
        assert_eq!(pair.rejected.ids, ids(&want["rejected_ids"]));
        let prompt = ids(&want["prompt_ids"]).len();
        assert_eq!((pair.chosen.completion_start, pair.rejected.completion_start), (prompt, prompt));
        let masked = want["chosen_labels"].as_array().unwrap().iter().take_while(|l| l.as_i64() == Some(-100)).count();
        assert_eq!(masked, prompt);
    }
}

fn gradients_of(model: &TrainLlama, loss: &Tensor) -> HashMap<String, Vec<f32>> {
    let grads = loss.backward().unwrap();
    let mut out = HashMap::new();
    for (module, adapter) in model.adapters() {
        for (part, var) in [("lora_A", &adapter.a), ("lora_B", &adapter.b)] {
            let g = grads.get(var.as_tensor()).expect("every adapter gets a gradient");
            out.insert(format!("base_model.model.{module}.{part}.weight"), g.flatten_all().unwrap().to_vec1().unwrap());
        }
    }
    out
}

/// TRL's loss (NLL over prompt and completion), its terms, the per-pair
/// log-probabilities and log-odds, and d(loss)/d(every LoRA matrix).
#[test]
fn orpo_loss_terms_and_gradients_match_trl() {
    let golden = golden();
    let model = adapted();
    let pairs = tokenized();
    let refs: Vec<&TokenizedPair> = pairs.iter().collect();
    let terms = orpo_loss(&model, &refs, 0.1, NllTokens::Sequence, Pass::Train).unwrap();
    let scalar = |t: &Tensor| t.to_scalar::<f32>().unwrap();
    assert_close("loss", scalar(&terms.loss), golden["loss"].as_f64().unwrap() as f32);
    assert_close("nll", scalar(&terms.nll), golden["nll"].as_f64().unwrap() as f32);
    assert_close("log σ(log-odds)", scalar(&terms.odds_ratio), golden["trl_log_odds_ratio"].as_f64().unwrap() as f32);
    for (name, got) in [
        ("policy_chosen_logps", &terms.chosen_logps),
        ("policy_rejected_logps", &terms.rejected_logps),
        ("log_odds", &terms.log_odds),
    ] {
        for (i, (g, w)) in got.to_vec1::<f32>().unwrap().iter().zip(floats(&golden[name])).enumerate() {
            assert_close(&format!("{name}[{i}]"), *g, w);
        }
    }

    let want =
        candle_core::safetensors::load(fixtures().join("orpo-golden/gradients.safetensors"), &Device::Cpu).unwrap();
    let got = gradients_of(&model, &terms.loss);
    assert_eq!(got.len(), want.len());
    let mut worst = 0f32;
    for (name, reference) in &want {
        let reference: Vec<f32> = reference.flatten_all().unwrap().to_vec1().unwrap();
        let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        let diff = worst_difference(&got[name], &reference) / scale;
        worst = worst.max(diff);
        assert!(diff <= RELATIVE_TOLERANCE, "{name}: gradient off by {diff:.1e} of its largest entry");
    }
    println!("ORPO gradients: worst difference {worst:.1e} of each matrix's largest entry");

    // One plain SGD step (lr 1e-2) on those gradients gives TRL's loss after it.
    let grads = terms.loss.backward().unwrap();
    for (_, adapter) in model.adapters() {
        for var in [&adapter.a, &adapter.b] {
            let g = grads.get(var.as_tensor()).unwrap();
            var.set(&(var.as_tensor() - (g * 1e-2).unwrap()).unwrap()).unwrap();
        }
    }
    let after = orpo_loss(&model, &refs, 0.1, NllTokens::Sequence, Pass::Train).unwrap();
    let step = &golden["sgd_step"];
    assert_close("loss after a step", scalar(&after.loss), step["loss_after"].as_f64().unwrap() as f32);
    assert_close("nll after a step", scalar(&after.nll), step["nll_after"].as_f64().unwrap() as f32);
}

/// With prompts masked (the default) the NLL is the chosen completions'
/// token mean, from the same per-pair sums; all weights 1 is TRL's
/// unweighted mean, and weights move the means as stated.
#[test]
fn masked_prompts_and_pair_weights_change_the_means_as_stated() {
    let golden = golden();
    let model = adapted();
    let mut pairs = tokenized();
    let per_pair = &golden["per_pair"];
    let sums = floats(&per_pair["chosen_completion_logp_sum"]);
    let lengths = floats(&per_pair["completion_lengths_chosen"]);
    let refs: Vec<&TokenizedPair> = pairs.iter().collect();
    let terms = orpo_loss(&model, &refs, 0.1, NllTokens::Completion, Pass::Evaluate).unwrap();
    let want = -sums.iter().sum::<f32>() / lengths.iter().sum::<f32>();
    assert_close("completion nll", terms.nll.to_scalar().unwrap(), want);

    let ratios = floats(&golden["log_sigmoid_log_odds"]);
    let weights = [2.0f32, 0.5, 1.0];
    for (pair, w) in pairs.iter_mut().zip(weights) {
        pair.weight = w;
    }
    let refs: Vec<&TokenizedPair> = pairs.iter().collect();
    let terms = orpo_loss(&model, &refs, 0.1, NllTokens::Completion, Pass::Evaluate).unwrap();
    let weighted =
        |values: &[f32], by: &[f32]| values.iter().zip(by).map(|(v, w)| v * w).sum::<f32>() / by.iter().sum::<f32>();
    let token_weights: Vec<f32> = lengths.iter().zip(weights).map(|(n, w)| n * w).collect();
    let nll = -sums.iter().zip(weights).map(|(s, w)| s * w).sum::<f32>() / token_weights.iter().sum::<f32>();
    assert_close("weighted nll", terms.nll.to_scalar().unwrap(), nll);
    assert_close("weighted odds ratio", terms.odds_ratio.to_scalar().unwrap(), weighted(&ratios, &weights));
}

/// Synthetic pairs with one plain rule (the terse reply wins, which the
/// random base disfavours) so a few steps on the tiny model can learn it.
fn synthetic(count: usize, offset: usize) -> Vec<GeneratorRow> {
    let message = |role: &str, content: String| Message { role: role.into(), content };
    (0..count)
        .map(|i| {
            let i = i + offset;
            GeneratorRow {
                prompt: vec![message("user", format!("Where is order {i}?"))],
                chosen: vec![message("assistant", format!("No idea about {i}."))],
                rejected: vec![message("assistant", format!("Thanks for asking, order {i} ships today."))],
                weight: 1.0,
            }
        })
        .collect()
}

fn short_run() -> GeneratorTraining {
    let mut options = GeneratorTraining::default();
    options.lora.dropout = 0.0;
    options.lora.rank = 4;
    options.schedule.batch_size = 4;
    options.schedule.epochs = 12;
    options.schedule.learning_rate = 1e-2;
    options.schedule.warmup_share = 0.0;
    options.schedule.device = TrainingDevice::Cpu;
    options.lambda = 1.0;
    options
}

#[test]
fn a_short_run_learns_and_writes_a_peft_folder() {
    let dir = tempfile::tempdir().unwrap();
    let base = fixtures().join("tiny-llama");
    let out = dir.path().join("generator");
    let options = short_run();
    let report =
        train_generator::train_generator(&base, &synthetic(8, 0), &synthetic(8, 100), &out, &options, |_, _, _| {})
            .unwrap();
    let (first, last) = (report.losses[0], *report.losses.last().unwrap());
    let (before, after) = (report.preference_accuracy_before.unwrap(), report.preference_accuracy_after.unwrap());
    println!("loss {first:.3} → {last:.3}; held-out preference accuracy {before:.2} → {after:.2}");
    assert!(last < first, "loss {first} → {last}");
    assert!(after > before, "held-out preference accuracy {before} → {after}");

    // PEFT's names and shapes, as the fixture's adapter (written by PEFT) has them.
    let lora = LoraConfig { rank: 4, ..fixture_lora() };
    let model = TrainLlama::load(&base, &lora, &Device::Cpu, 0).unwrap();
    train_generator::write_adapter(&model, &base, &dir.path().join("fresh")).unwrap();
    assert_eq!(
        train_generator::adapter_shapes(&dir.path().join("fresh")).unwrap(),
        train_generator::adapter_shapes(&fixtures().join("orpo-golden/adapter")).unwrap()
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((config["peft_type"].as_str(), config["task_type"].as_str()), (Some("LORA"), Some("CAUSAL_LM")));
    assert_eq!((config["r"].as_u64(), config["bias"].as_str()), (Some(4), Some("none")));
    assert_eq!(config["fan_in_fan_out"], false);
    // Only the modules this dense model has: PEFT finds each of them.
    let targets: Vec<&str> = config["target_modules"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(targets, ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]);

    let manifest = train_generator::write_manifest(&report, &base, &options, "synthetic", dir.path()).unwrap();
    assert!(manifest.trained.parent.starts_with("tiny-llama@"), "{}", manifest.trained.parent);
    let read = aitl::registry::manifest::TrainedManifest::read(&out).unwrap().unwrap();
    assert_eq!(read.role, aitl::registry::Role::Generator);
}

/// A run that dies after a checkpoint resumes at its step, from its adapters.
#[test]
fn a_rerun_resumes_from_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let base = fixtures().join("tiny-llama");
    let out = dir.path().join("generator");
    let mut options = short_run();
    options.schedule.epochs = 2;
    options.checkpoint_every = 2;
    let rows = synthetic(8, 0);
    // Four steps in all; the first run dies in step 3, after the step-2 checkpoint.
    let died = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        train_generator::train_generator(&base, &rows, &[], &out, &options, |step, _, _| {
            assert!(step < 3, "killed in step {step}");
        })
    }));
    assert!(died.is_err());
    assert!(out.join("checkpoint/checkpoint.json").exists());
    let checkpoint = train_generator::adapter_shapes(&out.join("checkpoint")).unwrap();
    let mut steps = Vec::new();
    let report =
        train_generator::train_generator(&base, &rows, &[], &out, &options, |step, _, _| steps.push(step)).unwrap();
    assert_eq!((report.resumed_at, report.steps, steps), (2, 2, vec![3, 4]));
    assert_eq!(train_generator::adapter_shapes(&out).unwrap(), checkpoint);
    assert!(!out.join("checkpoint").exists(), "a finished run removes its checkpoint");
}

/// Every adapter of `model` with a random B (fresh ones have B = 0, which
/// would leave the base unchanged).
fn randomise_adapters(model: &TrainLlama) {
    let mut tensors = HashMap::new();
    for (module, adapter) in model.adapters() {
        let (out, rank) = adapter.b.as_tensor().dims2().unwrap();
        tensors.insert(format!("{module}.lora_A.weight"), adapter.a.as_tensor().copy().unwrap());
        tensors
            .insert(format!("{module}.lora_B.weight"), Tensor::randn(0f32, 0.05, (out, rank), &Device::Cpu).unwrap());
    }
    model.set_adapters(&tensors).unwrap();
}

/// The unmerged adapters (experts' included) equal a checkpoint with
/// `W + (alpha/r)·B·A` written into its weights, at every position.
#[test]
fn a_lora_forward_equals_the_merged_weights_forward_for_experts_too() {
    let base = fixtures().join("tiny-mixtral");
    let lora = LoraConfig { rank: 2, alpha: 4.0, dropout: 0.0, ..LoraConfig::default() };
    let model = TrainLlama::load(&base, &lora, &Device::Cpu, 3).unwrap();
    randomise_adapters(&model);
    let mut weights = candle_core::safetensors::load(base.join("model.safetensors"), &Device::Cpu).unwrap();
    for (module, adapter) in model.adapters() {
        let delta = (adapter.b.as_tensor().matmul(adapter.a.as_tensor()).unwrap() * lora.scale()).unwrap();
        let weight = weights.get_mut(&format!("{module}.weight")).unwrap();
        *weight = (weight.to_dtype(candle_core::DType::F32).unwrap() + delta).unwrap();
    }
    let merged_dir = tempfile::tempdir().unwrap();
    std::fs::copy(base.join("config.json"), merged_dir.path().join("config.json")).unwrap();
    candle_core::safetensors::save(&weights, merged_dir.path().join("model.safetensors")).unwrap();
    let plain = LoraConfig { target_modules: Vec::new(), ..lora };
    let merged = TrainLlama::load(merged_dir.path(), &plain, &Device::Cpu, 3).unwrap();
    assert!(merged.adapters().is_empty());

    let tokens = Tensor::new(&[[1u32, 17, 99, 3, 250, 42, 7, 7, 128]], &Device::Cpu).unwrap();
    let flat = |m: &TrainLlama| -> Vec<f32> {
        m.logits(&tokens, Pass::Evaluate).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    };
    let worst = worst_difference(&flat(&model), &flat(&merged));
    println!("tiny Mixtral: unmerged adapters vs merged weights, worst logit difference {worst:.2e}");
    assert!(worst <= LOGIT_TOLERANCE, "{worst}");
}

/// Over a Q8_0 GGUF base (kept quantized) every adapter gets a gradient:
/// the loss reaches them through the dequantized products.
#[test]
fn over_a_quantized_base_gradients_reach_the_adapters() {
    let lora = LoraConfig { dropout: 0.0, ..LoraConfig::default() };
    let model = TrainLlama::load(&fixtures().join("tiny-mixtral-q8_0.gguf"), &lora, &Device::Cpu, 5).unwrap();
    assert!(model.quantized_matrices() > 0);
    randomise_adapters(&model);
    // Long enough that the router sends a token to every expert.
    let tokens: Vec<u32> = (0..48).map(|i| (i * 37 % 256) as u32).collect();
    let input = Tensor::new(tokens.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let logits = model.logits(&input, Pass::Train).unwrap();
    let loss = candle_nn::ops::log_softmax(&logits, 2).unwrap().mean_all().unwrap();
    let grads = loss.backward().unwrap();
    let mut reached = 0;
    for (module, adapter) in model.adapters() {
        let a =
            grads.get(adapter.a.as_tensor()).map(|g| g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap());
        let b =
            grads.get(adapter.b.as_tensor()).map(|g| g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap());
        assert!(a.is_some() && b.is_some(), "{module} got no gradient");
        assert!(a.unwrap().is_finite() && b.unwrap().is_finite(), "{module}");
        reached += usize::from(b.unwrap() > 0.0);
    }
    assert_eq!(reached, model.adapters().len(), "every adapter's B moves the loss");
}

/// The generator gate, through the serving decoder: an adapter trained
/// toward the agents' choices is accepted, one trained against them is
/// refused and says why; and the serving decoder scores the held-out pairs
/// as the trainer did.
#[test]
fn the_gate_accepts_a_better_adapter_and_refuses_a_worse_one() {
    use aitl::{registry::gate::PromotionOptions, worker::generator_gate};
    let dir = tempfile::tempdir().unwrap();
    let base = fixtures().join("tiny-llama");
    let heldout = synthetic(8, 100);
    let swapped = |rows: Vec<GeneratorRow>| -> Vec<GeneratorRow> {
        rows.into_iter().map(|r| GeneratorRow { chosen: r.rejected, rejected: r.chosen, ..r }).collect()
    };
    let (better, worse) = (dir.path().join("better"), dir.path().join("worse"));
    let options = short_run();
    let report =
        train_generator::train_generator(&base, &synthetic(8, 0), &heldout, &better, &options, |_, _, _| {}).unwrap();
    train_generator::train_generator(&base, &swapped(synthetic(8, 0)), &heldout, &worse, &options, |_, _, _| {})
        .unwrap();
    let gate = PromotionOptions::default();
    let f32 = aitl::backend::Precision::F32;
    let accepted = generator_gate::decide(&gate, f32, ("base", &base), ("better", &better), &heldout, &[]).unwrap();
    print!("{accepted}");
    assert!(accepted.accepted, "{:?}", accepted.reasons);
    assert_eq!(Some(accepted.candidate_accuracy), report.preference_accuracy_after, "serving and training agree");
    assert_eq!(Some(accepted.serving_accuracy), report.preference_accuracy_before);
    let refused = generator_gate::decide(&gate, f32, ("base", &base), ("worse", &worse), &heldout, &[]).unwrap();
    print!("{refused}");
    assert!(!refused.accepted);
    assert!(refused.reasons[0].contains("below the required gain"), "{:?}", refused.reasons);
    assert!(refused.candidate_accuracy <= refused.serving_accuracy);

    // The guard: DSTC11's reference replies after their conversations.
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/dstc11-track5");
    assert!(data.exists(), "the DSTC11 data is at {}", data.display());
    let guarded = |tolerance: f64| PromotionOptions {
        guard_dataset: data.clone(),
        guard_split: "eval".into(),
        guard_limit: 3,
        generator_perplexity_tolerance: tolerance,
        ..PromotionOptions::default()
    };
    let lenient =
        generator_gate::decide(&guarded(1e6), f32, ("base", &base), ("better", &better), &heldout, &[]).unwrap();
    print!("{lenient}");
    let (old, new) = (lenient.serving_perplexity.unwrap(), lenient.candidate_perplexity.unwrap());
    assert!(old.is_finite() && new.is_finite() && old > 1.0 && new > 1.0, "{old} {new}");
    assert!(lenient.accepted && lenient.guard_replies == 3);
    let strict =
        generator_gate::decide(&guarded(-1.0), f32, ("base", &base), ("better", &better), &heldout, &[]).unwrap();
    assert!(!strict.accepted && strict.reasons[1].contains("above the tolerated"), "{:?}", strict.reasons);
    assert!(strict.reasons[2].contains("shares no question"), "{:?}", strict.reasons);

    // Trained on the guard's own questions, the candidate is refused unscored.
    let message =
        |role: &str, content: &str| aitl::worker::datasets::Message { role: role.into(), content: content.into() };
    let trained_on_guard: Vec<GeneratorRow> =
        aitl::eval::dataset::read_queries(&data, aitl::eval::dataset::Split::Eval)
            .unwrap()
            .into_iter()
            .map(|q| {
                let mut prompt = vec![message("system", "Knowledge: …")];
                for turn in &q.context {
                    let role = if turn.speaker == aitl::proto::Speaker::Agent as i32 { "assistant" } else { "user" };
                    prompt.push(message(role, &turn.text));
                }
                prompt.push(message("user", &q.query));
                let reply = vec![message("assistant", &q.reference_reply)];
                GeneratorRow { prompt, chosen: reply.clone(), rejected: reply, weight: 1.0 }
            })
            .collect();
    let overlapping =
        generator_gate::decide(&guarded(1e6), f32, ("base", &base), ("better", &better), &heldout, &trained_on_guard)
            .unwrap();
    assert!(!overlapping.accepted && overlapping.guard_replies == 0, "{:?}", overlapping.reasons);
    assert!(
        overlapping.reasons.iter().any(|r| r.contains("3 of 3 guard questions were trained on")),
        "{:?}",
        overlapping.reasons
    );
}

/// After a generator promotion what serves is an adapter folder: the next
/// round trains fresh adapters over that adapter's own base.
#[test]
fn a_served_adapter_resolves_to_its_base_for_the_next_round() {
    std::env::set_current_dir(env!("CARGO_MANIFEST_DIR")).unwrap();
    let adapter = fixtures().join("orpo-golden/adapter");
    let base = train_generator::frozen_base(&adapter).unwrap();
    assert_eq!(std::fs::canonicalize(base).unwrap(), std::fs::canonicalize(fixtures().join("tiny-llama")).unwrap());
    let plain = fixtures().join("tiny-llama");
    assert_eq!(train_generator::frozen_base(&plain).unwrap(), plain);
}
