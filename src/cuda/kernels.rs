//! Typed kernel handles: every kernel of the embedded fatbin is a [`Kernel`]
//! value (what selects it: divergence × variant × dtypes, index width, …),
//! resolved by name once per context into its slot of the context's
//! [`KernelTable`]. A launch indexes the table; no name is built and no map
//! is searched per call.

use crate::error::{KdError, Result};
use crate::spec::LossSpec;
use crate::tensor::Dtype;
use cudarc::driver::{CudaFunction, CudaModule};
use std::sync::{Arc, OnceLock};

/// An (input, gradient) dtype pair the typed kernel families are compiled
/// for: the input's own dtype or f32 for the gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Io(u8);

const IO_NAMES: [(&str, &str); 5] = [
    ("f32", "f32"),
    ("bf16", "bf16"),
    ("bf16", "f32"),
    ("f16", "f16"),
    ("f16", "f32"),
];

impl Io {
    /// The pair, or `None` when `grad` is neither `input` nor f32.
    pub(crate) fn new(input: Dtype, grad: Dtype) -> Option<Io> {
        let i = match (input, grad) {
            (Dtype::F32, Dtype::F32) => 0,
            (Dtype::Bf16, Dtype::Bf16) => 1,
            (Dtype::Bf16, Dtype::F32) => 2,
            (Dtype::F16, Dtype::F16) => 3,
            (Dtype::F16, Dtype::F32) => 4,
            _ => return None,
        };
        Some(Io(i))
    }

    fn suffix(self) -> String {
        let (i, o) = IO_NAMES[self.0 as usize];
        format!("{i}_{o}")
    }
}

/// The kernels/eager.cu kernels compiled once per dtype (`kd_eager_<op>_<dtype>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EagerTyped {
    LogSoftmax,
    LsmBack,
    CeBack,
}

/// The kernels/eager.cu kernels on f32 intermediates (`kd_eager_<op>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EagerOp {
    FklTerms,
    RklTerms,
    LogMix,
    JsdTerms,
    SceTerms,
    TvdTerms,
    RowLoss,
    FklBack,
    RklBack,
    JsdBack,
    TvdBack,
}

const EAGER_OPS: [&str; 11] = [
    "fkl_terms",
    "rkl_terms",
    "log_mix",
    "jsd_terms",
    "sce_terms",
    "tvd_terms",
    "row_loss",
    "fkl_back",
    "rkl_back",
    "jsd_back",
    "tvd_back",
];

/// The kernels/mlp.cu kernels (`mlp_<op>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MlpOp {
    BiasAct,
    ReluBack,
    BiasGrad,
    Sgd,
    Adam,
}

const MLP_OPS: [&str; 5] = ["bias_act", "relu_back", "bias_grad", "sgd", "adam"];

/// One kernel of the fatbin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// `kd_fused_<div>[_fast|_fastce]_<in>_<out>`; `div` is
    /// `KernelDivergence::id`, `variant` `LossSpec::kernel_variant`.
    Fused { div: u8, variant: u8, io: Io },
    /// `kd_single_<div>[_fast|_fastce]_<in>_<out>`: the single-read
    /// kernel of the same loss (sm_90 and later only; one cluster per row).
    Single { div: u8, variant: u8, io: Io },
    /// `kd_topk_<in>_<out>_<i32|i64>`.
    Topk { io: Io, indices_i64: bool },
    /// `kd_single_topk_<in>_<out>_<i32|i64>`: the single-read top-k kernel
    /// (sm_90 and later only; one cluster per row).
    SingleTopk { io: Io, indices_i64: bool },
    /// `kd_topk_validate_<i32|i64>`.
    TopkValidate { indices_i64: bool },
    /// `kd_count_valid`.
    CountValid,
    /// `kd_reduce_loss`.
    ReduceLoss,
    /// `kd_feat_<mse|cos|at>_<in>_<out>`; `kind` is the feature family's
    /// kernel id (`FeatureKind::id`: its index in [`FEATURE_KINDS`]).
    Feature { kind: u8, io: Io },
    /// `kd_eager_<op>_<dtype>`.
    EagerTyped(EagerTyped, Dtype),
    /// `kd_eager_<op>`.
    Eager(EagerOp),
    /// `mlp_<op>`.
    Mlp(MlpOp),
    /// `kd_vp_round1_<in>` and `kd_vp_round2_<in>` (kernels/vocab_parallel/vp.cu).
    VpStats { round2: bool, dtype: Dtype },
    /// `kd_vp_finish_<in>_<out>`.
    VpFinish { io: Io },
    /// `kd_vp_reduce_loss`.
    VpReduceLoss,
    /// `kd_select_<in>` (kernels/topk_select/select.cu).
    Select { dtype: Dtype },
}

// First slot of each family in the table.
const DIVERGENCES: usize = 5;
const VARIANTS: usize = 3;
const TOPK: usize = DIVERGENCES * VARIANTS * IO_NAMES.len();
const TOPK_VALIDATE: usize = TOPK + 2 * IO_NAMES.len();
const COUNT_VALID: usize = TOPK_VALIDATE + 2;
const REDUCE_LOSS: usize = COUNT_VALID + 1;
const FEATURE: usize = REDUCE_LOSS + 1;
const EAGER_TYPED: usize = FEATURE + FEATURE_KINDS.len() * IO_NAMES.len();
const EAGER: usize = EAGER_TYPED + 3 * 3;
const MLP: usize = EAGER + EAGER_OPS.len();
const VP_STATS: usize = MLP + MLP_OPS.len();
const VP_FINISH: usize = VP_STATS + 2 * 3;
const VP_REDUCE: usize = VP_FINISH + IO_NAMES.len();
const SELECT: usize = VP_REDUCE + 1;
const SINGLE: usize = SELECT + 3;
const SINGLE_TOPK: usize = SINGLE + DIVERGENCES * VARIANTS * IO_NAMES.len();
const SLOTS: usize = SINGLE_TOPK + 2 * IO_NAMES.len();

fn dtype_index(d: Dtype) -> usize {
    match d {
        Dtype::F32 => 0,
        Dtype::Bf16 => 1,
        Dtype::F16 => 2,
    }
}

/// The feature kernels' names, by `FeatureKind::id` (kernels/feature/
/// feature_math.cuh: KD_FEAT_MSE, KD_FEAT_COS, KD_FEAT_AT).
pub(crate) const FEATURE_KINDS: [&str; 3] = ["mse", "cos", "at"];

impl Kernel {
    /// The dense kernel of a (validated) spec for the dtype pair `io`.
    pub(crate) fn fused(spec: &LossSpec, io: Io) -> Kernel {
        Kernel::Fused {
            div: spec.kernel_divergence().id() as u8,
            variant: spec.kernel_variant() as u8,
            io,
        }
    }

    /// The single-read kernel of a (validated) spec for the dtype pair `io`.
    pub(crate) fn single(spec: &LossSpec, io: Io) -> Kernel {
        Kernel::Single {
            div: spec.kernel_divergence().id() as u8,
            variant: spec.kernel_variant() as u8,
            io,
        }
    }

    fn slot(self) -> usize {
        match self {
            Kernel::Fused { div, variant, io } => {
                (div as usize * VARIANTS + variant as usize) * IO_NAMES.len() + io.0 as usize
            }
            Kernel::Single { div, variant, io } => {
                SINGLE
                    + (div as usize * VARIANTS + variant as usize) * IO_NAMES.len()
                    + io.0 as usize
            }
            Kernel::Topk { io, indices_i64 } => TOPK + 2 * io.0 as usize + indices_i64 as usize,
            Kernel::SingleTopk { io, indices_i64 } => {
                SINGLE_TOPK + 2 * io.0 as usize + indices_i64 as usize
            }
            Kernel::TopkValidate { indices_i64 } => TOPK_VALIDATE + indices_i64 as usize,
            Kernel::CountValid => COUNT_VALID,
            Kernel::ReduceLoss => REDUCE_LOSS,
            Kernel::Feature { kind, io } => {
                FEATURE + kind as usize * IO_NAMES.len() + io.0 as usize
            }
            Kernel::EagerTyped(op, d) => EAGER_TYPED + op as usize * 3 + dtype_index(d),
            Kernel::Eager(op) => EAGER + op as usize,
            Kernel::Mlp(op) => MLP + op as usize,
            Kernel::VpStats { round2, dtype } => {
                VP_STATS + 3 * round2 as usize + dtype_index(dtype)
            }
            Kernel::VpFinish { io } => VP_FINISH + io.0 as usize,
            Kernel::VpReduceLoss => VP_REDUCE,
            Kernel::Select { dtype } => SELECT + dtype_index(dtype),
        }
    }

    /// The kernel's symbol in the fatbin.
    pub(crate) fn name(self) -> String {
        let index = |i64: bool| if i64 { "i64" } else { "i32" };
        match self {
            Kernel::Fused { div, variant, io } | Kernel::Single { div, variant, io } => {
                let family = match self {
                    Kernel::Single { .. } => "single",
                    _ => "fused",
                };
                let div = ["fkl", "rkl", "jsd", "tvd", "sce"][div as usize];
                let variant = ["", "_fast", "_fastce"][variant as usize];
                format!("kd_{family}_{div}{variant}_{}", io.suffix())
            }
            Kernel::Topk { io, indices_i64 } => {
                format!("kd_topk_{}_{}", io.suffix(), index(indices_i64))
            }
            Kernel::SingleTopk { io, indices_i64 } => {
                format!("kd_single_topk_{}_{}", io.suffix(), index(indices_i64))
            }
            Kernel::TopkValidate { indices_i64 } => {
                format!("kd_topk_validate_{}", index(indices_i64))
            }
            Kernel::CountValid => "kd_count_valid".into(),
            Kernel::ReduceLoss => "kd_reduce_loss".into(),
            Kernel::Feature { kind, io } => {
                format!("kd_feat_{}_{}", FEATURE_KINDS[kind as usize], io.suffix())
            }
            Kernel::EagerTyped(op, d) => {
                let op = ["log_softmax", "lsm_back", "ce_back"][op as usize];
                format!("kd_eager_{op}_{d}")
            }
            Kernel::Eager(op) => format!("kd_eager_{}", EAGER_OPS[op as usize]),
            Kernel::Mlp(op) => format!("mlp_{}", MLP_OPS[op as usize]),
            Kernel::VpStats { round2, dtype } => {
                format!("kd_vp_round{}_{dtype}", if round2 { 2 } else { 1 })
            }
            Kernel::VpFinish { io } => format!("kd_vp_finish_{}", io.suffix()),
            Kernel::VpReduceLoss => "kd_vp_reduce_loss".into(),
            Kernel::Select { dtype } => format!("kd_select_{dtype}"),
        }
    }
}

/// The kernels of one context: the loaded module and a slot per [`Kernel`],
/// filled at the kernel's first use and shared by every backend of the
/// context.
pub(crate) struct KernelTable {
    module: Arc<CudaModule>,
    slots: [OnceLock<CudaFunction>; SLOTS],
}

impl KernelTable {
    pub(crate) fn new(module: Arc<CudaModule>) -> Self {
        KernelTable {
            module,
            slots: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    pub(crate) fn module(&self) -> &Arc<CudaModule> {
        &self.module
    }

    /// The kernel, looked up in the module the first time only.
    pub(crate) fn get(&self, k: Kernel) -> Result<&CudaFunction> {
        let slot = &self.slots[k.slot()];
        if let Some(f) = slot.get() {
            return Ok(f);
        }
        let name = k.name();
        let f = self
            .module
            .load_function(&name)
            .map_err(|e| KdError::Cuda(format!("kernel {name}: {e}")))?;
        // Two threads may both load it; either function is the same kernel.
        Ok(slot.get_or_init(|| f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Divergence, Precision};

    fn every_kernel() -> Vec<Kernel> {
        let ios: Vec<Io> = (0..IO_NAMES.len() as u8).map(Io).collect();
        let mut all = vec![Kernel::CountValid, Kernel::ReduceLoss];
        for div in 0..DIVERGENCES as u8 {
            for variant in 0..VARIANTS as u8 {
                all.extend(ios.iter().map(|&io| Kernel::Fused { div, variant, io }));
                all.extend(ios.iter().map(|&io| Kernel::Single { div, variant, io }));
            }
        }
        for indices_i64 in [false, true] {
            all.push(Kernel::TopkValidate { indices_i64 });
            all.extend(ios.iter().map(|&io| Kernel::Topk { io, indices_i64 }));
            all.extend(ios.iter().map(|&io| Kernel::SingleTopk { io, indices_i64 }));
        }
        for kind in 0..FEATURE_KINDS.len() as u8 {
            all.extend(ios.iter().map(|&io| Kernel::Feature { kind, io }));
        }
        for op in [
            EagerTyped::LogSoftmax,
            EagerTyped::LsmBack,
            EagerTyped::CeBack,
        ] {
            for d in [Dtype::F32, Dtype::Bf16, Dtype::F16] {
                all.push(Kernel::EagerTyped(op, d));
            }
        }
        use EagerOp::*;
        for op in [
            FklTerms, RklTerms, LogMix, JsdTerms, SceTerms, TvdTerms, RowLoss, FklBack, RklBack,
            JsdBack, TvdBack,
        ] {
            all.push(Kernel::Eager(op));
        }
        use MlpOp::*;
        for op in [BiasAct, ReluBack, BiasGrad, Sgd, Adam] {
            all.push(Kernel::Mlp(op));
        }
        for round2 in [false, true] {
            for dtype in [Dtype::F32, Dtype::Bf16, Dtype::F16] {
                all.push(Kernel::VpStats { round2, dtype });
            }
        }
        all.extend(ios.iter().map(|&io| Kernel::VpFinish { io }));
        all.push(Kernel::VpReduceLoss);
        for dtype in [Dtype::F32, Dtype::Bf16, Dtype::F16] {
            all.push(Kernel::Select { dtype });
        }
        all
    }

    #[test]
    fn every_kernel_has_its_own_slot_and_name() {
        let all = every_kernel();
        assert_eq!(all.len(), SLOTS);
        let mut slots: Vec<usize> = all.iter().map(|k| k.slot()).collect();
        slots.sort_unstable();
        assert_eq!(slots, (0..SLOTS).collect::<Vec<_>>());
        let mut names: Vec<String> = all.iter().map(|k| k.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), SLOTS);
    }

    #[test]
    fn names_are_the_fatbin_symbols() {
        let spec = |divergence, beta, precision, alpha| LossSpec {
            divergence,
            beta,
            precision,
            alpha,
            ..Default::default()
        };
        let bf16_f32 = Io::new(Dtype::Bf16, Dtype::F32).unwrap();
        let f16 = Io::new(Dtype::F16, Dtype::F16).unwrap();
        for (s, io, name) in [
            (
                spec(Divergence::Jsd, 0.5, Precision::Exact, 0.0),
                bf16_f32,
                "kd_fused_jsd_bf16_f32",
            ),
            (
                spec(Divergence::Jsd, 1.0, Precision::Fast, 0.0),
                f16,
                "kd_fused_rkl_fast_f16_f16",
            ),
            (
                spec(Divergence::SoftCe, 0.5, Precision::Fast, 0.5),
                bf16_f32,
                "kd_fused_sce_fastce_bf16_f32",
            ),
            (
                spec(Divergence::Tvd, 0.5, Precision::Exact, 0.5),
                Io::new(Dtype::F32, Dtype::F32).unwrap(),
                "kd_fused_tvd_f32_f32",
            ),
        ] {
            assert_eq!(Kernel::fused(&s, io).name(), name);
            assert_eq!(
                Kernel::single(&s, io).name(),
                name.replace("kd_fused_", "kd_single_")
            );
        }
        assert_eq!(Io::new(Dtype::F32, Dtype::Bf16), None);
        for (k, name) in [
            (
                Kernel::Topk {
                    io: f16,
                    indices_i64: true,
                },
                "kd_topk_f16_f16_i64",
            ),
            (
                Kernel::SingleTopk {
                    io: bf16_f32,
                    indices_i64: false,
                },
                "kd_single_topk_bf16_f32_i32",
            ),
            (
                Kernel::TopkValidate { indices_i64: false },
                "kd_topk_validate_i32",
            ),
            (
                Kernel::Feature {
                    kind: 1,
                    io: bf16_f32,
                },
                "kd_feat_cos_bf16_f32",
            ),
            (
                Kernel::EagerTyped(EagerTyped::CeBack, Dtype::Bf16),
                "kd_eager_ce_back_bf16",
            ),
            (Kernel::Eager(EagerOp::JsdBack), "kd_eager_jsd_back"),
            (Kernel::Mlp(MlpOp::BiasAct), "mlp_bias_act"),
            (
                Kernel::VpStats {
                    round2: true,
                    dtype: Dtype::Bf16,
                },
                "kd_vp_round2_bf16",
            ),
            (Kernel::VpFinish { io: bf16_f32 }, "kd_vp_finish_bf16_f32"),
            (Kernel::VpReduceLoss, "kd_vp_reduce_loss"),
            (Kernel::Select { dtype: Dtype::Bf16 }, "kd_select_bf16"),
        ] {
            assert_eq!(k.name(), name);
        }
    }
}
