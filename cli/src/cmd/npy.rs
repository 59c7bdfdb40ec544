//! `.npy` reading and writing for the file interface; the readers also take
//! `.safetensors` files (by their extension, through `tensorfile.rs`).

use super::tensorfile::{self, Ints};
use super::CliError;
use npyz::{DType, NpyFile, Order, TypeChar, WriterBuilder};
use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::Path;

fn err(path: &Path, what: impl std::fmt::Display) -> CliError {
    CliError::Msg(format!("{}: {what}", path.display()))
}

fn open(path: &Path, arg: &str) -> Result<NpyFile<BufReader<File>>, CliError> {
    let f = File::open(path).map_err(|e| err(path, format!("cannot open {arg}: {e}")))?;
    let npy = NpyFile::new(BufReader::new(f))
        .map_err(|e| err(path, format!("not a valid .npy file ({arg}): {e}")))?;
    // Every element count a reader may form (the rows', the whole array's)
    // fits: checked, whatever the order of the factors.
    let shape = npy.shape();
    let row = shape
        .iter()
        .skip(1)
        .try_fold(1u64, |acc, &d| acc.checked_mul(d));
    let total = row.and_then(|r| r.checked_mul(shape.first().copied().unwrap_or(1)));
    if row.is_none_or(|r| usize::try_from(r).is_err())
        || total.is_none_or(|t| usize::try_from(t).is_err())
    {
        return Err(err(
            path,
            format!("{arg}: the element count of shape {shape:?} overflows"),
        ));
    }
    if npy.order() != Order::C {
        return Err(err(
            path,
            format!("{arg} must be C-order (row-major), got Fortran order"),
        ));
    }
    Ok(npy)
}

fn type_of(npy: &NpyFile<BufReader<File>>) -> Option<(TypeChar, u64)> {
    match npy.dtype() {
        DType::Plain(ts) => Some((ts.type_char(), ts.size_field())),
        _ => None,
    }
}

/// `[..., C]` as `[rows, C]`: the leading dimensions flattened (checked).
fn as_rows(
    path: &Path,
    arg: &str,
    shape: &[usize],
    what: &str,
) -> Result<(usize, usize), CliError> {
    match shape.split_last() {
        Some((&cols, lead)) if !lead.is_empty() => {
            match lead.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) {
                Some(rows) if rows.checked_mul(cols).is_some() => Ok((rows, cols)),
                _ => Err(err(
                    path,
                    format!("{arg}: the element count of shape {shape:?} overflows"),
                )),
            }
        }
        _ => Err(err(
            path,
            format!("{arg} must be 2-D [N, {what}] (or [..., {what}], flattened to rows), got shape {shape:?}"),
        )),
    }
}

/// A float array of rank ≥ 2 as f32 values (f16 and bf16 exact, f64 rounded),
/// its leading dimensions flattened to rows: (data, rows, cols).
pub fn read_matrix(path: &Path, arg: &str) -> Result<(Vec<f32>, usize, usize), CliError> {
    let (data, rows, cols, _) = read_rows(path, arg)?;
    Ok((data, rows, cols))
}

/// [`read_matrix`], with the file's own shape (for outputs of that shape).
pub fn read_rows(path: &Path, arg: &str) -> Result<(Vec<f32>, usize, usize, Vec<usize>), CliError> {
    let (data, shape) = read_array(path, arg)?;
    let (rows, cols) = as_rows(path, arg, &shape, "V")?;
    Ok((data, rows, cols, shape))
}

/// A float array of rank ≥ 2 flattened to `[rows, k]`, for top-k values.
pub fn read_topk_values(path: &Path, arg: &str) -> Result<(Vec<f32>, usize, usize), CliError> {
    let (data, shape) = read_array(path, arg)?;
    let (rows, cols) = as_rows(path, arg, &shape, "k")?;
    Ok((data, rows, cols))
}

/// A 1-D int32 or int64 array as i64.
pub fn read_labels(path: &Path, arg: &str) -> Result<Vec<i64>, CliError> {
    if tensorfile::is_safetensors(path) {
        return tensorfile::read_with(path, arg, |dtype, shape, bytes| {
            if shape.len() != 1 {
                return Err(err(
                    path,
                    format!("{arg} must be 1-D [N], got shape {shape:?}"),
                ));
            }
            Ok(match tensorfile::ints(path, arg, dtype, bytes)? {
                Ints::I32(v) => v.into_iter().map(i64::from).collect(),
                Ints::I64(v) => v,
            })
        });
    }
    let npy = open(path, arg)?;
    let shape = npy.shape().to_vec();
    if shape.len() != 1 {
        return Err(err(
            path,
            format!("{arg} must be 1-D [N], got shape {shape:?}"),
        ));
    }
    let rd = |e: std::io::Error| err(path, format!("reading {arg}: {e}"));
    match type_of(&npy) {
        Some((TypeChar::Int, 8)) => npy.into_vec::<i64>().map_err(rd),
        Some((TypeChar::Int, 4)) => Ok(npy
            .into_vec::<i32>()
            .map_err(rd)?
            .into_iter()
            .map(i64::from)
            .collect()),
        _ => Err(err(
            path,
            format!(
                "{arg} has unsupported dtype {} (expected int64 or int32)",
                npy.dtype().descr()
            ),
        )),
    }
}

/// Top-k teacher indices as read from a file, in their own dtype.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Indices {
    /// int32 indices.
    I32(Vec<i32>),
    /// int64 indices.
    I64(Vec<i64>),
}

impl Indices {
    /// A borrowed view for the library.
    pub fn view(&self) -> kdfuse::TopkIndices<'_> {
        match self {
            Indices::I32(d) => kdfuse::TopkIndices::I32(d),
            Indices::I64(d) => kdfuse::TopkIndices::I64(d),
        }
    }
}

/// An int32 or int64 array of rank ≥ 2, its dtype kept and its leading
/// dimensions flattened to rows: (indices, rows, cols).
pub fn read_index_matrix(path: &Path, arg: &str) -> Result<(Indices, usize, usize), CliError> {
    if tensorfile::is_safetensors(path) {
        return tensorfile::read_with(path, arg, |dtype, shape, bytes| {
            let (rows, cols) = as_rows(path, arg, shape, "k")?;
            let data = match tensorfile::ints(path, arg, dtype, bytes)? {
                Ints::I32(v) => Indices::I32(v),
                Ints::I64(v) => Indices::I64(v),
            };
            Ok((data, rows, cols))
        });
    }
    let npy = open(path, arg)?;
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let (rows, cols) = as_rows(path, arg, &shape, "k")?;
    let rd = |e: std::io::Error| err(path, format!("reading {arg}: {e}"));
    let data = match type_of(&npy) {
        Some((TypeChar::Int, 8)) => Indices::I64(npy.into_vec::<i64>().map_err(rd)?),
        Some((TypeChar::Int, 4)) => Indices::I32(npy.into_vec::<i32>().map_err(rd)?),
        _ => {
            return Err(err(
                path,
                format!(
                    "{arg} has unsupported dtype {} (expected int32 or int64)",
                    npy.dtype().descr()
                ),
            ))
        }
    };
    Ok((data, rows, cols))
}

/// A 1-D float array as f32 values (f16 exact, f64 rounded).
pub fn read_vector(path: &Path, arg: &str) -> Result<Vec<f32>, CliError> {
    let (data, shape) = read_array(path, arg)?;
    if shape.len() != 1 {
        return Err(err(
            path,
            format!("{arg} must be 1-D [N], got shape {shape:?}"),
        ));
    }
    Ok(data)
}

/// A float array of any rank as f32 values (f16 and bf16 exact, f64
/// rounded), with its shape.
pub fn read_array(path: &Path, arg: &str) -> Result<(Vec<f32>, Vec<usize>), CliError> {
    if tensorfile::is_safetensors(path) {
        return tensorfile::read_with(path, arg, |dtype, shape, bytes| {
            Ok((tensorfile::floats(path, arg, dtype, bytes)?, shape.to_vec()))
        });
    }
    let npy = open(path, arg)?;
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let rd = |e: std::io::Error| err(path, format!("reading {arg}: {e}"));
    let data: Vec<f32> = match type_of(&npy) {
        Some((TypeChar::Float, 4)) => npy.into_vec::<f32>().map_err(rd)?,
        Some((TypeChar::Float, 2)) => npy
            .into_vec::<half::f16>()
            .map_err(rd)?
            .into_iter()
            .map(|x| x.to_f32())
            .collect(),
        Some((TypeChar::Float, 8)) => npy
            .into_vec::<f64>()
            .map_err(rd)?
            .into_iter()
            .map(|x| x as f32)
            .collect(),
        _ => {
            return Err(err(
                path,
                format!(
                    "{arg} has unsupported dtype {} (expected float32, float16 or float64)",
                    npy.dtype().descr()
                ),
            ))
        }
    };
    Ok((data, shape))
}

/// Writes an f32 array of any shape: into a temporary file in the same
/// directory, renamed over `path` once complete, so that a failed write
/// (a full disk) leaves no truncated file behind (and an existing file
/// as it was).
pub fn write_array(path: &Path, data: &[f32], shape: &[usize]) -> Result<(), CliError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut builder = tempfile::Builder::new();
    builder.prefix(".kdfuse-").suffix(".npy.tmp");
    // The mode File::create gives (0666 less the umask), not tempfile's 0600.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let tmp = builder
        .tempfile_in(dir)
        .map_err(|e| err(path, format!("cannot create: {e}")))?;
    let werr = |e: std::io::Error| err(path, format!("writing: {e}"));
    let shape: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    let mut buf = BufWriter::new(tmp.as_file());
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&shape)
        .writer(&mut buf)
        .begin_nd()
        .map_err(werr)?;
    w.extend(data.iter().copied()).map_err(werr)?;
    w.finish().map_err(werr)?;
    buf.flush().map_err(werr)?;
    drop(buf);
    tmp.persist(path)
        .map_err(|e| err(path, format!("cannot create: {}", e.error)))?;
    Ok(())
}
