//! A mixture-of-experts feed-forward (Mixtral's `block_sparse_moe`): a
//! router scores the experts per token, the `used` best run, and their
//! outputs are summed with the router's weights. The router is separate from
//! the experts, which are stacked in one layout whatever the file stored.

use super::checkpoint::DecoderWeights;
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
}

impl MoeConfig {
    pub fn new(experts: usize, used: usize, normalize: bool, origin: &str) -> Result<Self> {
        if experts == 0 || used == 0 || used > experts {
            return Err(Error::InvalidArgument(format!(
                "{origin}: {used} experts per token out of {experts} is not a mixture of experts"
            )));
        }
        Ok(MoeConfig { experts, used, normalize })
    }
}

pub struct MixtureOfExperts {
    config: MoeConfig,
    /// `hidden → experts` logits.
    router: QuantMatrix,
    experts: StackedExperts,
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
        Ok(MixtureOfExperts {
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
        device.experts_swiglu(x, &routing, &self.experts)
    }

    pub fn dtype(&self) -> crate::backend::quant::GgmlType {
        self.experts.dtype()
    }
}
