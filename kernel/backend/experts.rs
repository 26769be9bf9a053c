//! Mixture-of-experts ops: top-k routing from router logits, and the chosen
//! experts' SwiGLU feed-forwards over one stacked weight layout (Mixtral's
//! `block_sparse_moe`, llama.cpp's `llm_build_moe_ffn`). The routing stays
//! a device value: a CUDA backend keeps it in device memory and reads it in
//! the expert kernels, so no layer waits on the host.

use super::{Device, QuantMatrix, Tensor, cpu, cpu_decode};
use crate::error::{Error, Result};

/// `count` SwiGLU experts stacked along the outputs: expert `e` is rows
/// `e·ffn..(e+1)·ffn` of `gate` and `up` (`hidden` inputs each) and rows
/// `e·hidden..(e+1)·hidden` of `down` (`ffn` inputs each): GGUF's
/// `ffn_{gate,up,down}_exps` as stored, `[E, N, K]`.
#[derive(Debug, Clone)]
pub struct StackedExperts {
    count: usize,
    hidden: usize,
    ffn: usize,
    gate: QuantMatrix,
    up: QuantMatrix,
    down: QuantMatrix,
}

impl StackedExperts {
    pub fn new(count: usize, gate: QuantMatrix, up: QuantMatrix, down: QuantMatrix) -> Result<Self> {
        let (hidden, stacked) = gate.dims();
        let fits = count > 0
            && stacked.is_multiple_of(count)
            && up.dims() == (hidden, stacked)
            && down.dims() == (stacked / count, hidden * count);
        if !fits {
            return Err(Error::InvalidArgument(format!(
                "{count} stacked experts do not fit gate {:?}, up {:?} and down {:?} (inputs, outputs)",
                gate.dims(),
                up.dims(),
                down.dims()
            )));
        }
        Ok(StackedExperts { count, hidden, ffn: stacked / count, gate, up, down })
    }

    pub fn count(&self) -> usize {
        self.count
    }

    pub fn dtype(&self) -> super::quant::GgmlType {
        self.gate.dtype()
    }
}

/// Each token's chosen experts and their weights, `used` per token, where
/// the logits were (host memory, or the GPU's).
#[derive(Debug)]
pub struct Routing {
    used: usize,
    storage: RoutingStorage,
}

#[derive(Debug)]
enum RoutingStorage {
    Host { experts: Vec<u32>, weights: Vec<f32> },
    Cuda { experts: cudarc::driver::CudaSlice<u32>, weights: cudarc::driver::CudaSlice<f32>, pairs: usize },
}

impl Routing {
    /// Each token's chosen experts, `used` per token, most probable first
    /// (a host read; for tests and telemetry, never inside a forward pass).
    pub fn experts(&self) -> Result<Vec<u32>> {
        match &self.storage {
            RoutingStorage::Host { experts, .. } => Ok(experts.clone()),
            RoutingStorage::Cuda { experts, .. } => Ok(super::cuda::download(experts)?),
        }
    }

    /// Their routing weights, in the same order (a host read, as `experts`).
    pub fn weights(&self) -> Result<Vec<f32>> {
        match &self.storage {
            RoutingStorage::Host { weights, .. } => Ok(weights.clone()),
            RoutingStorage::Cuda { weights, .. } => Ok(super::cuda::download(weights)?),
        }
    }

    fn pairs(&self) -> usize {
        match &self.storage {
            RoutingStorage::Host { experts, .. } => experts.len(),
            RoutingStorage::Cuda { pairs, .. } => *pairs,
        }
    }

    /// How many tokens each of `count` experts received (a host read, as `experts`).
    pub fn tokens_per_expert(&self, count: usize) -> Result<Vec<usize>> {
        let mut tokens = vec![0; count];
        self.experts()?.iter().for_each(|&e| tokens[e as usize] += 1);
        Ok(tokens)
    }
}

/// Softmax over one token's router logits, the `used` most probable experts
/// (ties to the lower index), their probabilities renormalised to sum to one
/// when `normalize` (Mixtral) or kept as they are (Qwen2-MoE's default).
fn route_token(logits: &[f32], used: usize, normalize: bool, experts: &mut [u32], weights: &mut [f32]) {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let exps: Vec<f32> = logits.iter().map(|&v| (v - max).exp()).collect();
    let total: f32 = exps.iter().sum();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| exps[b].total_cmp(&exps[a]).then(a.cmp(&b)));
    for (slot, &e) in order.iter().take(used).enumerate() {
        experts[slot] = e as u32;
        weights[slot] = exps[e] / total;
    }
    if normalize {
        let chosen: f32 = weights.iter().sum();
        weights.iter_mut().for_each(|w| *w /= chosen);
    }
}

impl Device {
    /// Routes each row of `logits` (`[tokens, experts]`) to its `used` best experts.
    pub fn route_top_k(&self, logits: &Tensor, used: usize, normalize: bool) -> Result<Routing> {
        let (tokens, count) = (logits.rows(), logits.cols());
        if used == 0 || used > count {
            return Err(Error::Internal(format!("route_top_k: {used} of {count} experts")));
        }
        if let Device::Cuda(gpu) = self {
            let (experts, weights) = gpu.moe_route(logits.gpu()?, (tokens, count, used), normalize)?;
            let storage = RoutingStorage::Cuda { experts, weights, pairs: tokens * used };
            return Ok(Routing { used, storage });
        }
        let mut experts = vec![0u32; tokens * used];
        let mut weights = vec![0f32; tokens * used];
        match self {
            Device::Cpu => {
                for ((row, e), w) in logits
                    .cpu()
                    .chunks_exact(count)
                    .zip(experts.chunks_exact_mut(used))
                    .zip(weights.chunks_exact_mut(used))
                {
                    route_token(row, used, normalize, e, w);
                }
            }
            Device::Cuda(_) => unreachable!("routed on the GPU above"),
        }
        Ok(Routing { used, storage: RoutingStorage::Host { experts, weights } })
    }

    /// `Σ weight · down_e(silu(gate_e · x) ⊙ up_e · x)` over each token's
    /// routed experts. Tokens are grouped by expert, so each expert's
    /// weights are read once per step however many tokens chose it, and an
    /// expert no token chose costs nothing.
    pub fn experts_swiglu(&self, x: &Tensor, routing: &Routing, experts: &StackedExperts) -> Result<Tensor> {
        let (tokens, hidden) = (x.rows(), x.cols());
        if hidden != experts.hidden || routing.pairs() != tokens * routing.used {
            return Err(Error::Internal(format!(
                "experts_swiglu: x {:?} does not fit {} routed tokens of width {}",
                x.shape(),
                routing.pairs() / routing.used.max(1),
                experts.hidden
            )));
        }
        match (self, &routing.storage) {
            (Device::Cpu, RoutingStorage::Host { experts: chosen, weights }) => {
                // On the GPU the router kernel only ever names experts below the count.
                if chosen.iter().any(|&e| e as usize >= experts.count) {
                    return Err(Error::Internal(
                        "experts_swiglu: routing names an expert that is not stacked here".into(),
                    ));
                }
                let mut out = vec![0f32; tokens * hidden];
                experts_swiglu_cpu(x.cpu(), (chosen, weights, routing.used), experts, &mut out);
                self.tensor(&[tokens, hidden], out)
            }
            (Device::Cuda(gpu), RoutingStorage::Cuda { experts: chosen, weights, .. }) => {
                let stack = super::cuda::ExpertWeights {
                    dtype: experts.dtype(),
                    count: experts.count,
                    hidden,
                    ffn: experts.ffn,
                    gate: experts.gate.bytes.gpu()?,
                    up: experts.up.bytes.gpu()?,
                    down: experts.down.bytes.gpu()?,
                };
                let out = gpu.experts_swiglu(x.gpu()?, tokens, (chosen, weights, routing.used), &stack)?;
                Ok(self.wrap(&[tokens, hidden], out))
            }
            _ => Err(Error::Internal("experts_swiglu: the routing is on another device than the tokens".into())),
        }
    }
}

fn experts_swiglu_cpu(
    x: &[f32],
    (chosen, weights, used): (&[u32], &[f32], usize),
    experts: &StackedExperts,
    out: &mut [f32],
) {
    let (hidden, ffn) = (experts.hidden, experts.ffn);
    let mut chosen_by: Vec<Vec<(usize, f32)>> = vec![Vec::new(); experts.count];
    for (slot, (&e, &w)) in chosen.iter().zip(weights).enumerate() {
        chosen_by[e as usize].push((slot / used, w));
    }
    for (e, chosen) in chosen_by.iter().enumerate().filter(|(_, c)| !c.is_empty()) {
        let m = chosen.len();
        let rows: Vec<f32> =
            chosen.iter().flat_map(|&(t, _)| x[t * hidden..(t + 1) * hidden].iter().copied()).collect();
        let mut gate = cpu::linear_quantized(&rows, experts.gate.rows(e * ffn..(e + 1) * ffn), m);
        let up = cpu::linear_quantized(&rows, experts.up.rows(e * ffn..(e + 1) * ffn), m);
        cpu_decode::silu_mul(&mut gate, &up);
        let down = cpu::linear_quantized(&gate, experts.down.rows(e * hidden..(e + 1) * hidden), m);
        for (&(t, w), y) in chosen.iter().zip(down.chunks_exact(hidden)) {
            out[t * hidden..(t + 1) * hidden].iter_mut().zip(y).for_each(|(o, v)| *o += w * v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::quant::GgmlType;

    fn f32_matrix(device: &Device, k: usize, n: usize, values: &[f32]) -> QuantMatrix {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        device.quant_matrix(GgmlType::F32, k, n, bytes).unwrap()
    }

    #[test]
    fn routing_takes_the_most_probable_experts_and_renormalises() {
        let device = Device::Cpu;
        let logits = device.tensor(&[2, 4], vec![0.0, 2.0, 1.0, 2.0, 5.0, -1.0, -1.0, 0.0]).unwrap();
        let routing = device.route_top_k(&logits, 2, true).unwrap();
        // A tie between experts 1 and 3 goes to both; order by probability, then index.
        let weights = routing.weights().unwrap();
        assert_eq!(routing.experts().unwrap(), [1, 3, 0, 3]);
        assert!((weights[0] - 0.5).abs() < 1e-6 && (weights[1] - 0.5).abs() < 1e-6);
        let expected = 1.0 / (1.0 + (-5f32).exp());
        assert!((weights[2] - expected).abs() < 1e-6, "{weights:?}");
        assert_eq!(routing.tokens_per_expert(4).unwrap(), [1, 1, 0, 2]);

        let raw = device.route_top_k(&logits, 1, false).unwrap();
        let total: f32 = [0.0f32, 2.0, 1.0, 2.0].iter().map(|v| v.exp()).sum();
        assert!((raw.weights().unwrap()[0] - 2f32.exp() / total).abs() < 1e-6);
        assert!(device.route_top_k(&logits, 5, true).is_err());
    }

    /// Each token against its experts computed one by one in plain f32; an
    /// expert no token chose, and a token routed to two experts.
    #[test]
    fn experts_match_a_per_token_reference_and_skip_unchosen_experts() {
        let device = Device::Cpu;
        let (count, hidden, ffn, tokens) = (3, 4, 2, 3);
        let value = |i: usize| ((i * 37 % 23) as f32 - 11.0) / 10.0;
        let gate: Vec<f32> = (0..count * ffn * hidden).map(value).collect();
        let up: Vec<f32> = (0..count * ffn * hidden).map(|i| value(i + 5)).collect();
        let down: Vec<f32> = (0..count * hidden * ffn).map(|i| value(i + 11)).collect();
        let experts = StackedExperts::new(
            count,
            f32_matrix(&device, hidden, count * ffn, &gate),
            f32_matrix(&device, hidden, count * ffn, &up),
            f32_matrix(&device, ffn, count * hidden, &down),
        )
        .unwrap();
        let x: Vec<f32> = (0..tokens * hidden).map(|i| value(i + 3)).collect();
        // Expert 1 gets no token.
        let logits = vec![3.0, -9.0, 1.0, 0.0, -9.0, 4.0, 2.0, -9.0, 2.0];
        let routing = device.route_top_k(&device.tensor(&[tokens, count], logits).unwrap(), 2, true).unwrap();
        assert_eq!(routing.tokens_per_expert(count).unwrap(), [3, 0, 3]);
        let (chosen, weights) = (routing.experts().unwrap(), routing.weights().unwrap());
        let got = device.experts_swiglu(&device.tensor(&[tokens, hidden], x.clone()).unwrap(), &routing, &experts);
        let got = got.unwrap().to_host().unwrap();

        for t in 0..tokens {
            let row = &x[t * hidden..(t + 1) * hidden];
            let mut expected = vec![0f32; hidden];
            for slot in 0..2 {
                let (e, w) = (chosen[t * 2 + slot] as usize, weights[t * 2 + slot]);
                let dot =
                    |m: &[f32], r: usize, k: usize, v: &[f32]| -> f32 { (0..k).map(|i| m[r * k + i] * v[i]).sum() };
                let act: Vec<f32> = (0..ffn)
                    .map(|j| {
                        let g = dot(&gate, e * ffn + j, hidden, row);
                        g / (1.0 + (-g).exp()) * dot(&up, e * ffn + j, hidden, row)
                    })
                    .collect();
                for (o, out) in expected.iter_mut().enumerate() {
                    *out += w * dot(&down, e * hidden + o, ffn, &act);
                }
            }
            for (a, b) in got[t * hidden..(t + 1) * hidden].iter().zip(&expected) {
                assert!((a - b).abs() < 1e-5, "token {t}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn mismatched_stacks_are_refused() {
        let device = Device::Cpu;
        let m = |k, n| f32_matrix(&device, k, n, &vec![0.0; k * n]);
        assert!(StackedExperts::new(2, m(4, 6), m(4, 6), m(3, 8)).is_ok());
        assert!(StackedExperts::new(4, m(4, 6), m(4, 6), m(3, 8)).is_err());
        assert!(StackedExperts::new(2, m(4, 6), m(4, 4), m(3, 8)).is_err());
    }
}
