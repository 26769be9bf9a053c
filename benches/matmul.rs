//! The matrix products of a MiniLM forward pass through the backend's
//! `linear`, in GFLOP/s against the machine's fp32 sgemm figure
//! (../shared/peers: ~470 GFLOP/s, AVX-512): the `gemm` crate (packs the
//! weight on every call) against `Device::weight` (packed at load; `linear`
//! uses our AVX-512 kernel on it up to 64 rows, the gemm crate above), at
//! 7,520 rows (32 passages of 235 tokens) and 14 rows (one short question).
//!
//! `cargo bench --bench matmul`

use aitl::backend::{Activation, Device};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn matmul(c: &mut Criterion) {
    let device = Device::Cpu;
    let mut group = c.benchmark_group("linear");
    group.sample_size(10);
    for m in [7_520, 14] {
        for (name, k, n, act) in [
            ("qkv_384x1152", 384, 1152, Activation::None),
            ("out_384x384", 384, 384, Activation::None),
            ("ffn_in_384x1536_gelu", 384, 1536, Activation::Gelu),
            ("ffn_out_1536x384", 1536, 384, Activation::None),
        ] {
            let x = device.tensor(&[m, k], (0..m * k).map(|i| ((i % 97) as f32 - 48.0) * 0.01).collect()).unwrap();
            let values: Vec<f32> = (0..k * n).map(|i| ((i % 89) as f32 - 44.0) * 0.01).collect();
            let plain = device.tensor(&[k, n], values.clone()).unwrap();
            let packed = device.weight(k, n, values).unwrap();
            let b = device.tensor(&[n], vec![0.1; n]).unwrap();
            group.throughput(Throughput::Elements((2 * m * k * n) as u64));
            group.bench_function(format!("gemm_crate/m{m}/{name}"), |bench| {
                bench.iter(|| device.linear(&x, &plain, Some(&b), act).unwrap())
            });
            group.bench_function(format!("device_weight/m{m}/{name}"), |bench| {
                bench.iter(|| device.linear(&x, &packed, Some(&b), act).unwrap())
            });
        }
    }
    group.finish();
}

criterion_group!(benches, matmul);
criterion_main!(benches);
