//! The library's error type: every failure is a value, never a panic.

/// Everything that can go wrong in kdfuse.
#[derive(Debug, thiserror::Error)]
pub enum KdError {
    /// An argument is out of its domain; names the argument and what was expected.
    #[error("invalid argument `{arg}`: {msg}")]
    InvalidArgument {
        /// The argument's name, as the API or CLI spells it.
        arg: &'static str,
        /// What was expected, and what was given.
        msg: String,
    },
    /// The CUDA backend cannot be used here (no driver, no GPU, no kernels).
    #[error("CUDA backend unavailable: {0}")]
    CudaUnavailable(String),
    /// A CUDA call failed.
    #[error("CUDA error: {0}")]
    Cuda(String),
}

/// `Result` with [`KdError`].
pub type Result<T> = std::result::Result<T, KdError>;

/// Shorthand for [`KdError::InvalidArgument`].
pub fn invalid<T>(arg: &'static str, msg: impl Into<String>) -> Result<T> {
    Err(KdError::InvalidArgument {
        arg,
        msg: msg.into(),
    })
}

impl From<cudarc::driver::DriverError> for KdError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        KdError::Cuda(e.to_string())
    }
}
