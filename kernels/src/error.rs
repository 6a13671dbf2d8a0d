//! The crate's error type.

use thiserror::Error;

/// Errors from quantization, the Hadamard transform and the CPU kernels.
///
/// Every variant names the tensor (or operand) it is about.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum KernelError {
    /// The input holds a NaN or an infinity.
    #[error("tensor `{tensor}`: non-finite value {value} at [{row}, {col}]")]
    NonFinite {
        /// Name of the offending tensor.
        tensor: String,
        /// Row of the first non-finite element.
        row: usize,
        /// Column of the first non-finite element.
        col: usize,
        /// The value found there.
        value: f32,
    },
    /// A shape or buffer length does not fit the operation.
    #[error("tensor `{tensor}`: {detail}")]
    Shape {
        /// Name of the offending tensor or operand.
        tensor: String,
        /// What is wrong, with the sizes involved.
        detail: String,
    },
    /// A kernel backend was requested that this CPU does not support.
    #[error("backend {backend} is not supported by this CPU")]
    UnsupportedBackend {
        /// The requested backend.
        backend: &'static str,
    },
    /// The CUDA path failed: no driver or NVRTC library, no device, a kernel that did not
    /// compile or launch, or a request the CUDA kernels do not support. The detail names the
    /// operation (and the tensor, where there is one).
    #[cfg(feature = "cuda")]
    #[error("CUDA: {detail}")]
    Cuda {
        /// What failed, and why.
        detail: String,
    },
}

impl KernelError {
    /// True for [`KernelError::NonFinite`].
    pub fn is_non_finite(&self) -> bool {
        matches!(self, KernelError::NonFinite { .. })
    }

    /// True for [`KernelError::Shape`].
    pub fn is_shape(&self) -> bool {
        matches!(self, KernelError::Shape { .. })
    }

    /// True for [`KernelError::Cuda`].
    #[cfg(feature = "cuda")]
    pub fn is_cuda(&self) -> bool {
        matches!(self, KernelError::Cuda { .. })
    }

    #[cfg(feature = "cuda")]
    pub(crate) fn cuda(detail: impl Into<String>) -> Self {
        KernelError::Cuda {
            detail: detail.into(),
        }
    }

    pub(crate) fn shape(tensor: &str, detail: impl Into<String>) -> Self {
        KernelError::Shape {
            tensor: tensor.to_string(),
            detail: detail.into(),
        }
    }
}
