//! The inputs of a fused linear + distillation call and their validation.

use crate::error::{invalid, Result};
use crate::tensor::{first_bad_topk_row, validate_labels, Dtype, HostData, Logits, TopkTeacher};

/// A dense row-major matrix `rows × cols`.
#[derive(Debug, Clone, Copy)]
pub struct Matrix<'a> {
    /// The elements, `rows · cols` of them.
    pub data: HostData<'a>,
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
}

impl<'a> Matrix<'a> {
    /// A `rows × cols` matrix over `data`.
    pub fn new(data: HostData<'a>, rows: usize, cols: usize) -> Self {
        Matrix { data, rows, cols }
    }

    /// Checks that the data holds exactly `rows · cols` elements.
    fn validate(&self, arg: &'static str) -> Result<()> {
        match self.rows.checked_mul(self.cols) {
            Some(len) if len == self.data.len() => Ok(()),
            Some(len) => invalid(
                arg,
                format!(
                    "holds {} elements, its shape [{}, {}] needs {len}",
                    self.data.len(),
                    self.rows,
                    self.cols
                ),
            ),
            None => invalid(
                arg,
                format!("shape [{}, {}] overflows", self.rows, self.cols),
            ),
        }
    }
}

/// A linear head applied to hidden states: logits = `hidden · weightᵀ + bias`.
#[derive(Debug, Clone, Copy)]
pub struct Linear<'a> {
    /// Hidden states `[N, H]`.
    pub hidden: Matrix<'a>,
    /// The head `[V, H]` (PyTorch's `nn.Linear` layout).
    pub weight: Matrix<'a>,
    /// The bias `[V]`, if any.
    pub bias: Option<HostData<'a>>,
}

impl<'a> Linear<'a> {
    /// `hidden · weightᵀ + bias`.
    pub fn new(hidden: Matrix<'a>, weight: Matrix<'a>, bias: Option<HostData<'a>>) -> Self {
        Linear {
            hidden,
            weight,
            bias,
        }
    }

    /// Shapes and dtypes; `who` is `student` or `teacher`.
    fn validate(&self, who: Side) -> Result<()> {
        self.hidden.validate(who.hidden())?;
        self.weight.validate(who.weight())?;
        if self.hidden.cols == 0 {
            return invalid(who.hidden(), "needs H ≥ 1 columns, got 0");
        }
        if self.weight.rows == 0 {
            return invalid(who.weight(), "needs V ≥ 1 rows, got 0");
        }
        if self.weight.rows > i32::MAX as usize {
            return invalid(
                who.weight(),
                format!("V = {} exceeds {}", self.weight.rows, i32::MAX),
            );
        }
        if self.weight.cols != self.hidden.cols {
            return invalid(
                who.weight(),
                format!(
                    "has {} columns, the hidden states H = {}",
                    self.weight.cols, self.hidden.cols
                ),
            );
        }
        let dtype = self.hidden.data.dtype();
        if self.weight.data.dtype() != dtype {
            return invalid(
                who.weight(),
                format!(
                    "dtype {} differs from the hidden states' {dtype}",
                    self.weight.data.dtype()
                ),
            );
        }
        if let Some(b) = self.bias {
            if b.dtype() != dtype {
                return invalid(
                    who.bias(),
                    format!(
                        "dtype {} differs from the hidden states' {dtype}",
                        b.dtype()
                    ),
                );
            }
            if b.len() != self.weight.rows {
                return invalid(
                    who.bias(),
                    format!(
                        "has {} entries, the head {} rows",
                        b.len(),
                        self.weight.rows
                    ),
                );
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Side {
    Student,
    Teacher,
}

impl Side {
    fn hidden(self) -> &'static str {
        match self {
            Side::Student => "student_hidden",
            Side::Teacher => "teacher_hidden",
        }
    }
    fn weight(self) -> &'static str {
        match self {
            Side::Student => "student_weight",
            Side::Teacher => "teacher_weight",
        }
    }
    fn bias(self) -> &'static str {
        match self {
            Side::Student => "student_bias",
            Side::Teacher => "teacher_bias",
        }
    }
}

/// The teacher of a fused linear call.
#[derive(Debug, Clone, Copy)]
pub enum LinearTeacher<'a> {
    /// Hidden states `[N, H_t]` and a head `[V_t, H_t]`, `V_t ≥ V` (a padded
    /// vocabulary: its first V rows are used).
    Linear(Linear<'a>),
    /// Precomputed logits `[N, V]` (any row stride ≥ V).
    Logits(Logits<'a>),
    /// A top-k teacher `[N, k]` (offline distillation).
    Topk(TopkTeacher<'a>),
}

/// Everything a fused linear call reads.
#[derive(Debug, Clone, Copy)]
pub struct LinearInputs<'a> {
    /// The student's hidden states and head.
    pub student: Linear<'a>,
    /// The teacher.
    pub teacher: LinearTeacher<'a>,
    /// Hard labels `[N]`, in `[0, V)` or `ignore_index`.
    pub labels: Option<&'a [i64]>,
    /// Per-row weights `[N]` (finite).
    pub row_weights: Option<&'a [f32]>,
}

impl LinearInputs<'_> {
    /// Rows N.
    pub fn rows(&self) -> usize {
        self.student.hidden.rows
    }

    /// Vocabulary V (the student head's rows).
    pub fn vocab(&self) -> usize {
        self.student.weight.rows
    }

    /// The operands' dtype (the student's hidden states).
    pub fn dtype(&self) -> Dtype {
        self.student.hidden.data.dtype()
    }

    /// Checks shapes and dtypes against each other, and the labels; the
    /// loss's own validation (indices of a top-k teacher, values) runs on
    /// each chunk.
    pub fn validate(&self, ignore_index: i64) -> Result<()> {
        self.student.validate(Side::Student)?;
        let (n, v, dtype) = (self.rows(), self.vocab(), self.dtype());
        let rows_of = |arg: &'static str, rows: usize| {
            if rows == n {
                Ok(())
            } else {
                invalid(
                    arg,
                    format!("has {rows} rows, the student's hidden states {n}"),
                )
            }
        };
        let dtype_of = |arg: &'static str, d: Dtype| {
            if d == dtype {
                Ok(())
            } else {
                invalid(
                    arg,
                    format!(
                        "dtype {d} differs from the student's {dtype} (one operand dtype per call)"
                    ),
                )
            }
        };
        match self.teacher {
            LinearTeacher::Linear(t) => {
                t.validate(Side::Teacher)?;
                rows_of("teacher_hidden", t.hidden.rows)?;
                dtype_of("teacher_hidden", t.hidden.data.dtype())?;
                if t.weight.rows < v {
                    return invalid(
                        "teacher_weight",
                        format!(
                            "has {} rows, fewer than the student's vocabulary V = {v}",
                            t.weight.rows
                        ),
                    );
                }
            }
            LinearTeacher::Logits(t) => {
                t.validate("teacher_logits")?;
                rows_of("teacher_logits", t.rows)?;
                dtype_of("teacher_logits", t.dtype())?;
                if t.cols != v {
                    return invalid(
                        "teacher_logits",
                        format!("uses {} columns, the student's head V = {v}", t.cols),
                    );
                }
            }
            LinearTeacher::Topk(t) => {
                dtype_of("topk_values", t.values.dtype())?;
                if t.k == 0 || t.k > v {
                    return invalid("topk_k", format!("must be in [1, V = {v}], got {}", t.k));
                }
                let need = n.checked_mul(t.k);
                if need != Some(t.indices.len()) {
                    return invalid(
                        "topk_indices",
                        format!(
                            "has {} entries, [N = {n}, k = {}] needs {}",
                            t.indices.len(),
                            t.k,
                            n * t.k
                        ),
                    );
                }
                if need != Some(t.values.len()) {
                    return invalid(
                        "topk_values",
                        format!(
                            "has {} entries, [N = {n}, k = {}] needs {}",
                            t.values.len(),
                            t.k,
                            n * t.k
                        ),
                    );
                }
                // Here, for the whole batch, so that the row named is the
                // batch's (each chunk's own check would count from its start).
                if let Some((row, msg)) = first_bad_topk_row(&t.indices, n, t.k, v) {
                    return invalid("topk_indices", format!("row {row}: {msg}"));
                }
            }
        }
        validate_labels(self.labels, self.row_weights, n, v, ignore_index)
    }
}
