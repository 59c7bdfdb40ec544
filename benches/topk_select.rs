//! criterion bench of the CPU top-k selection (src/topk_select) at the
//! teacher-cache shape 64 × 128256, k = 128 (f32 with and without the
//! log-sum-exp, bf16), and k = 1024. scripts/bench-topk-torch times
//! torch.topk on the same shape for comparison.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kdfuse::topk_select::{select_cpu, SelectSpec};
use kdfuse::{Dtype, Logits, OwnedData};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

fn bench(c: &mut Criterion) {
    let (n, v) = (64usize, 128_256usize);
    let mut rng = StdRng::seed_from_u64(7);
    let x: Vec<f32> = (0..n * v)
        .map(|_| 3.0 * <StandardNormal as Distribution<f32>>::sample(&StandardNormal, &mut rng))
        .collect();
    let mut group = c.benchmark_group("topk_select");
    group.sample_size(20);
    group.throughput(Throughput::Elements((n * v) as u64));
    for (dtype, k, with_lse) in [
        (Dtype::F32, 128, false),
        (Dtype::F32, 128, true),
        (Dtype::Bf16, 128, true),
        (Dtype::F32, 1024, true),
    ] {
        let d = OwnedData::from_f32(&x, dtype);
        let l = Logits::new(d.view(), n, v);
        let spec = SelectSpec { k, with_lse };
        let id = format!("{dtype}_{n}x{v}_k{k}{}", if with_lse { "_lse" } else { "" });
        group.bench_function(BenchmarkId::from_parameter(id), |b| {
            b.iter(|| select_cpu(&l, &spec).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
