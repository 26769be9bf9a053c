//! LoRA adapters served unmerged over the frozen base, against PEFT:
//! `tests/fixtures/orpo-golden/` (made by `tests/fixtures/make_orpo_golden.py`
//! with transformers 5.24 + peft 0.21.2) holds an adapter as PEFT saved it
//! over the tiny Llama fixture, the logits of base + adapter through PEFT for
//! two prompts, and transformers' greedy tokens. Checked here: aitl's logits
//! with the adapter equal PEFT's, equal those of the merged weights, greedy
//! decoding follows transformers, and a second version over the same base
//! shares its weights.

use std::path::{Path, PathBuf};

use aitl::{
    backend::{Device, Precision},
    engine::generator::Checkpoint,
    model::llama::{Llama, Step},
};

/// Logits of float32 PEFT and of aitl's f32 arithmetic differ by float
/// order only (observed below 1e-5 on the base).
const TOLERANCE: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn golden() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("orpo-golden/golden.json")).unwrap()).unwrap()
}

fn numbers<T: From<f32>>(value: &serde_json::Value) -> Vec<T> {
    value.as_array().unwrap().iter().map(|v| T::from(v.as_f64().unwrap() as f32)).collect()
}

fn ids(value: &serde_json::Value) -> Vec<u32> {
    value.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

fn last_logits(model: &Llama, tokens: &[u32]) -> Vec<f32> {
    let mut cache = model.new_cache();
    model.forward(&Device::Cpu, &mut [Step { tokens, cache: &mut cache }]).unwrap().remove(0)
}

fn worst(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    got.iter().zip(want).map(|(g, w)| (g - w).abs()).fold(0.0, f32::max)
}

/// The adapter folder from the repository root (its base path is relative to it).
fn adapter_checkpoint() -> Checkpoint {
    std::env::set_current_dir(env!("CARGO_MANIFEST_DIR")).unwrap();
    Checkpoint::load(&Device::Cpu, &fixtures().join("orpo-golden/adapter"), Precision::F32).unwrap()
}

#[test]
fn adapter_logits_equal_peft_and_the_base_is_unchanged() {
    let checkpoint = adapter_checkpoint();
    assert!(
        checkpoint.version.starts_with("tiny-llama@") && checkpoint.version.contains("+adapter@"),
        "{}",
        checkpoint.version
    );
    let base = Llama::from_hf_folder(&Device::Cpu, &fixtures().join("tiny-llama")).unwrap();
    for (i, case) in golden()["serving"].as_array().unwrap().iter().enumerate() {
        let tokens = ids(&case["tokens"]);
        let adapted = worst(&last_logits(&checkpoint.model, &tokens), &numbers::<f32>(&case["adapter"]));
        let plain = worst(&last_logits(&base, &tokens), &numbers::<f32>(&case["base"]));
        println!("prompt {i}: base + adapter within {adapted:.2e} of PEFT, base within {plain:.2e} of transformers");
        assert!(adapted <= TOLERANCE, "prompt {i}: adapter logits differ from PEFT's by {adapted}");
        assert!(plain <= TOLERANCE, "prompt {i}: base logits differ by {plain}");
        // The adapter really moves the logits (so the check above means something).
        assert!(worst(&numbers::<f32>(&case["adapter"]), &numbers::<f32>(&case["base"])) > 0.1);
    }
}

#[test]
fn unmerged_lora_equals_the_merged_weights() {
    let checkpoint = adapter_checkpoint();
    let merged_dir = tempfile::tempdir().unwrap();
    merge_into(&fixtures().join("tiny-llama"), &fixtures().join("orpo-golden/adapter"), merged_dir.path());
    let merged = Llama::from_hf_folder(&Device::Cpu, merged_dir.path()).unwrap();
    for case in golden()["serving"].as_array().unwrap() {
        let tokens = ids(&case["tokens"]);
        let difference = worst(&last_logits(&checkpoint.model, &tokens), &last_logits(&merged, &tokens));
        println!("unmerged vs merged in f32: {difference:.2e}");
        assert!(difference <= TOLERANCE, "unmerged and merged differ by {difference}");
        let peft_merged = worst(&last_logits(&merged, &tokens), &numbers::<f32>(&case["merged"]));
        assert!(peft_merged <= TOLERANCE, "aitl's merge differs from PEFT's merge_and_unload by {peft_merged}");
    }
}

#[test]
fn greedy_decoding_with_the_adapter_follows_transformers() {
    let checkpoint = adapter_checkpoint();
    let case = &golden()["greedy"];
    let (prompt, want) = (ids(&case["prompt"]), ids(&case["tokens"]));
    let mut cache = checkpoint.model.new_cache();
    let mut logits =
        checkpoint.model.forward(&Device::Cpu, &mut [Step { tokens: &prompt, cache: &mut cache }]).unwrap().remove(0);
    let mut got = Vec::new();
    for _ in 0..want.len() {
        let next = logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 as u32;
        got.push(next);
        logits = checkpoint
            .model
            .forward(&Device::Cpu, &mut [Step { tokens: &[next], cache: &mut cache }])
            .unwrap()
            .remove(0);
    }
    assert_eq!(got, want);
}

#[test]
fn versions_over_one_base_share_its_weights() {
    let adapted = adapter_checkpoint();
    let plain = Checkpoint::load(&Device::Cpu, &fixtures().join("tiny-llama"), Precision::F32).unwrap();
    assert!(adapted.model.shares_base_with(&plain.model), "the champion's base is not loaded twice");
    assert!(adapted.model.adapter().is_some() && plain.model.adapter().is_none());
    assert_eq!(adapted.version.split('+').next().unwrap(), plain.version);
}

#[test]
fn adapters_that_do_not_fit_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = fixtures().join("orpo-golden/adapter");
    std::fs::copy(adapter.join("adapter_model.safetensors"), dir.path().join("adapter_model.safetensors")).unwrap();
    let config = std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap();
    let base = fixtures().join("tiny-llama").display().to_string();
    let write = |text: String| std::fs::write(dir.path().join("adapter_config.json"), text).unwrap();
    let config = config.replace("\"tests/fixtures/tiny-llama\"", &format!("{base:?}"));
    write(config.replace("\"r\": 4", "\"r\": 8"));
    let err = Checkpoint::load(&Device::Cpu, dir.path(), Precision::F32).err().unwrap().to_string();
    assert!(err.contains("do not fit rank 8"), "{err}");
    write(config.replace("\"peft_type\": \"LORA\"", "\"peft_type\": \"IA3\""));
    let err = Checkpoint::load(&Device::Cpu, dir.path(), Precision::F32).err().unwrap().to_string();
    assert!(err.contains("only LORA"), "{err}");
    write(config.replace(&format!("{base:?}"), "\"/nowhere/base\""));
    assert!(Checkpoint::load(&Device::Cpu, dir.path(), Precision::F32).is_err());
}

/// Writes `base` with `W + (alpha/r)·B·A` for every adapted projection, in
/// f32, as a Hugging Face folder in `out`: the merged reference.
fn merge_into(base: &Path, adapter: &Path, out: &Path) {
    use safetensors::{Dtype, tensor::TensorView};
    for file in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(base.join(file), out.join(file)).unwrap();
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap()).unwrap();
    let scale = config["lora_alpha"].as_f64().unwrap() as f32 / config["r"].as_f64().unwrap() as f32;
    let read = |path: &Path| std::fs::read(path).unwrap();
    let (base_bytes, adapter_bytes) =
        (read(&base.join("model.safetensors")), read(&adapter.join("adapter_model.safetensors")));
    let (weights, lora) = (
        safetensors::SafeTensors::deserialize(&base_bytes).unwrap(),
        safetensors::SafeTensors::deserialize(&adapter_bytes).unwrap(),
    );
    let as_f32 = |view: &TensorView| -> Vec<f32> {
        match view.dtype() {
            Dtype::F32 => view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::BF16 => view
                .data()
                .chunks_exact(2)
                .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
                .collect(),
            other => panic!("{other:?}"),
        }
    };
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in weights.tensors() {
        let mut values = as_f32(&view);
        let stem = name.trim_end_matches(".weight");
        let a = lora.tensor(&format!("base_model.model.{stem}.lora_A.weight"));
        let b = lora.tensor(&format!("base_model.model.{stem}.lora_B.weight"));
        if let (Ok(a), Ok(b)) = (a, b) {
            let (a, b, r) = (as_f32(&a), as_f32(&b), a.shape()[0]);
            let (outputs, inputs) = (view.shape()[0], view.shape()[1]);
            for o in 0..outputs {
                for i in 0..inputs {
                    values[o * inputs + i] += scale * (0..r).map(|j| b[o * r + j] * a[j * inputs + i]).sum::<f32>();
                }
            }
        }
        tensors.push((name, view.shape().to_vec(), values.iter().flat_map(|v| v.to_le_bytes()).collect()));
    }
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(name, shape, bytes)| (name.clone(), TensorView::new(Dtype::F32, shape.clone(), bytes).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &out.join("model.safetensors")).unwrap();
}

/// A block-quantized base (tiny Llama in Q8_0, llama.cpp's layout with Q
/// and K rows permuted) with the same adapter, decoded with llama.cpp's
/// arithmetic (8-bit activations), against transformers on the file's
/// dequantized weights with the adapter merged
/// (`tests/fixtures/make_tiny_llama_gguf.py`). Along the reference's greedy
/// path every step whose two best logits are 0.2 or more apart is the same
/// token; the 8-bit activations alone move these logits by about 0.1.
#[test]
fn a_quantized_base_with_the_adapter_decodes_like_its_dequantized_merged_reference() {
    use aitl::{backend::RopeStyle, model::lora::LoraAdapter};
    let file = aitl::model::gguf::GgufFile::open(&fixtures().join("tiny-llama-q8_0.gguf")).unwrap();
    let base = Llama::from_gguf_in(&Device::Cpu, &file, Precision::F32).unwrap();
    assert_eq!(base.config().rope_style, RopeStyle::Normal);
    let adapter =
        LoraAdapter::load(&Device::Cpu, &fixtures().join("orpo-golden/adapter"), base.config(), RopeStyle::Normal)
            .unwrap();
    let adapted = base.with_adapter(std::sync::Arc::new(adapter)).unwrap();
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("orpo-golden/quantized.json")).unwrap()).unwrap();
    let prompt = ids(&reference["prompt"]);
    for (model, case) in [(&adapted, &reference["adapter"]), (&base, &reference["base"])] {
        let (tokens, margins) = (ids(&case["greedy"]), numbers::<f32>(&case["margins"]));
        let first = worst(&last_logits(model, &prompt), &numbers::<f32>(&case["logits"]));
        let mut cache = model.new_cache();
        let mut logits =
            model.forward(&Device::Cpu, &mut [Step { tokens: &prompt, cache: &mut cache }]).unwrap().remove(0);
        let mut decided = 0;
        for (step, (&want, &margin)) in tokens.iter().zip(&margins).enumerate() {
            let got = logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 as u32;
            if margin >= 0.2 {
                assert_eq!(got, want, "step {step}: margin {margin}");
                decided += 1;
            }
            logits = model.forward(&Device::Cpu, &mut [Step { tokens: &[want], cache: &mut cache }]).unwrap().remove(0);
        }
        println!(
            "Q8_0 base, adapter {}: prompt logits within {first:.3}; {decided} decided steps agree",
            model.adapter().is_some()
        );
        assert!(first <= 0.5, "prompt logits differ by {first}");
        assert!(decided >= 4, "too few decided steps to mean anything");
    }
}
