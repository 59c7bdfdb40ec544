//! `.safetensors` inputs: which tensor of a file an input is (`--tensor`),
//! and its elements in the dtypes the readers of `npy.rs` accept.

use super::CliError;
use safetensors::{Dtype, SafeTensors};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// `--tensor [INPUT=]NAME`, shared by the commands that read arrays.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TensorArgs {
    /// The tensor of a .safetensors input: NAME for every such input, or
    /// INPUT=NAME for one (INPUT its flag without dashes, e.g. student=logits);
    /// repeatable. Without it a .safetensors input must hold exactly one tensor.
    #[arg(long = "tensor", value_name = "[INPUT=]NAME")]
    tensor: Vec<String>,
}

/// The parsed `--tensor` values.
#[derive(Debug, Default)]
struct Names {
    all: Option<String>,
    per_input: Vec<(String, String)>,
}

/// Set once per process by [`TensorArgs::install`], read by [`read_with`].
static NAMES: OnceLock<Names> = OnceLock::new();

/// Whether `path` names a .safetensors file (by its extension).
pub fn is_safetensors(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "safetensors")
}

impl TensorArgs {
    /// Checks the `--tensor` values against the command's `inputs` (flag,
    /// path) and makes them the ones [`read_with`] uses. A value that would
    /// be ignored is an error: an unknown INPUT, or `--tensor` with no
    /// .safetensors input among the ones it could name.
    pub fn install(&self, inputs: &[(&str, Option<&PathBuf>)]) -> Result<(), CliError> {
        let mut names = Names::default();
        let st_inputs: Vec<&str> = inputs
            .iter()
            .filter(|(_, p)| p.is_some_and(|p| is_safetensors(p)))
            .map(|(f, _)| f.trim_start_matches('-'))
            .collect();
        for v in &self.tensor {
            match v.split_once('=') {
                Some((input, name)) => {
                    let known: Vec<&str> = inputs
                        .iter()
                        .map(|(f, _)| f.trim_start_matches('-'))
                        .collect();
                    if !known.contains(&input) {
                        return Err(CliError::Msg(format!(
                            "--tensor {v}: `{input}` is not an input of this command (one of: {})",
                            known.join(", ")
                        )));
                    }
                    if !st_inputs.contains(&input) {
                        return Err(CliError::Msg(format!(
                            "--tensor {v}: --{input} is not a .safetensors file"
                        )));
                    }
                    if name.is_empty() {
                        return Err(CliError::Msg(format!("--tensor {v}: the name is empty")));
                    }
                    if names.per_input.iter().any(|(i, _)| i == input) {
                        return Err(CliError::Msg(format!(
                            "--tensor names the tensor of --{input} twice"
                        )));
                    }
                    names.per_input.push((input.to_string(), name.to_string()));
                }
                None => {
                    if v.is_empty() {
                        return Err(CliError::Msg("--tensor: the name is empty".into()));
                    }
                    if names.all.is_some() {
                        return Err(CliError::Msg(
                            "--tensor NAME is given twice: name one input's tensor with \
                             --tensor INPUT=NAME"
                                .into(),
                        ));
                    }
                    if st_inputs.is_empty() {
                        return Err(CliError::Msg(format!(
                            "--tensor {v}: no input is a .safetensors file"
                        )));
                    }
                    names.all = Some(v.clone());
                }
            }
        }
        NAMES
            .set(names)
            .map_err(|_| CliError::Msg("internal: --tensor installed twice".into()))
    }
}

/// The tensor name `--tensor` gives the input `arg` (`--student`), if any.
fn name_for(arg: &str) -> Option<&'static str> {
    let names = NAMES.get()?;
    let input = arg.trim_start_matches('-');
    names
        .per_input
        .iter()
        .find(|(i, _)| i == input)
        .map(|(_, n)| n.as_str())
        .or(names.all.as_deref())
}

fn err(path: &Path, what: impl std::fmt::Display) -> CliError {
    CliError::Msg(format!("{}: {what}", path.display()))
}

/// Reads the input `arg`'s tensor of the .safetensors file `path` and hands
/// its dtype, shape and little-endian bytes to `f`.
pub fn read_with<T>(
    path: &Path,
    arg: &str,
    f: impl FnOnce(Dtype, &[usize], &[u8]) -> Result<T, CliError>,
) -> Result<T, CliError> {
    let buf = std::fs::read(path).map_err(|e| err(path, format!("cannot open {arg}: {e}")))?;
    let st = SafeTensors::deserialize(&buf)
        .map_err(|e| err(path, format!("not a valid .safetensors file ({arg}): {e}")))?;
    let mut names = st.names();
    names.sort();
    let name = match name_for(arg) {
        Some(n) => n,
        None if names.len() == 1 => names[0],
        None => {
            return Err(err(
                path,
                format!(
                    "{arg} holds {} tensors ({}): name one with --tensor NAME or --tensor {}=NAME",
                    names.len(),
                    names.join(", "),
                    arg.trim_start_matches('-')
                ),
            ))
        }
    };
    let view = st.tensor(name).map_err(|_| {
        err(
            path,
            format!(
                "{arg} has no tensor `{name}` (--tensor); it holds: {}",
                names.join(", ")
            ),
        )
    })?;
    f(view.dtype(), view.shape(), view.data())
        .map_err(|e| CliError::Msg(format!("{e} (tensor `{name}`)")))
}

/// Little-endian elements of `N` bytes, converted by `conv`.
fn le<const N: usize, T>(bytes: &[u8], conv: impl Fn([u8; N]) -> T) -> Vec<T> {
    bytes
        .chunks_exact(N)
        .map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            conv(a)
        })
        .collect()
}

/// The elements of a float tensor as f32 (F32, BF16 and F16 exact, F64 rounded).
pub fn floats(path: &Path, arg: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>, CliError> {
    Ok(match dtype {
        Dtype::F32 => le(bytes, f32::from_le_bytes),
        Dtype::BF16 => le(bytes, |b| half::bf16::from_le_bytes(b).to_f32()),
        Dtype::F16 => le(bytes, |b| half::f16::from_le_bytes(b).to_f32()),
        Dtype::F64 => le(bytes, |b| f64::from_le_bytes(b) as f32),
        d => {
            return Err(err(
                path,
                format!("{arg} has unsupported dtype {d} (expected F32, BF16, F16 or F64)"),
            ))
        }
    })
}

/// Integer elements in their own width.
pub enum Ints {
    /// I32 elements.
    I32(Vec<i32>),
    /// I64 elements.
    I64(Vec<i64>),
}

/// The elements of an I32 or I64 tensor.
pub fn ints(path: &Path, arg: &str, dtype: Dtype, bytes: &[u8]) -> Result<Ints, CliError> {
    match dtype {
        Dtype::I32 => Ok(Ints::I32(le(bytes, i32::from_le_bytes))),
        Dtype::I64 => Ok(Ints::I64(le(bytes, i64::from_le_bytes))),
        d => Err(err(
            path,
            format!("{arg} has unsupported dtype {d} (expected I32 or I64)"),
        )),
    }
}
