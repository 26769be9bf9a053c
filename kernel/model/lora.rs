//! LoRA adapters (Hu et al., 2021) as PEFT saves them: `adapter_config.json`
//! and `adapter_model.safetensors` with PEFT's tensor names
//! (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`, …).
//! Applied unmerged at serving time, `y = x·Wᵀ + (alpha/r)·(x·Aᵀ)·Bᵀ`, so
//! a champion and a challenger over one base share its weights and the
//! challenger costs only its adapter (two products of rank r per
//! projection); a block-quantized base stays quantized.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{llama::LlamaConfig, weights::SafetensorsFile};
use crate::{
    backend::{Activation, Device, RopeStyle, Tensor},
    error::{Error, Result},
};

/// The fields of PEFT's `adapter_config.json` that serving needs.
#[derive(Debug, Clone, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub target_modules: TargetModules,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub bias: Option<String>,
    #[serde(default)]
    pub rank_pattern: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub alpha_pattern: serde_json::Map<String, serde_json::Value>,
}

/// PEFT writes a list, or a single regular expression as a string.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    #[default]
    None,
    List(Vec<String>),
    Pattern(String),
}

/// A projection's low-rank update, laid out for the backend's `linear`:
/// `down` is Aᵀ (`[in, r]`), `up` is scale·Bᵀ (`[r, out]`).
pub struct LoraPair {
    down: Tensor,
    up: Tensor,
}

impl LoraPair {
    /// `scale·(x·Aᵀ)·Bᵀ`.
    pub fn delta(&self, device: &Device, x: &Tensor) -> Result<Tensor> {
        device.linear(&device.linear(x, &self.down, None, Activation::None)?, &self.up, None, Activation::None)
    }
}

/// The projections of one decoder block; absent ones are not adapted.
#[derive(Default)]
pub struct BlockAdapter {
    pub q: Option<LoraPair>,
    pub k: Option<LoraPair>,
    pub v: Option<LoraPair>,
    pub o: Option<LoraPair>,
    pub gate: Option<LoraPair>,
    pub up: Option<LoraPair>,
    pub down: Option<LoraPair>,
}

pub struct LoraAdapter {
    pub config: AdapterConfig,
    pub blocks: Vec<BlockAdapter>,
    /// `{folder name}@{first 12 hex digits of the weights' SHA-256}`.
    pub version: String,
}

/// PEFT's module names in a Llama block, with (inputs, outputs) and
/// whether the rows are Q or K (which GGUF permutes for its rotary layout).
fn modules(config: &LlamaConfig) -> [(&'static str, &'static str, usize, usize, Option<usize>); 7] {
    let (h, f) = (config.hidden, config.ffn);
    let (q, kv) = (config.heads * config.head_dim, config.kv_heads * config.head_dim);
    [
        ("self_attn", "q_proj", h, q, Some(config.heads)),
        ("self_attn", "k_proj", h, kv, Some(config.kv_heads)),
        ("self_attn", "v_proj", h, kv, None),
        ("self_attn", "o_proj", q, h, None),
        ("mlp", "gate_proj", h, f, None),
        ("mlp", "up_proj", h, f, None),
        ("mlp", "down_proj", f, h, None),
    ]
}

impl LoraAdapter {
    /// Whether `dir` is a PEFT adapter folder.
    pub fn is_adapter(dir: &Path) -> bool {
        dir.join("adapter_config.json").is_file()
    }

    /// The base the adapter in `dir` was trained over:
    /// `base_model_name_or_path`, relative to the adapter folder where it
    /// names something there, else as written (relative to the working
    /// directory).
    pub fn base_of(dir: &Path) -> Result<PathBuf> {
        let config: AdapterConfig = super::hf_folder::read_json(&dir.join("adapter_config.json"))?
            .ok_or_else(|| Error::InvalidArgument(format!("{}: no adapter_config.json", dir.display())))?;
        let base = config.base_model_name_or_path.map(PathBuf::from).ok_or_else(|| {
            Error::InvalidArgument(format!("{}: the adapter names no base_model_name_or_path", dir.display()))
        })?;
        let beside = dir.join(&base);
        Ok(if base.is_relative() && beside.exists() { beside } else { base })
    }

    /// Reads the adapter in `dir` for a base of `config` whose Q and K rows
    /// are laid out for `rope` (GGUF permutes them for adjacent-pair
    /// rotation; the adapter, trained on Hugging Face's layout, is permuted
    /// to match).
    pub fn load(device: &Device, dir: &Path, config: &LlamaConfig, rope: RopeStyle) -> Result<Self> {
        let origin = dir.display();
        let unsupported = |what: String| Error::InvalidArgument(format!("{origin}: {what}"));
        let adapter: AdapterConfig = super::hf_folder::read_json(&dir.join("adapter_config.json"))?
            .ok_or_else(|| unsupported("no adapter_config.json".into()))?;
        if adapter.peft_type != "LORA" {
            return Err(unsupported(format!("peft_type {:?}; only LORA adapters are served", adapter.peft_type)));
        }
        if adapter.fan_in_fan_out || adapter.bias.as_deref().is_some_and(|b| b != "none") {
            return Err(unsupported("fan_in_fan_out and trained biases are not supported".into()));
        }
        if adapter.use_dora || adapter.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(unsupported("DoRA and fully trained modules (modules_to_save) are not supported".into()));
        }
        if !adapter.rank_pattern.is_empty() || !adapter.alpha_pattern.is_empty() {
            return Err(unsupported("per-module rank_pattern or alpha_pattern is not supported".into()));
        }
        if adapter.r == 0 {
            return Err(unsupported("rank r is 0".into()));
        }
        if config.moe.is_some() {
            return Err(unsupported(
                "adapters over a mixture-of-experts generator are trained but not served yet".into(),
            ));
        }
        let scale = if adapter.use_rslora {
            adapter.lora_alpha / (adapter.r as f64).sqrt()
        } else {
            adapter.lora_alpha / adapter.r as f64
        } as f32;
        let path = dir.join("adapter_model.safetensors");
        let file = SafetensorsFile::open(&path)?;
        let names = file.names()?;
        let r = adapter.r;
        let mut found = 0;
        let blocks = (0..config.layers)
            .map(|layer| {
                let mut block = BlockAdapter::default();
                for (group, module, inputs, outputs, heads) in modules(config) {
                    let stem = format!("base_model.model.model.layers.{layer}.{group}.{module}");
                    let (a_name, b_name) = (format!("{stem}.lora_A.weight"), format!("{stem}.lora_B.weight"));
                    if !names.contains(&a_name) && !names.contains(&b_name) {
                        continue;
                    }
                    let (a_shape, a) = file.load(&a_name)?;
                    let (b_shape, mut b) = file.load(&b_name)?;
                    if a_shape != [r, inputs] || b_shape != [outputs, r] {
                        return Err(unsupported(format!(
                            "{stem}: lora_A {a_shape:?} and lora_B {b_shape:?} do not fit rank {r} over {inputs}→{outputs}"
                        )));
                    }
                    if let (Some(heads), RopeStyle::Normal) = (heads, rope) {
                        b = permute_rows_for_gguf(&b, heads, outputs / heads, r);
                    }
                    // Aᵀ: [inputs, r]; scale·Bᵀ: [r, outputs].
                    let down: Vec<f32> = (0..inputs).flat_map(|i| (0..r).map(move |j| (i, j))).map(|(i, j)| a[j * inputs + i]).collect();
                    let up: Vec<f32> =
                        (0..r).flat_map(|j| (0..outputs).map(move |o| (j, o))).map(|(j, o)| scale * b[o * r + j]).collect();
                    let pair = LoraPair { down: device.weight(inputs, r, down)?, up: device.weight(r, outputs, up)? };
                    found += 1;
                    let slot = match module {
                        "q_proj" => &mut block.q,
                        "k_proj" => &mut block.k,
                        "v_proj" => &mut block.v,
                        "o_proj" => &mut block.o,
                        "gate_proj" => &mut block.gate,
                        "up_proj" => &mut block.up,
                        _ => &mut block.down,
                    };
                    *slot = Some(pair);
                }
                Ok(block)
            })
            .collect::<Result<Vec<_>>>()?;
        let known = names.iter().filter(|n| n.contains(".lora_A.") || n.contains(".lora_B.")).count();
        if found == 0 || known != 2 * found {
            return Err(unsupported(format!(
                "{known} LoRA tensors, of which {} fit the base's {} Llama blocks (attention and MLP projections)",
                2 * found,
                config.layers
            )));
        }
        let version = format!(
            "{}@{}",
            dir.file_name().map_or_else(|| "adapter".into(), |s| s.to_string_lossy().into_owned()),
            super::hf_folder::digest_prefix(&path)?
        );
        Ok(LoraAdapter { config: adapter, blocks, version })
    }
}

/// llama.cpp's converter permutes Q and K rows so that adjacent pairs
/// rotate together: within each head, row `2i + j` takes the head's row
/// `j·d/2 + i`. `rows` is `[heads · d, width]`.
fn permute_rows_for_gguf(rows: &[f32], heads: usize, head_dim: usize, width: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = vec![0f32; rows.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let (to, from) = (h * head_dim + 2 * i + j, h * head_dim + j * half + i);
                out[to * width..(to + 1) * width].copy_from_slice(&rows[from * width..(from + 1) * width]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_permutation_pairs_the_halves_of_each_head() {
        // Two heads of 4 rows, each row one value: its index.
        let rows: Vec<f32> = (0..8).map(|i| i as f32).collect();
        // Head 0 rows 0..4 become 0, 2, 1, 3; head 1 likewise.
        assert_eq!(permute_rows_for_gguf(&rows, 2, 4, 1), vec![0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
    }
}
