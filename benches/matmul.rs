//! The matrix products of a MiniLM forward pass (7,520 tokens: 32 passages
//! of 235), through the backend's `linear`, in GFLOP/s against the
//! machine's fp32 sgemm figure (../shared/peers: ~470 GFLOP/s, AVX-512).
//!
//! `cargo bench --bench matmul`

use aitl::backend::{Activation, Device};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn matmul(c: &mut Criterion) {
    let device = Device::Cpu;
    let m = 7_520;
    let mut group = c.benchmark_group("linear");
    group.sample_size(10);
    for (name, k, n, act) in [
        ("qkv_384x1152", 384, 1152, Activation::None),
        ("out_384x384", 384, 384, Activation::None),
        ("ffn_in_384x1536_gelu", 384, 1536, Activation::Gelu),
        ("ffn_out_1536x384", 1536, 384, Activation::None),
    ] {
        let x = device.tensor(&[m, k], (0..m * k).map(|i| ((i % 97) as f32 - 48.0) * 0.01).collect()).unwrap();
        let w = device.tensor(&[k, n], (0..k * n).map(|i| ((i % 89) as f32 - 44.0) * 0.01).collect()).unwrap();
        let b = device.tensor(&[n], vec![0.1; n]).unwrap();
        group.throughput(Throughput::Elements((2 * m * k * n) as u64));
        group.bench_function(name, |bench| bench.iter(|| device.linear(&x, &w, Some(&b), act).unwrap()));
    }
    group.finish();
}

criterion_group!(benches, matmul);
criterion_main!(benches);
