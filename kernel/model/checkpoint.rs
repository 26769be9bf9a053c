//! Where a decoder's weights come from, named as llama.cpp names them
//! (`token_embd`, `blk.{l}.attn_q`, `blk.{l}.ffn_gate_exps`, …): a GGUF file,
//! or a Hugging Face safetensors checkpoint (one file or an indexed set of
//! shards) whose names are mapped onto those. Matrices keep their stored
//! type: GGUF blocks, or f32/f16/bf16 rows from safetensors.

use std::{collections::HashMap, path::Path};

use safetensors::{Dtype, SafeTensors};

use super::{gguf::GgufFile, weights::SafetensorsFile};
use crate::{
    backend::{Device, Precision, QuantMatrix, Tensor, quant::GgmlType},
    error::{Error, Result},
};

pub trait DecoderWeights {
    /// The file or folder, for messages.
    fn origin(&self) -> &str;
    fn has(&self, name: &str) -> bool;
    /// Matrix `name` mapping `k` inputs to `n` outputs.
    fn matrix(&self, device: &Device, name: &str, k: usize, n: usize) -> Result<QuantMatrix>;
    fn vector(&self, device: &Device, name: &str, width: usize) -> Result<Tensor>;
    /// The bias of matrix `name`, when the checkpoint has one.
    fn bias(&self, device: &Device, name: &str, width: usize) -> Result<Option<Tensor>>;
    /// `count` experts' matrices `name` (`blk.{l}.ffn_gate_exps`), each `k → n`,
    /// stacked along the outputs in expert order.
    fn experts(&self, device: &Device, name: &str, count: usize, k: usize, n: usize) -> Result<QuantMatrix>;
}

/// Another checkpoint's weights, with prompts' products in `prefill`.
pub(super) struct WithPrefill<'a> {
    pub weights: &'a dyn DecoderWeights,
    pub prefill: Precision,
}

impl DecoderWeights for WithPrefill<'_> {
    fn origin(&self) -> &str {
        self.weights.origin()
    }

    fn has(&self, name: &str) -> bool {
        self.weights.has(name)
    }

    fn matrix(&self, device: &Device, name: &str, k: usize, n: usize) -> Result<QuantMatrix> {
        Ok(self.weights.matrix(device, name, k, n)?.with_prefill(self.prefill))
    }

    fn vector(&self, device: &Device, name: &str, width: usize) -> Result<Tensor> {
        self.weights.vector(device, name, width)
    }

    fn bias(&self, device: &Device, name: &str, width: usize) -> Result<Option<Tensor>> {
        self.weights.bias(device, name, width)
    }

    fn experts(&self, device: &Device, name: &str, count: usize, k: usize, n: usize) -> Result<QuantMatrix> {
        Ok(self.weights.experts(device, name, count, k, n)?.with_prefill(self.prefill))
    }
}

fn wrong_shape(origin: &str, name: &str, found: &[usize], expected: &[usize]) -> Error {
    Error::InvalidArgument(format!("{origin}: {name} has dims {found:?}, the model's config implies {expected:?}"))
}

impl GgufFile {
    fn tensor_1d(&self, device: &Device, name: &str, width: usize) -> Result<Tensor> {
        let info = self.info(name)?;
        if info.dims != [width] {
            return Err(wrong_shape(self.path(), name, &info.dims, &[width]));
        }
        let mut values = vec![0f32; width];
        crate::backend::quant::dequantize_row(info.dtype, self.bytes(name)?, &mut values);
        device.tensor(&[width], values)
    }
}

impl DecoderWeights for GgufFile {
    fn origin(&self) -> &str {
        self.path()
    }

    fn has(&self, name: &str) -> bool {
        self.info(&format!("{name}.weight")).is_ok()
    }

    fn matrix(&self, device: &Device, name: &str, k: usize, n: usize) -> Result<QuantMatrix> {
        let name = format!("{name}.weight");
        let info = self.info(&name)?;
        if info.dims != [k, n] {
            return Err(wrong_shape(self.path(), &name, &info.dims, &[k, n]));
        }
        device.quant_matrix(info.dtype, k, n, self.bytes(&name)?.to_vec())
    }

    fn vector(&self, device: &Device, name: &str, width: usize) -> Result<Tensor> {
        self.tensor_1d(device, &format!("{name}.weight"), width)
    }

    fn bias(&self, device: &Device, name: &str, width: usize) -> Result<Option<Tensor>> {
        let name = format!("{name}.bias");
        if self.info(&name).is_err() {
            return Ok(None);
        }
        self.tensor_1d(device, &name, width).map(Some)
    }

    fn experts(&self, device: &Device, name: &str, count: usize, k: usize, n: usize) -> Result<QuantMatrix> {
        let stacked = format!("{name}.weight");
        if let Ok(info) = self.info(&stacked) {
            if info.dims != [k, n, count] {
                return Err(wrong_shape(self.path(), &stacked, &info.dims, &[k, n, count]));
            }
            return device.quant_matrix(info.dtype, k, n * count, self.bytes(&stacked)?.to_vec());
        }
        // Older files: one tensor per expert, `blk.{l}.ffn_gate.{e}.weight`.
        let single = name.strip_suffix("_exps").unwrap_or(name);
        let parts = (0..count).map(|e| self.matrix(device, &format!("{single}.{e}"), k, n)).collect::<Result<_>>()?;
        QuantMatrix::concat_outputs(parts)
    }
}

/// A Hugging Face checkpoint folder: `model.safetensors`, or the shards that
/// `model.safetensors.index.json` lists.
pub struct HfCheckpoint {
    origin: String,
    shards: Vec<SafetensorsFile>,
    /// Tensor name → shard.
    index: HashMap<String, usize>,
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

impl HfCheckpoint {
    pub fn open(dir: &Path) -> Result<Self> {
        let origin = dir.display().to_string();
        let mut files: Vec<String> =
            match super::hf_folder::read_json::<ShardIndex>(&dir.join("model.safetensors.index.json"))? {
                Some(index) => index.weight_map.into_values().collect(),
                None => vec!["model.safetensors".into()],
            };
        files.sort();
        files.dedup();
        let shards = files.iter().map(|f| SafetensorsFile::open(&dir.join(f))).collect::<Result<Vec<_>>>()?;
        let mut index = HashMap::new();
        for (i, shard) in shards.iter().enumerate() {
            for name in shard.names()? {
                index.insert(name, i);
            }
        }
        Ok(HfCheckpoint { origin, shards, index })
    }

    /// The checkpoint's name for one of llama.cpp's (`suffix` "weight" or
    /// "bias"), when it has that tensor.
    fn find(&self, name: &str, suffix: &str) -> Option<String> {
        hf_names(name).into_iter().map(|base| format!("{base}.{suffix}")).find(|hf| self.index.contains_key(hf))
    }

    /// The stored tensor for one of llama.cpp's names.
    fn raw(&self, name: &str, suffix: &str) -> Result<(Dtype, Vec<usize>, &[u8], String)> {
        let hf = self.find(name, suffix).ok_or_else(|| {
            let expected: Vec<String> = hf_names(name).iter().map(|b| format!("{b}.{suffix}")).collect();
            Error::InvalidArgument(format!("{}: tensor {} is missing", self.origin, expected.join(" or ")))
        })?;
        let shard = &self.index[&hf];
        let tensors: SafeTensors<'_> = self.shards[*shard].parse()?;
        let view = tensors.tensor(&hf).map_err(|e| Error::InvalidArgument(format!("{}: {hf}: {e}", self.origin)))?;
        Ok((view.dtype(), view.shape().to_vec(), view.data(), hf))
    }
}

impl HfCheckpoint {
    fn tensor_1d(&self, device: &Device, name: &str, suffix: &str, width: usize) -> Result<Tensor> {
        let (dtype, shape, bytes, hf) = self.raw(name, suffix)?;
        if shape != [width] {
            return Err(wrong_shape(&self.origin, &hf, &shape, &[width]));
        }
        let mut values = vec![0f32; width];
        crate::backend::quant::dequantize_row(ggml_type(&self.origin, &hf, dtype)?, bytes, &mut values);
        device.tensor(&[width], values)
    }
}

fn ggml_type(origin: &str, name: &str, dtype: Dtype) -> Result<GgmlType> {
    match dtype {
        Dtype::F32 => Ok(GgmlType::F32),
        Dtype::F16 => Ok(GgmlType::F16),
        Dtype::BF16 => Ok(GgmlType::Bf16),
        other => Err(Error::InvalidArgument(format!(
            "{origin}: {name} is {other:?}; decoder checkpoints are read in f32, f16 or bf16"
        ))),
    }
}

impl DecoderWeights for HfCheckpoint {
    fn origin(&self) -> &str {
        &self.origin
    }

    fn has(&self, name: &str) -> bool {
        self.find(name, "weight").is_some()
    }

    fn matrix(&self, device: &Device, name: &str, k: usize, n: usize) -> Result<QuantMatrix> {
        let (dtype, shape, bytes, hf) = self.raw(name, "weight")?;
        // PyTorch's Linear stores [out, in]: n rows of k values, ggml's row layout.
        if shape != [n, k] {
            return Err(wrong_shape(&self.origin, &hf, &shape, &[n, k]));
        }
        device.quant_matrix(ggml_type(&self.origin, &hf, dtype)?, k, n, bytes.to_vec())
    }

    fn vector(&self, device: &Device, name: &str, width: usize) -> Result<Tensor> {
        self.tensor_1d(device, name, "weight", width)
    }

    fn bias(&self, device: &Device, name: &str, width: usize) -> Result<Option<Tensor>> {
        match self.find(name, "bias") {
            Some(_) => self.tensor_1d(device, name, "bias", width).map(Some),
            None => Ok(None),
        }
    }

    fn experts(&self, device: &Device, name: &str, count: usize, k: usize, n: usize) -> Result<QuantMatrix> {
        let parts =
            (0..count).map(|e| self.matrix(device, &format!("{name}.{e}"), k, n)).collect::<Result<Vec<_>>>()?;
        if parts.windows(2).any(|p| p[0].dtype() != p[1].dtype()) {
            return Err(Error::InvalidArgument(format!("{}: the experts of {name} differ in dtype", self.origin)));
        }
        QuantMatrix::concat_outputs(parts)
    }
}

/// llama.cpp's tensor name → the Hugging Face names it may have (without
/// `.weight`/`.bias`): Llama, Mistral and Mixtral (`block_sparse_moe`), or
/// Qwen2-MoE (`mlp.experts`, the shared expert and its gate). Experts are
/// `blk.{l}.ffn_{gate,up,down}_exps.{e}`.
fn hf_names(name: &str) -> Vec<String> {
    let whole = match name {
        "token_embd" => Some("model.embed_tokens"),
        "output_norm" => Some("model.norm"),
        "output" => Some("lm_head"),
        _ => None,
    };
    if let Some(whole) = whole {
        return vec![whole.to_owned()];
    }
    let Some((layer, part)) = name.strip_prefix("blk.").and_then(|rest| rest.split_once('.')) else {
        return Vec::new();
    };
    let Ok(layer) = layer.parse::<usize>() else { return Vec::new() };
    let (part, expert) = match part.split_once('.') {
        Some((p, e)) => match e.parse::<usize>() {
            Ok(e) => (p, Some(e)),
            Err(_) => return Vec::new(),
        },
        None => (part, None),
    };
    let locals: Vec<String> = match (part, expert) {
        ("attn_norm", None) => vec!["input_layernorm".into()],
        ("ffn_norm", None) => vec!["post_attention_layernorm".into()],
        ("attn_q", None) => vec!["self_attn.q_proj".into()],
        ("attn_k", None) => vec!["self_attn.k_proj".into()],
        ("attn_v", None) => vec!["self_attn.v_proj".into()],
        ("attn_output", None) => vec!["self_attn.o_proj".into()],
        ("ffn_gate", None) => vec!["mlp.gate_proj".into()],
        ("ffn_up", None) => vec!["mlp.up_proj".into()],
        ("ffn_down", None) => vec!["mlp.down_proj".into()],
        ("ffn_gate_inp", None) => vec!["block_sparse_moe.gate".into(), "mlp.gate".into()],
        ("ffn_gate_exps", Some(e)) => {
            vec![format!("block_sparse_moe.experts.{e}.w1"), format!("mlp.experts.{e}.gate_proj")]
        }
        ("ffn_down_exps", Some(e)) => {
            vec![format!("block_sparse_moe.experts.{e}.w2"), format!("mlp.experts.{e}.down_proj")]
        }
        ("ffn_up_exps", Some(e)) => {
            vec![format!("block_sparse_moe.experts.{e}.w3"), format!("mlp.experts.{e}.up_proj")]
        }
        ("ffn_gate_shexp", None) => vec!["mlp.shared_expert.gate_proj".into()],
        ("ffn_up_shexp", None) => vec!["mlp.shared_expert.up_proj".into()],
        ("ffn_down_shexp", None) => vec!["mlp.shared_expert.down_proj".into()],
        ("ffn_gate_inp_shexp", None) => vec!["mlp.shared_expert_gate".into()],
        _ => return Vec::new(),
    };
    locals.into_iter().map(|local| format!("model.layers.{layer}.{local}")).collect()
}

#[cfg(test)]
mod tests {
    use super::hf_names;

    #[test]
    fn llama_cpp_names_map_to_hugging_face_names() {
        assert_eq!(hf_names("token_embd"), ["model.embed_tokens"]);
        assert_eq!(hf_names("blk.3.attn_k"), ["model.layers.3.self_attn.k_proj"]);
        assert_eq!(
            hf_names("blk.0.ffn_down_exps.7"),
            ["model.layers.0.block_sparse_moe.experts.7.w2", "model.layers.0.mlp.experts.7.down_proj"]
        );
        assert_eq!(hf_names("blk.1.ffn_gate_inp_shexp"), ["model.layers.1.mlp.shared_expert_gate"]);
        assert!(hf_names("blk.0.ffn_gate_exps").is_empty(), "experts are read one by one");
        assert!(hf_names("blk.x.attn_q").is_empty());
        assert!(hf_names("rope_freqs").is_empty());
    }
}
