//! What the GPU parity tests and the kernels' emulated tests share: the
//! GPU with poisoned buffers, random inputs and valid random ggml weight
//! rows, and the elementwise comparison.

use aitl::backend::{
    Device, Tensor,
    half::{f32_to_bf16, f32_to_f16},
    quant::GgmlType,
};
use rand::{Rng, rngs::StdRng};

/// GPU 0 with every new buffer filled with NaN first, so an element a
/// kernel skips shows; None (said out loud) without a GPU.
pub fn gpu(test: &str) -> Option<Device> {
    // SAFETY: set before any device opens in this process; read once when it does.
    unsafe { std::env::set_var("AITL_CUDA_POISON", "1") };
    super::cuda_device(test)
}

pub fn random(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

pub fn on(device: &Device, shape: &[usize], data: &[f32]) -> Tensor {
    device.tensor(shape, data.to_vec()).unwrap()
}

/// ‖got − want‖∞ ≤ tolerance · max(1, |want|), and nothing unwritten.
pub fn close(what: &str, got: &Tensor, want: &Tensor, tolerance: f32) {
    let (got, want) = (got.to_host().unwrap(), want.to_host().unwrap());
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let mut worst = 0f32;
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(!g.is_nan(), "{what}: element {i} is NaN (unwritten?)");
        let error = (g - w).abs() / w.abs().max(1.0);
        assert!(error <= tolerance, "{what}: element {i}: {g} against {w}");
        worst = worst.max(error);
    }
    println!("{what}: worst relative error {worst:.2e}");
}

/// `rows` random but valid weight rows of `k` values: scales are small
/// finite halves, quants any bits.
pub fn random_weights(rng: &mut StdRng, dtype: GgmlType, k: usize, rows: usize) -> Vec<u8> {
    let mut bytes: Vec<u8> = (0..dtype.row_bytes(k) * rows).map(|_| rng.random()).collect();
    let half = |rng: &mut StdRng, scale: f32| f32_to_f16(rng.random_range(-1.0..1.0f32) * scale).to_le_bytes();
    for block in bytes.chunks_exact_mut(dtype.block_bytes()) {
        match dtype {
            GgmlType::F32 => block.copy_from_slice(&rng.random_range(-1.0..1.0f32).to_le_bytes()),
            GgmlType::F16 => block.copy_from_slice(&half(rng, 1.0)),
            GgmlType::Bf16 => block.copy_from_slice(&f32_to_bf16(rng.random_range(-1.0..1.0f32)).to_le_bytes()),
            GgmlType::Q4_0 | GgmlType::Q8_0 => block[0..2].copy_from_slice(&half(rng, 0.05)),
            GgmlType::Q4_1 | GgmlType::Q4K | GgmlType::Q5K => {
                block[0..2].copy_from_slice(&half(rng, 0.05));
                block[2..4].copy_from_slice(&half(rng, 0.05));
            }
            GgmlType::Q6K => block[208..210].copy_from_slice(&half(rng, 0.01)),
        }
    }
    bytes
}
