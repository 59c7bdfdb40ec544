//! GPU tests of the vocab-parallel kernels (kernels/vocab_parallel/vp.cu),
//! run by tests/gpu.rs's runner: the CPU tests' sweep over random uneven
//! shards on the device path (`CudaBackend::vp_*`, outputs poisoned before
//! the launches) against the unsharded oracle at the exact tolerances; the
//! device's records against the host's; a CPU rank and a GPU rank mixed in
//! one step; and the raw API on a caller stream.

use kdfuse::check::{generate, random_config};
use kdfuse::cuda::CudaBackend;
use kdfuse::vocab_parallel::check::{
    dense_shards, random_cuts, records_close, sweep, topk_shards, ShardedBackend,
};
use kdfuse::vocab_parallel::cuda::{RawVpOutputs, RawVpShard};
use kdfuse::vocab_parallel::{
    collectives, finish, round_stats, run_in_process, Gathered, ShardInputs, ShardTeacher,
    VocabShard, STATS_WIDTH,
};
use kdfuse::{Divergence, Dtype, GradDtype, HostData, Logits, LossSpec, Precision};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub fn vp_sweep_against_oracle(b: &CudaBackend) {
    for seed in [11u64, 12, 13] {
        let backend = ShardedBackend::new(
            seed,
            Some(Precision::Exact),
            Box::new(|shards, spec, grad| b.vp_run_in_process(shards, spec, grad)),
        );
        let s = sweep(&backend, seed, 300, 40_000).unwrap();
        println!(
            "seed {seed}: worlds {:?}, {} padded, features {:?}",
            &s.worlds[1..],
            s.padded,
            s.features
        );
        assert!(
            s.failures.is_empty(),
            "{} failures:\n{}",
            s.failures.len(),
            s.failures.join("\n")
        );
    }
}

pub fn vp_records_equal_the_host_records(b: &CudaBackend) {
    let mut rng = StdRng::seed_from_u64(21);
    for case in 0..200 {
        let mut config = random_config(&mut rng, 20_000);
        config.rows = config.rows.max(1);
        let data = generate(&config);
        let spec = &config.spec;
        let dense = data.inputs();
        let topk = data.topk_inputs();
        let v = config.cols;
        let (cuts, _) = random_cuts(&mut rng, v, config.student_pad.min(config.teacher_pad));
        let shards = match &topk {
            Some(t) => topk_shards(t, &cuts),
            None => dense_shards(&dense, &cuts),
        };
        let mut host1 = Vec::new();
        for s in &shards {
            let h = round_stats(s, spec, 1, None).unwrap();
            let d = b.vp_round_stats(s, spec, 1, None).unwrap();
            records_close(&d, &h)
                .unwrap_or_else(|e| panic!("case {case} ({}): round 1: {e}", config.describe()));
            host1.extend(h);
        }
        if collectives(spec) == 2 {
            let g1 = Gathered {
                stats: &host1,
                world: shards.len(),
            };
            for s in &shards {
                let h = round_stats(s, spec, 2, Some(&g1)).unwrap();
                let d = b.vp_round_stats(s, spec, 2, Some(&g1)).unwrap();
                records_close(&d, &h).unwrap_or_else(|e| {
                    panic!("case {case} ({}): round 2: {e}", config.describe())
                });
            }
        }
    }
}

fn logits(rng: &mut StdRng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-4.0..4.0f32)).collect()
}

/// Rank 0 on the host, rank 1 on the GPU: one step of JSD (two rounds)
/// with the records of both gathered together; the losses agree with the
/// all-host protocol and each rank's gradient with its host counterpart.
pub fn vp_cpu_and_gpu_ranks_mix(b: &CudaBackend) {
    let (n, v) = (5, 3001);
    let mut rng = StdRng::seed_from_u64(4);
    let s = logits(&mut rng, n * v);
    let t = logits(&mut rng, n * v);
    let spec = LossSpec {
        divergence: Divergence::Jsd,
        beta: 0.3,
        temperature: 2.0,
        ..LossSpec::default()
    };
    let cut = |start: usize, cols: usize| ShardInputs {
        student: Logits::strided(HostData::F32(&s).offset(start), n, cols, v),
        teacher: ShardTeacher::Dense(Logits::strided(HostData::F32(&t).offset(start), n, cols, v)),
        labels: None,
        row_weights: None,
        shard: VocabShard {
            vocab_start: start,
            vocab_size: v,
        },
    };
    let shards = [cut(0, 1400), cut(1400, v - 1400)];
    let host = run_in_process(&shards, &spec, Some(GradDtype::F32)).unwrap();
    let mut g1 = round_stats(&shards[0], &spec, 1, None).unwrap();
    g1.extend(b.vp_round_stats(&shards[1], &spec, 1, None).unwrap());
    let r1 = Gathered {
        stats: &g1,
        world: 2,
    };
    let mut g2 = round_stats(&shards[0], &spec, 2, Some(&r1)).unwrap();
    g2.extend(b.vp_round_stats(&shards[1], &spec, 2, Some(&r1)).unwrap());
    let r2 = Gathered {
        stats: &g2,
        world: 2,
    };
    let cpu = finish(&shards[0], &spec, &r1, Some(&r2), Some(GradDtype::F32)).unwrap();
    let gpu = b
        .vp_finish(&shards[1], &spec, &r1, Some(&r2), Some(GradDtype::F32))
        .unwrap();
    // The same gathered records: the same merge on both ranks.
    assert!((cpu.loss - gpu.loss).abs() <= 1e-12 * cpu.loss.abs());
    assert!((cpu.loss - host[0].loss).abs() <= 1e-6 * host[0].loss.abs());
    for (o, h) in [(&cpu, &host[0]), (&gpu, &host[1])] {
        let (g, r) = (o.grad.as_ref().unwrap(), h.grad.as_ref().unwrap());
        let err: f64 = g.iter().zip(r).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
        let norm: f64 = r.iter().map(|b| (*b as f64).powi(2)).sum();
        assert!(
            (err / norm).sqrt() < 1e-5,
            "gradient off by {}",
            (err / norm).sqrt()
        );
    }
}

/// The raw API on device buffers and a caller stream: both rounds and the
/// finish of a one-rank TVD step enqueued back to back, then compared with
/// the host protocol; a wrong round is refused with the host's error.
pub fn vp_raw_api_on_caller_stream(b: &CudaBackend) {
    let (n, v) = (7, 5000);
    let mut rng = StdRng::seed_from_u64(5);
    let s = logits(&mut rng, n * v);
    let t = logits(&mut rng, n * v);
    let spec = LossSpec {
        divergence: Divergence::Tvd,
        alpha: 0.25,
        ..LossSpec::default()
    };
    let labels: Vec<i64> = (0..n as i64).map(|i| i * 311).collect();
    let stream = b.context().new_stream().unwrap();
    let ds = stream.clone_htod(&s).unwrap();
    let dt = stream.clone_htod(&t).unwrap();
    let dl = stream.clone_htod(&labels).unwrap();
    let r1 = stream.alloc_zeros::<f64>(n * STATS_WIDTH).unwrap();
    let r2 = stream.alloc_zeros::<f64>(n * STATS_WIDTH).unwrap();
    let grad = stream.alloc_zeros::<f32>(n * v).unwrap();
    let rows = stream.alloc_zeros::<f64>(n).unwrap();
    let loss = stream.alloc_zeros::<f64>(1).unwrap();
    let valid = stream.alloc_zeros::<i32>(1).unwrap();
    use cudarc::driver::DevicePtr;
    let raw = RawVpShard {
        dtype: Dtype::F32,
        student: ds.device_ptr(&stream).0,
        rows: n,
        cols: v,
        student_stride: v,
        teacher: dt.device_ptr(&stream).0,
        teacher_stride: v,
        topk_indices: 0,
        indices_i64: false,
        topk_values: 0,
        k: 0,
        labels: dl.device_ptr(&stream).0,
        row_weights: 0,
        shard: VocabShard {
            vocab_start: 0,
            vocab_size: v,
        },
    };
    let out = RawVpOutputs {
        grad: grad.device_ptr(&stream).0,
        grad_dtype: Dtype::F32,
        grad_stride: v,
        grad_teacher: 0,
        grad_teacher_stride: v,
        row_losses: rows.device_ptr(&stream).0,
        loss: loss.device_ptr(&stream).0,
        valid_rows: valid.device_ptr(&stream).0,
    };
    // SAFETY: every buffer above holds what the shapes need.
    unsafe {
        let e = b
            .vp_round_stats_raw(&stream, &raw, &spec, 2, 0, 1, r2.device_ptr(&stream).0)
            .unwrap_err();
        assert!(e.to_string().contains("round 2 needs"), "{e}");
        b.vp_round_stats_raw(&stream, &raw, &spec, 1, 0, 0, r1.device_ptr(&stream).0)
            .unwrap();
        b.vp_round_stats_raw(
            &stream,
            &raw,
            &spec,
            2,
            r1.device_ptr(&stream).0,
            1,
            r2.device_ptr(&stream).0,
        )
        .unwrap();
        b.vp_finish_raw(
            &stream,
            &raw,
            &spec,
            r1.device_ptr(&stream).0,
            r2.device_ptr(&stream).0,
            1,
            &out,
        )
        .unwrap();
    }
    let got_loss = stream.clone_dtoh(&loss).unwrap()[0];
    let got_grad = stream.clone_dtoh(&grad).unwrap();
    let shard = ShardInputs {
        student: Logits::new(HostData::F32(&s), n, v),
        teacher: ShardTeacher::Dense(Logits::new(HostData::F32(&t), n, v)),
        labels: Some(&labels),
        row_weights: None,
        shard: VocabShard {
            vocab_start: 0,
            vocab_size: v,
        },
    };
    let host = run_in_process(&[shard], &spec, Some(GradDtype::F32))
        .unwrap()
        .remove(0);
    assert!(
        (got_loss - host.loss).abs() <= 1e-6 * host.loss.abs(),
        "loss {got_loss} vs {}",
        host.loss
    );
    let r = host.grad.unwrap();
    let err: f64 = got_grad
        .iter()
        .zip(&r)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let norm: f64 = r.iter().map(|b| (*b as f64).powi(2)).sum();
    assert!((err / norm).sqrt() < 1e-5);
}
