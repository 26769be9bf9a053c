//! A mixture-of-experts feed-forward (Mixtral's `block_sparse_moe`): a
//! router scores the experts per token, the `used` best run, and their
//! outputs are summed with the router's weights. The router is separate from
//! the experts, which are stacked in one layout whatever the file stored.
//! Qwen-MoE adds an always-on shared expert whose output a sigmoid gate
//! scales.

use super::{checkpoint::DecoderWeights, llama::DenseFeedForward};
use crate::{
    backend::{Device, QuantMatrix, StackedExperts, Tensor},
    error::{Error, Result},
};

#[derive(Debug, Clone, Copy)]
pub struct MoeConfig {
    pub experts: usize,
    /// Experts per token.
    pub used: usize,
    /// Renormalise the chosen experts' probabilities to sum to one (Mixtral).
    pub normalize: bool,
    /// Width of an always-on expert beside the routed ones, scaled by a
    /// sigmoid gate (Qwen-MoE's shared expert).
    pub shared_ffn: Option<usize>,
}

impl MoeConfig {
    pub fn new(experts: usize, used: usize, normalize: bool, origin: &str) -> Result<Self> {
        if experts == 0 || used == 0 || used > experts {
            return Err(Error::InvalidArgument(format!(
                "{origin}: {used} experts per token out of {experts} is not a mixture of experts"
            )));
        }
        Ok(MoeConfig { experts, used, normalize, shared_ffn: None })
    }
}

pub struct MixtureOfExperts {
    config: MoeConfig,
    /// `hidden → experts` logits.
    router: QuantMatrix,
    experts: StackedExperts,
    shared: Option<SharedExpert>,
}

/// An expert every token goes through, its output scaled by
/// `sigmoid(gate · x)`.
struct SharedExpert {
    ffn: DenseFeedForward,
    /// `hidden → 1`.
    gate: QuantMatrix,
}

impl MixtureOfExperts {
    /// Block `layer`'s router and experts (`hidden → ffn → hidden` each).
    pub fn load(
        device: &Device,
        weights: &dyn DecoderWeights,
        layer: usize,
        config: MoeConfig,
        hidden: usize,
        ffn: usize,
    ) -> Result<Self> {
        let name = |part: &str| format!("blk.{layer}.{part}");
        let stacked = |part: &str, k, n| weights.experts(device, &name(part), config.experts, k, n);
        let shared = match config.shared_ffn {
            Some(width) => Some(SharedExpert {
                ffn: DenseFeedForward::load(device, weights, layer, "shexp", hidden, width)?,
                gate: weights.matrix(device, &name("ffn_gate_inp_shexp"), hidden, 1)?,
            }),
            None => None,
        };
        Ok(MixtureOfExperts {
            shared,
            router: weights.matrix(device, &name("ffn_gate_inp"), hidden, config.experts)?,
            experts: StackedExperts::new(
                config.experts,
                stacked("ffn_gate_exps", hidden, ffn)?,
                stacked("ffn_up_exps", hidden, ffn)?,
                stacked("ffn_down_exps", ffn, hidden)?,
            )?,
            config,
        })
    }

    pub fn forward(&self, device: &Device, x: &Tensor) -> Result<Tensor> {
        let logits = device.linear_quantized(x, &self.router)?;
        let routing = device.route_top_k(&logits, self.config.used, self.config.normalize)?;
        let mut out = device.experts_swiglu(x, &routing, &self.experts)?;
        if let Some(shared) = &self.shared {
            let y = shared.ffn.forward(device, x)?;
            let gate = device.linear_quantized(x, &shared.gate)?;
            device.add_gated(&mut out, &y, &gate)?;
        }
        Ok(out)
    }

    pub fn dtype(&self) -> crate::backend::quant::GgmlType {
        self.experts.dtype()
    }
}
