//! Where a decoder's weights come from, named as llama.cpp names them
//! (`token_embd`, `blk.{l}.attn_q`, `blk.{l}.ffn_gate_exps`, …): a GGUF file,
//! or a Hugging Face safetensors checkpoint (one file or an indexed set of
//! shards) whose names are mapped onto those. Matrices keep their stored
//! type: GGUF blocks, or f32/f16/bf16 rows from safetensors.

use std::{collections::HashMap, path::Path};

use safetensors::{Dtype, SafeTensors};

use super::{gguf::GgufFile, weights::SafetensorsFile};
use crate::{
    backend::{Device, QuantMatrix, Tensor, quant::GgmlType},
    error::{Error, Result},
};

pub trait DecoderWeights {
    /// The file or folder, for messages.
    fn origin(&self) -> &str;
    fn has(&self, name: &str) -> bool;
    /// Matrix `name` mapping `k` inputs to `n` outputs.
    fn matrix(&self, device: &Device, name: &str, k: usize, n: usize) -> Result<QuantMatrix>;
    fn vector(&self, device: &Device, name: &str, width: usize) -> Result<Tensor>;
    /// `count` experts' matrices `name` (`blk.{l}.ffn_gate_exps`), each `k → n`,
    /// stacked along the outputs in expert order.
    fn experts(&self, device: &Device, name: &str, count: usize, k: usize, n: usize) -> Result<QuantMatrix>;
}

fn wrong_shape(origin: &str, name: &str, found: &[usize], expected: &[usize]) -> Error {
    Error::InvalidArgument(format!("{origin}: {name} has dims {found:?}, the model's config implies {expected:?}"))
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
        let name = format!("{name}.weight");
        let info = self.info(&name)?;
        if info.dims != [width] {
            return Err(wrong_shape(self.path(), &name, &info.dims, &[width]));
        }
        let mut values = vec![0f32; width];
        crate::backend::quant::dequantize_row(info.dtype, self.bytes(&name)?, &mut values);
        device.tensor(&[width], values)
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

    /// The stored tensor for one of llama.cpp's names.
    fn raw(&self, name: &str) -> Result<(Dtype, Vec<usize>, &[u8], String)> {
        let hf = hf_name(name)
            .ok_or_else(|| Error::Internal(format!("{}: no Hugging Face name for {name}", self.origin)))?;
        let shard = self
            .index
            .get(&hf)
            .ok_or_else(|| Error::InvalidArgument(format!("{}: tensor {hf:?} is missing", self.origin)))?;
        let tensors: SafeTensors<'_> = self.shards[*shard].parse()?;
        let view = tensors.tensor(&hf).map_err(|e| Error::InvalidArgument(format!("{}: {hf}: {e}", self.origin)))?;
        Ok((view.dtype(), view.shape().to_vec(), view.data(), hf))
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
        hf_name(name).is_some_and(|hf| self.index.contains_key(&hf))
    }

    fn matrix(&self, device: &Device, name: &str, k: usize, n: usize) -> Result<QuantMatrix> {
        let (dtype, shape, bytes, hf) = self.raw(name)?;
        // PyTorch's Linear stores [out, in]: n rows of k values, ggml's row layout.
        if shape != [n, k] {
            return Err(wrong_shape(&self.origin, &hf, &shape, &[n, k]));
        }
        device.quant_matrix(ggml_type(&self.origin, &hf, dtype)?, k, n, bytes.to_vec())
    }

    fn vector(&self, device: &Device, name: &str, width: usize) -> Result<Tensor> {
        let (dtype, shape, bytes, hf) = self.raw(name)?;
        if shape != [width] {
            return Err(wrong_shape(&self.origin, &hf, &shape, &[width]));
        }
        let mut values = vec![0f32; width];
        crate::backend::quant::dequantize_row(ggml_type(&self.origin, &hf, dtype)?, bytes, &mut values);
        device.tensor(&[width], values)
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

/// llama.cpp's tensor name → the Hugging Face Llama/Mistral/Mixtral name.
/// Experts are `blk.{l}.ffn_{gate,up,down}_exps.{e}`.
fn hf_name(name: &str) -> Option<String> {
    let whole = match name {
        "token_embd" => Some("model.embed_tokens"),
        "output_norm" => Some("model.norm"),
        "output" => Some("lm_head"),
        _ => None,
    };
    if let Some(whole) = whole {
        return Some(format!("{whole}.weight"));
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, expert) = match part.split_once('.') {
        Some((p, e)) => (p, Some(e.parse::<usize>().ok()?)),
        None => (part, None),
    };
    let local = match (part, expert) {
        ("attn_norm", None) => "input_layernorm".to_owned(),
        ("ffn_norm", None) => "post_attention_layernorm".to_owned(),
        ("attn_q", None) => "self_attn.q_proj".to_owned(),
        ("attn_k", None) => "self_attn.k_proj".to_owned(),
        ("attn_v", None) => "self_attn.v_proj".to_owned(),
        ("attn_output", None) => "self_attn.o_proj".to_owned(),
        ("ffn_gate", None) => "mlp.gate_proj".to_owned(),
        ("ffn_up", None) => "mlp.up_proj".to_owned(),
        ("ffn_down", None) => "mlp.down_proj".to_owned(),
        ("ffn_gate_inp", None) => "block_sparse_moe.gate".to_owned(),
        ("ffn_gate_exps", Some(e)) => format!("block_sparse_moe.experts.{e}.w1"),
        ("ffn_down_exps", Some(e)) => format!("block_sparse_moe.experts.{e}.w2"),
        ("ffn_up_exps", Some(e)) => format!("block_sparse_moe.experts.{e}.w3"),
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{local}.weight"))
}

#[cfg(test)]
mod tests {
    use super::hf_name;

    #[test]
    fn llama_cpp_names_map_to_hugging_face_names() {
        assert_eq!(hf_name("token_embd").as_deref(), Some("model.embed_tokens.weight"));
        assert_eq!(hf_name("blk.3.attn_k").as_deref(), Some("model.layers.3.self_attn.k_proj.weight"));
        assert_eq!(
            hf_name("blk.0.ffn_down_exps.7").as_deref(),
            Some("model.layers.0.block_sparse_moe.experts.7.w2.weight")
        );
        assert_eq!(hf_name("blk.0.ffn_gate_exps"), None, "experts are read one by one");
        assert_eq!(hf_name("blk.x.attn_q"), None);
        assert_eq!(hf_name("rope_freqs"), None);
    }
}
