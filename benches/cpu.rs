//! criterion benches of the CPU backends: the fast CPU backend on a small
//! (16 × 4096) and a medium (8 × 32000, 4 × 128256) shape, and the f64
//! oracle on the small one. cli/benches/cuda.rs has the GPU; `kdfuse bench` has
//! the roofline (bytes, GB/s, fraction of the memory bandwidth).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kdfuse::{
    Backend, CpuBackend, Divergence, Dtype, GradDtype, KdInputs, Logits, LossSpec, Oracle,
    OwnedData,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn data(n: usize, v: usize, dtype: Dtype, seed: u64) -> OwnedData {
    let mut rng = StdRng::seed_from_u64(seed);
    let x: Vec<f32> = (0..n * v)
        .map(|_| (rng.random::<f32>() - 0.5) * 6.0)
        .collect();
    OwnedData::from_f32(&x, dtype)
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("fused_loss_grad");
    group.sample_size(10);
    for (n, v) in [(16usize, 4096usize), (8, 32_000), (4, 128_256)] {
        for dtype in [Dtype::F32, Dtype::Bf16] {
            let (s, t) = (data(n, v, dtype, 1), data(n, v, dtype, 2));
            let inputs = KdInputs {
                student: Logits::new(s.view(), n, v),
                teacher: Logits::new(t.view(), n, v),
                labels: None,
                row_weights: None,
            };
            for divergence in [Divergence::ForwardKl, Divergence::Jsd] {
                let spec = LossSpec {
                    divergence,
                    temperature: 2.0,
                    ..Default::default()
                };
                group.throughput(Throughput::Elements((n * v) as u64));
                let id = format!("{divergence}/{dtype}/{n}x{v}");
                group.bench_function(BenchmarkId::new("cpu", &id), |b| {
                    b.iter(|| {
                        CpuBackend
                            .compute(&inputs, &spec, Some(GradDtype::F32))
                            .unwrap()
                    })
                });
                if n * v <= 65_536 && dtype == Dtype::F32 {
                    group.bench_function(BenchmarkId::new("oracle", &id), |b| {
                        b.iter(|| {
                            Oracle
                                .compute(&inputs, &spec, Some(GradDtype::F32))
                                .unwrap()
                        })
                    });
                }
            }
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
