//! Host-side inputs: dtypes, logit matrices (possibly strided) and their
//! validation.

use crate::error::{invalid, Result};
use crate::spec::spellings;
use half::{bf16, f16};

/// Element type of the logits (and of the gradient when it follows the input).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// 32-bit float.
    #[default]
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
}

spellings!(Dtype, "dtype",
    F32 => "f32",
    Bf16 => "bf16",
    F16 => "f16",
);

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 | Dtype::F16 => 2,
        }
    }

    /// The code the C and CUDA sources use for it (0 f32, 1 bf16, 2 f16).
    pub(crate) fn code(self) -> i32 {
        match self {
            Dtype::F32 => 0,
            Dtype::Bf16 => 1,
            Dtype::F16 => 2,
        }
    }

    /// Little-endian bytes of elements of this dtype, as f32 values (a
    /// trailing partial element is dropped).
    pub(crate) fn decode(self, bytes: &[u8]) -> Vec<f32> {
        let data = OwnedData::from_bytes(bytes, self);
        let view = data.view();
        (0..view.len()).map(|i| view.get(i)).collect()
    }

    /// Rounds an f32 value to this dtype (nearest, ties to even) and back.
    pub fn round(self, x: f32) -> f32 {
        match self {
            Dtype::F32 => x,
            Dtype::Bf16 => bf16::from_f32(x).to_f32(),
            Dtype::F16 => f16::from_f32(x).to_f32(),
        }
    }
}

/// The dtype of the gradient a backend writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GradDtype {
    /// Always f32.
    #[default]
    F32,
    /// The dtype of the logits (rounded once, from fp32).
    Input,
}

impl GradDtype {
    /// The dtype the gradient is written in, for inputs of `input`.
    pub fn dtype_for(self, input: Dtype) -> Dtype {
        match self {
            GradDtype::F32 => Dtype::F32,
            GradDtype::Input => input,
        }
    }
}

/// Borrowed element data of one of the supported dtypes.
#[derive(Debug, Clone, Copy)]
pub enum HostData<'a> {
    /// f32 elements.
    F32(&'a [f32]),
    /// bf16 elements.
    Bf16(&'a [bf16]),
    /// f16 elements.
    F16(&'a [f16]),
}

impl HostData<'_> {
    /// The dtype.
    pub fn dtype(&self) -> Dtype {
        match self {
            HostData::F32(_) => Dtype::F32,
            HostData::Bf16(_) => Dtype::Bf16,
            HostData::F16(_) => Dtype::F16,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            HostData::F32(d) => d.len(),
            HostData::Bf16(d) => d.len(),
            HostData::F16(d) => d.len(),
        }
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` as f32.
    pub fn get(&self, i: usize) -> f32 {
        match self {
            HostData::F32(d) => d[i],
            HostData::Bf16(d) => d[i].to_f32(),
            HostData::F16(d) => d[i].to_f32(),
        }
    }

    /// The elements from `from` on (empty past the end): a column offset
    /// into row-major data, e.g. one vocabulary shard of wider rows.
    pub fn offset(&self, from: usize) -> Self {
        fn tail<T>(d: &[T], from: usize) -> &[T] {
            &d[from.min(d.len())..]
        }
        match self {
            HostData::F32(d) => HostData::F32(tail(d, from)),
            HostData::Bf16(d) => HostData::Bf16(tail(d, from)),
            HostData::F16(d) => HostData::F16(tail(d, from)),
        }
    }

    /// The raw bytes.
    pub fn bytes(&self) -> &[u8] {
        match self {
            HostData::F32(d) => bytemuck::cast_slice(d),
            HostData::Bf16(d) => bytemuck::cast_slice(d),
            HostData::F16(d) => bytemuck::cast_slice(d),
        }
    }
}

/// Owned element data; see [`HostData`].
#[derive(Debug, Clone, PartialEq)]
pub enum OwnedData {
    /// f32 elements.
    F32(Vec<f32>),
    /// bf16 elements.
    Bf16(Vec<bf16>),
    /// f16 elements.
    F16(Vec<f16>),
}

impl OwnedData {
    /// Converts f32 values to `dtype` (nearest, ties to even).
    pub fn from_f32(values: &[f32], dtype: Dtype) -> Self {
        match dtype {
            Dtype::F32 => OwnedData::F32(values.to_vec()),
            Dtype::Bf16 => OwnedData::Bf16(values.iter().map(|&x| bf16::from_f32(x)).collect()),
            Dtype::F16 => OwnedData::F16(values.iter().map(|&x| f16::from_f32(x)).collect()),
        }
    }

    /// From little-endian bytes of `dtype` elements (a trailing partial
    /// element is dropped).
    pub fn from_bytes(bytes: &[u8], dtype: Dtype) -> Self {
        let u16s = || {
            bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
        };
        match dtype {
            Dtype::F32 => OwnedData::F32(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            Dtype::Bf16 => OwnedData::Bf16(u16s().map(bf16::from_bits).collect()),
            Dtype::F16 => OwnedData::F16(u16s().map(f16::from_bits).collect()),
        }
    }

    /// A borrowed view.
    pub fn view(&self) -> HostData<'_> {
        match self {
            OwnedData::F32(d) => HostData::F32(d),
            OwnedData::Bf16(d) => HostData::Bf16(d),
            OwnedData::F16(d) => HostData::F16(d),
        }
    }
}

/// A row-major matrix of logits, `rows × cols`, row `r` starting at element
/// `r · row_stride` (`row_stride ≥ cols`).
#[derive(Debug, Clone, Copy)]
pub struct Logits<'a> {
    /// The elements.
    pub data: HostData<'a>,
    /// Number of rows N.
    pub rows: usize,
    /// Number of columns V used.
    pub cols: usize,
    /// Elements between the starts of two rows.
    pub row_stride: usize,
}

impl<'a> Logits<'a> {
    /// A dense matrix (`row_stride = cols`).
    pub fn new(data: HostData<'a>, rows: usize, cols: usize) -> Self {
        Logits {
            data,
            rows,
            cols,
            row_stride: cols,
        }
    }

    /// A strided matrix.
    pub fn strided(data: HostData<'a>, rows: usize, cols: usize, row_stride: usize) -> Self {
        Logits {
            data,
            rows,
            cols,
            row_stride,
        }
    }

    /// The dtype.
    pub fn dtype(&self) -> Dtype {
        self.data.dtype()
    }

    /// Element (r, c) as f32.
    pub fn get(&self, r: usize, c: usize) -> f32 {
        self.data.get(r * self.row_stride + c)
    }

    /// Checks that the shape is consistent with the data; `arg` names the
    /// argument in the error.
    pub fn validate(&self, arg: &'static str) -> Result<()> {
        if self.cols == 0 {
            return invalid(arg, "needs at least one column (V ≥ 1)");
        }
        if self.cols > i32::MAX as usize {
            return invalid(arg, format!("V = {} exceeds {}", self.cols, i32::MAX));
        }
        if self.row_stride < self.cols {
            return invalid(
                arg,
                format!("row stride {} is below V = {}", self.row_stride, self.cols),
            );
        }
        let cols = format!("{} columns", self.cols);
        rows_fit(
            arg,
            self.rows,
            self.row_stride,
            self.cols,
            &cols,
            self.data.len(),
        )
    }
}

/// Checks that `rows` rows of `len` elements, `stride` apart, fit in the
/// `have` elements given; `what` names the row length in the error.
pub(crate) fn rows_fit(
    arg: &'static str,
    rows: usize,
    stride: usize,
    len: usize,
    what: &str,
    have: usize,
) -> Result<()> {
    if rows == 0 {
        return Ok(());
    }
    match (rows - 1)
        .checked_mul(stride)
        .and_then(|x| x.checked_add(len))
    {
        Some(n) if n <= have => Ok(()),
        _ => invalid(
            arg,
            format!("{rows} rows of stride {stride} and {what} need more than the {have} elements given"),
        ),
    }
}

/// Everything a backend reads: student and teacher logits and optional labels.
#[derive(Debug, Clone, Copy)]
pub struct KdInputs<'a> {
    /// Student logits `[N, V]`.
    pub student: Logits<'a>,
    /// Teacher logits `[N, V]` (a padded teacher: `row_stride` > V).
    pub teacher: Logits<'a>,
    /// Hard labels, one per row, in `[0, V)` or `ignore_index`.
    pub labels: Option<&'a [i64]>,
    /// Per-row weights (N, finite): each row's ℓ (and its gradient) is
    /// multiplied by its weight; the reductions' denominators stay the same.
    pub row_weights: Option<&'a [f32]>,
}

impl KdInputs<'_> {
    /// Checks shapes, dtypes and labels against each other.
    pub fn validate(&self, ignore_index: i64) -> Result<()> {
        self.student.validate("student")?;
        self.teacher.validate("teacher")?;
        if self.student.dtype() != self.teacher.dtype() {
            return invalid(
                "teacher",
                format!(
                    "dtype {} differs from the student's {}",
                    self.teacher.dtype(),
                    self.student.dtype()
                ),
            );
        }
        if self.teacher.rows != self.student.rows {
            return invalid(
                "teacher",
                format!(
                    "has {} rows, the student {}",
                    self.teacher.rows, self.student.rows
                ),
            );
        }
        if self.teacher.cols != self.student.cols {
            return invalid(
                "teacher",
                format!(
                    "uses {} columns, the student {} (pass a wider teacher with a row stride)",
                    self.teacher.cols, self.student.cols
                ),
            );
        }
        validate_labels(
            self.labels,
            self.row_weights,
            self.student.rows,
            self.student.cols,
            ignore_index,
        )
    }

    /// Rows that count: all rows without labels, else those whose label is
    /// not `ignore_index`.
    pub fn valid_rows(&self, ignore_index: i64) -> usize {
        valid_rows(self.labels, self.student.rows, ignore_index)
    }
}

pub(crate) fn valid_rows(labels: Option<&[i64]>, rows: usize, ignore_index: i64) -> usize {
    match labels {
        None => rows,
        Some(l) => l.iter().filter(|&&y| y != ignore_index).count(),
    }
}

/// Labels (N, in `[0, V)` or `ignore_index`) and row weights (N, finite).
pub(crate) fn validate_labels(
    labels: Option<&[i64]>,
    row_weights: Option<&[f32]>,
    rows: usize,
    cols: usize,
    ignore_index: i64,
) -> Result<()> {
    if let Some(w) = row_weights {
        if w.len() != rows {
            return invalid(
                "row_weights",
                format!("has {} entries for {rows} rows", w.len()),
            );
        }
        if let Some((i, x)) = w.iter().enumerate().find(|(_, x)| !x.is_finite()) {
            return invalid(
                "row_weights",
                format!("row_weights[{i}] = {x} is not finite"),
            );
        }
    }
    if let Some(labels) = labels {
        if labels.len() != rows {
            return invalid(
                "labels",
                format!("has {} entries for {rows} rows", labels.len()),
            );
        }
        let v = cols as i64;
        if let Some((i, &y)) = labels
            .iter()
            .enumerate()
            .find(|(_, &y)| y != ignore_index && !(0..v).contains(&y))
        {
            return invalid(
                    "labels",
                    format!("labels[{i}] = {y} is outside [0, {v}) and is not ignore_index ({ignore_index})"),
                );
        }
    }
    Ok(())
}

/// The indices of a top-k teacher: `[N, k]` row-major, int32 or int64.
#[derive(Debug, Clone, Copy)]
pub enum TopkIndices<'a> {
    /// 32-bit indices.
    I32(&'a [i32]),
    /// 64-bit indices.
    I64(&'a [i64]),
}

impl TopkIndices<'_> {
    /// Number of entries.
    pub fn len(&self) -> usize {
        match self {
            TopkIndices::I32(d) => d.len(),
            TopkIndices::I64(d) => d.len(),
        }
    }

    /// True when there are no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entry `i`.
    pub fn get(&self, i: usize) -> i64 {
        match self {
            TopkIndices::I32(d) => d[i] as i64,
            TopkIndices::I64(d) => d[i],
        }
    }
}

/// A top-k (sparse) teacher (docs/DESIGN.md §4): for each row, `k` vocabulary
/// indices and the teacher's values there (logits, or log-probs with
/// `LossSpec::teacher_log_probs`), both `[N, k]` row-major.
#[derive(Debug, Clone, Copy)]
pub struct TopkTeacher<'a> {
    /// Indices into the vocabulary, distinct within a row.
    pub indices: TopkIndices<'a>,
    /// The teacher's values at those indices (the student's dtype).
    pub values: HostData<'a>,
    /// Entries per row, 1 ≤ k ≤ V.
    pub k: usize,
}

/// A student and a top-k teacher: what a backend's
/// [`crate::Backend::compute_topk`] reads.
#[derive(Debug, Clone, Copy)]
pub struct TopkInputs<'a> {
    /// Student logits `[N, V]`.
    pub student: Logits<'a>,
    /// The sparse teacher.
    pub teacher: TopkTeacher<'a>,
    /// Hard labels, as in [`KdInputs`].
    pub labels: Option<&'a [i64]>,
    /// Per-row weights, as in [`KdInputs`].
    pub row_weights: Option<&'a [f32]>,
}

impl TopkInputs<'_> {
    /// Checks shapes and dtypes, labels, weights, and every index: in
    /// `[0, V)` and distinct within its row (the first bad row is named).
    pub fn validate(&self, ignore_index: i64) -> Result<()> {
        self.student.validate("student")?;
        let (n, v, k) = (self.student.rows, self.student.cols, self.teacher.k);
        if k == 0 || k > v {
            return invalid("k", format!("must be in [1, V = {v}], got {k}"));
        }
        if self.teacher.values.dtype() != self.student.dtype() {
            return invalid(
                "teacher_topk_values",
                format!(
                    "dtype {} differs from the student's {}",
                    self.teacher.values.dtype(),
                    self.student.dtype()
                ),
            );
        }
        let Some(need) = n.checked_mul(k) else {
            return invalid(
                "teacher_topk_values",
                format!("[N = {n}, k = {k}] overflows"),
            );
        };
        if self.teacher.values.len() != need {
            return invalid(
                "teacher_topk_values",
                format!(
                    "has {} entries, [N = {n}, k = {k}] needs {need}",
                    self.teacher.values.len()
                ),
            );
        }
        if self.teacher.indices.len() != need {
            return invalid(
                "teacher_topk_indices",
                format!(
                    "has {} entries, [N = {n}, k = {k}] needs {need}",
                    self.teacher.indices.len()
                ),
            );
        }
        validate_labels(self.labels, self.row_weights, n, v, ignore_index)?;
        if let Some((row, msg)) = first_bad_topk_row(&self.teacher.indices, n, k, v) {
            return invalid("teacher_topk_indices", format!("row {row}: {msg}"));
        }
        Ok(())
    }

    /// Rows that count, as in [`KdInputs::valid_rows`].
    pub fn valid_rows(&self, ignore_index: i64) -> usize {
        valid_rows(self.labels, self.student.rows, ignore_index)
    }
}

/// The first row whose indices leave `[0, v)` or repeat, and what is wrong.
pub fn first_bad_topk_row(
    indices: &TopkIndices<'_>,
    n: usize,
    k: usize,
    v: usize,
) -> Option<(usize, String)> {
    let mut seen = vec![usize::MAX; v];
    for r in 0..n {
        for i in 0..k {
            let j = indices.get(r * k + i);
            if !(0..v as i64).contains(&j) {
                return Some((r, format!("index {j} (entry {i}) is outside [0, {v})")));
            }
            let j = j as usize;
            if seen[j] == r {
                return Some((r, format!("index {j} appears twice")));
            }
            seen[j] = r;
        }
    }
    None
}
