//! Feature inputs on the host ([`Features`], [`FeatureInputs`]) and the
//! shape of a batch on either side ([`FeatureLayout`]), with their validation.

use super::{params, FeatureKind};
use crate::error::{invalid, Result};
use crate::tensor::{rows_fit, Dtype, HostData};

/// Checks that a row of `channels × width` elements is not empty and that
/// its length fits the kernels' 32-bit in-row indexing.
fn check_row(arg: &'static str, channels: usize, width: usize) -> Result<()> {
    if channels == 0 || width == 0 {
        return invalid(
            arg,
            format!(
                "has empty rows (C = {channels}, H or S = {width}); every row needs at least one element"
            ),
        );
    }
    match channels.checked_mul(width) {
        Some(l) if l <= i32::MAX as usize => Ok(()),
        _ => invalid(
            arg,
            format!(
                "a row of {channels} × {width} elements exceeds {}",
                i32::MAX
            ),
        ),
    }
}

/// Shape and strides (in elements) of one batch, on the host or the device.
/// A student sample is `student_channels × width` elements (channel c at
/// c·width), a teacher sample `teacher_channels × width`. MSE and cosine use
/// rows of `channels · width` values (normally channels = 1, width = H).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeatureLayout {
    /// Rows (samples) N.
    pub rows: usize,
    /// H (MSE, cosine) or S = H·W (attention).
    pub width: usize,
    /// C_s (1 for plain rows).
    pub student_channels: usize,
    /// C_t (1 for plain rows).
    pub teacher_channels: usize,
    /// Elements between two student samples (≥ C_s·width).
    pub student_stride: usize,
    /// Elements between two teacher samples (≥ C_t·width).
    pub teacher_stride: usize,
    /// Elements between two rows of the student's gradient (≥ C_s·width).
    pub grad_student_stride: usize,
    /// Elements between two rows of the teacher's gradient (≥ C_t·width).
    pub grad_teacher_stride: usize,
}

impl FeatureLayout {
    /// Dense rows `[N, H]` for student, teacher and gradients.
    pub fn dense(rows: usize, cols: usize) -> Self {
        FeatureLayout::maps(rows, 1, 1, cols)
    }

    /// Dense maps: student `[N, C_s, S]`, teacher `[N, C_t, S]`.
    pub fn maps(
        rows: usize,
        student_channels: usize,
        teacher_channels: usize,
        width: usize,
    ) -> Self {
        // Saturating: validation rejects a row beyond i32::MAX elements.
        let (ls, lt) = (
            student_channels.saturating_mul(width),
            teacher_channels.saturating_mul(width),
        );
        FeatureLayout {
            rows,
            width,
            student_channels,
            teacher_channels,
            student_stride: ls,
            teacher_stride: lt,
            grad_student_stride: ls,
            grad_teacher_stride: lt,
        }
    }

    /// Elements per student sample.
    pub fn student_len(&self) -> usize {
        self.student_channels.saturating_mul(self.width)
    }

    /// Elements per teacher sample.
    pub fn teacher_len(&self) -> usize {
        self.teacher_channels.saturating_mul(self.width)
    }

    /// Elements a buffer of `rows` rows of `len` values, `stride` apart, must
    /// hold (saturating).
    pub fn needed(&self, stride: usize, len: usize) -> usize {
        if self.rows == 0 {
            0
        } else {
            (self.rows - 1).saturating_mul(stride).saturating_add(len)
        }
    }

    /// Checks the shape for `kind` (names the argument at fault).
    pub fn validate(&self, kind: FeatureKind) -> Result<()> {
        check_row("student", self.student_channels, self.width)?;
        check_row("teacher", self.teacher_channels, self.width)?;
        if kind != FeatureKind::Attention && self.student_len() != self.teacher_len() {
            return invalid(
                "teacher",
                format!(
                    "has {} features per row, the student {}",
                    self.teacher_len(),
                    self.student_len()
                ),
            );
        }
        for (arg, stride, len) in [
            ("student_stride", self.student_stride, self.student_len()),
            ("teacher_stride", self.teacher_stride, self.teacher_len()),
            (
                "grad_student_stride",
                self.grad_student_stride,
                self.student_len(),
            ),
            (
                "grad_teacher_stride",
                self.grad_teacher_stride,
                self.teacher_len(),
            ),
        ] {
            if stride < len {
                return invalid(
                    arg,
                    format!("row stride {stride} is below the row length {len}"),
                );
            }
        }
        Ok(())
    }

    /// f32 workspace the CUDA kernel of `kind` needs: 2·S per block
    /// (attention), else none.
    pub fn workspace_len(&self, kind: FeatureKind) -> usize {
        match kind {
            FeatureKind::Attention => params::grid(kind, self.rows) as usize * 2 * self.width,
            _ => 0,
        }
    }
}

/// A batch of feature rows on the host: `rows` samples of `channels × width`
/// elements (channel c of a sample at offset c·width), samples `row_stride`
/// elements apart. MSE and cosine treat a sample as one row of
/// `channels·width` values.
#[derive(Debug, Clone, Copy)]
pub struct Features<'a> {
    /// The elements.
    pub data: HostData<'a>,
    /// Rows (samples) N.
    pub rows: usize,
    /// Channels C per sample (1 for plain rows).
    pub channels: usize,
    /// Elements per channel: H for plain rows, S = H·W for attention maps.
    pub width: usize,
    /// Elements between the starts of two samples (≥ channels·width).
    pub row_stride: usize,
}

impl<'a> Features<'a> {
    /// Dense rows `[N, H]`.
    pub fn new(data: HostData<'a>, rows: usize, cols: usize) -> Self {
        Features {
            data,
            rows,
            channels: 1,
            width: cols,
            row_stride: cols,
        }
    }

    /// Dense maps `[N, C, S]` (attention transfer; S = H·W).
    pub fn maps(data: HostData<'a>, rows: usize, channels: usize, width: usize) -> Self {
        Features {
            data,
            rows,
            channels,
            width,
            // Saturating: validation rejects a row beyond i32::MAX elements.
            row_stride: channels.saturating_mul(width),
        }
    }

    /// The same batch with samples `row_stride` elements apart.
    pub fn with_row_stride(self, row_stride: usize) -> Self {
        Features { row_stride, ..self }
    }

    /// The dtype.
    pub fn dtype(&self) -> Dtype {
        self.data.dtype()
    }

    /// Elements per sample, `channels · width`.
    pub fn row_len(&self) -> usize {
        self.channels.saturating_mul(self.width)
    }

    /// Element `i` (`< row_len`) of sample `r`, as f32.
    pub fn get(&self, r: usize, i: usize) -> f32 {
        self.data.get(r * self.row_stride + i)
    }

    /// Sample `r` as f64 values.
    pub(crate) fn row_f64(&self, r: usize) -> Vec<f64> {
        (0..self.row_len()).map(|i| self.get(r, i) as f64).collect()
    }

    /// Checks the shape against the data; `arg` names the argument.
    pub fn validate(&self, arg: &'static str) -> Result<()> {
        check_row(arg, self.channels, self.width)?;
        let len = self.row_len();
        if self.row_stride < len {
            return invalid(
                arg,
                format!(
                    "row stride {} is below the row length {len}",
                    self.row_stride
                ),
            );
        }
        let what = format!("length {len}");
        rows_fit(arg, self.rows, self.row_stride, len, &what, self.data.len())
    }
}

/// Student and teacher features.
#[derive(Debug, Clone, Copy)]
pub struct FeatureInputs<'a> {
    /// Student features.
    pub student: Features<'a>,
    /// Teacher features: as many rows, the same row length (MSE, cosine) or
    /// the same S (attention; C may differ).
    pub teacher: Features<'a>,
}

impl FeatureInputs<'_> {
    /// The batch's layout for `kind`, with dense gradients: MSE and cosine
    /// see rows of `channels · width` values.
    pub fn layout(&self, kind: FeatureKind) -> FeatureLayout {
        let (s, t) = (&self.student, &self.teacher);
        let (width, cs, ct) = match kind {
            FeatureKind::Attention => (s.width, s.channels, t.channels),
            _ => (s.row_len(), 1, 1),
        };
        FeatureLayout {
            rows: s.rows,
            width,
            student_channels: cs,
            teacher_channels: ct,
            student_stride: s.row_stride,
            teacher_stride: t.row_stride,
            grad_student_stride: s.row_len(),
            grad_teacher_stride: t.row_len(),
        }
    }

    /// Checks shapes and dtypes against each other for `kind`.
    pub fn validate(&self, kind: FeatureKind) -> Result<()> {
        self.student.validate("student")?;
        self.teacher.validate("teacher")?;
        let (s, t) = (&self.student, &self.teacher);
        if s.dtype() != t.dtype() {
            return invalid(
                "teacher",
                format!(
                    "dtype {} differs from the student's {}",
                    t.dtype(),
                    s.dtype()
                ),
            );
        }
        if s.rows != t.rows {
            return invalid(
                "teacher",
                format!("has {} rows, the student {}", t.rows, s.rows),
            );
        }
        match kind {
            FeatureKind::Attention if s.width != t.width => invalid(
                "teacher",
                format!(
                    "has {} positions per channel (S), the student {}",
                    t.width, s.width
                ),
            ),
            FeatureKind::Mse | FeatureKind::Cosine if s.row_len() != t.row_len() => invalid(
                "teacher",
                format!(
                    "has {} features per row, the student {}",
                    t.row_len(),
                    s.row_len()
                ),
            ),
            _ => Ok(()),
        }
    }
}
