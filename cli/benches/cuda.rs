//! criterion benches of the CUDA backend on device-resident inputs: the
//! fused kernel and the eager baseline, timed with CUDA events
//! (`iter_custom`). Without a usable GPU every bench is reported as skipped.
//! `kdfuse bench` adds the copy-bandwidth roofline and the byte model.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kdfuse::cuda::CudaBackend;
use kdfuse::{Divergence, Dtype};
use kdfuse_cli::bench::cuda::{DeviceCase, Variant};
use kdfuse_cli::bench::BenchConfig;
use std::time::Duration;

fn bench(c: &mut Criterion) {
    let backend = match CudaBackend::new(0) {
        Ok(b) => b,
        Err(e) => {
            println!("cuda benches: skipped ({e})");
            return;
        }
    };
    let mut group = c.benchmark_group("cuda_fused_loss_grad");
    group.sample_size(20);
    for (rows, cols) in [(4096usize, 32_000usize), (4096, 128_256)] {
        for divergence in [Divergence::ForwardKl, Divergence::Jsd] {
            let config = BenchConfig::new(rows, cols, Dtype::Bf16, divergence);
            let mut case = match DeviceCase::new(&backend, &config, 2, true, 1) {
                Ok(c) => c,
                Err(e) => {
                    println!("{config}: skipped ({e})");
                    continue;
                }
            };
            group.throughput(Throughput::Elements(config.elements() as u64));
            for (name, variant) in [("fused", Variant::Fused), ("eager", Variant::Eager)] {
                group.bench_function(BenchmarkId::new(name, config.to_string()), |b| {
                    b.iter_custom(|iters| {
                        let t = case
                            .time(variant, 0, iters as usize)
                            .expect("the CUDA run succeeds");
                        Duration::from_secs_f64(t.median_ms * 1e-3 * iters as f64)
                    })
                });
            }
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
