//! criterion benches of the CPU backends (the fast CPU backend and, on a
//! small shape, the oracle), and of the CUDA backend's host-array path when a
//! GPU is present (reported as skipped otherwise). `kdfuse bench` (CUDA
//! events, copy-bandwidth roofline) is the tool for kernel numbers.

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
    let cuda = kdfuse::cuda::CudaBackend::new(0);
    if let Err(e) = &cuda {
        println!("cuda benches skipped: {e}");
    }
    for (n, v) in [(16usize, 4096usize), (8, 32_000)] {
        for dtype in [Dtype::F32, Dtype::Bf16] {
            let (s, t) = (data(n, v, dtype, 1), data(n, v, dtype, 2));
            let inputs = KdInputs {
                student: Logits::new(s.view(), n, v),
                teacher: Logits::new(t.view(), n, v),
                labels: None,
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
                if let Ok(g) = &cuda {
                    group.bench_function(BenchmarkId::new("cuda-host", &id), |b| {
                        b.iter(|| g.compute(&inputs, &spec, Some(GradDtype::F32)).unwrap())
                    });
                }
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
