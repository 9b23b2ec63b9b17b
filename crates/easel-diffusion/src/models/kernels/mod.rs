//! The engine's own CPU kernels for the operations that dominate diffusion
//! models: 3×3 convolution by Winograd F(2×2, 3×3) or as nine shifted
//! matrix products (reading PyTorch's weight layout in place), group norm
//! fused with SiLU, and attention computed block by block without
//! materialising the full score matrix, its softmax on a vectorised `exp`.
//! Linear layers and attention run on our own f32 GEMM micro-kernel where
//! the CPU has AVX-512F (`gemm_f32`, `attention_flash`); the
//! convolutions' products, and everything on other CPUs, go through the
//! `gemm` crate (runtime dispatch to AVX2/AVX-512/NEON micro-kernels).
//! Everything around them (layout, padding, softmax, normalisation) is
//! ours.
//!
//! All functions take and return contiguous row-major f32 buffers; shapes
//! are given explicitly. Results equal PyTorch's within float32 rounding.
//!
//! On CPUs with AVX512-BF16, `bf16` runs bf16 linear layers and 1×1 / 3×3
//! convolutions with f32 accumulation (`vdpbf16ps`), as oneDNN does for
//! PyTorch's CPU bf16, and `attention_bf16` attention's two products on it;
//! elsewhere bf16 layers widen to f32 and use the rest.
//!
//! Layout: `buffer` gives the kernels f32 views of tensors, `matmul` the
//! matrix products (`linear`; `gemm_f32` the AVX-512F kernel under it),
//! `conv` the 3×3 (direct and Winograd) and 1×1 convolutions, `norm` group
//! norm, `attention` blocked attention and its softmax (`attention_flash`
//! its AVX-512F flash form). Every kernel is re-exported here.

mod attention;
mod attention_bf16;
mod attention_flash;
mod bf16;
mod buffer;
mod conv;
mod conv_in_place;
mod conv_input;
mod elementwise;
mod gemm_f32;
mod matmul;
mod norm;
mod pack_f32;

pub use attention::{attention, exp_f32};
pub use attention_bf16::attention_bf16;
pub use bf16::{bf16_gemm_available, conv_bf16, linear_bf16, round_into};
pub use buffer::{
    applies, applies_bf16, applies_weight, bf16_compute_available, bf16_enabled, contiguous,
    enabled, tensor, to_f32, to_half, with_bf16, with_f32, with_f32_weight,
};
pub use conv::{
    conv1x1, conv1x1_add_into, conv3x3_prefers_winograd, conv3x3_same, conv3x3_same_from,
    conv3x3_winograd, conv3x3_winograd_from, winograd_filter, with_conv3x3_kernel, Conv3x3Kernel,
    WINOGRAD_MIN_CHANNELS,
};
pub use conv_in_place::{conv3x3_winograd_in_place, conv3x3_winograd_shrink_in_place, Shortcut1x1};
pub use conv_input::ConvInput;
pub use elementwise::{
    add_bf16, add_f32, add_per_plane_bf16, erf_f32, geglu_bf16, geglu_f32, upsample2x,
};
pub use matmul::{linear, linear_rows, linear_stored};
pub use norm::{group_norm, group_norm_affine, group_norm_bf16, NormInput};
pub use pack_f32::RowFormat;

/// Whether f32 linear layers and attention run on the engine's own
/// AVX-512F GEMM (`gemm_f32`: the CPU has AVX-512F and
/// `EASEL_F32_GEMM=portable` is not set), with f16 / bf16 linear weights
/// widened while their panels are packed; otherwise on the `gemm` crate,
/// the weights widened into a temporary f32 copy per layer first.
pub fn f32_gemm_native() -> bool {
    gemm_f32::available()
}

/// Threads the kernels use (rayon's pool, sized by `RAYON_NUM_THREADS` or the core count).
pub fn num_threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// How the `gemm` crate may split a product: over rayon's pool, or not at
/// all when it has one thread.
#[inline]
fn parallelism() -> gemm::Parallelism {
    match num_threads() {
        1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

/// Helpers the kernels' tests share.
#[cfg(test)]
pub(crate) mod testing {
    use candle_core::{Device, Tensor};

    /// Standard normal values of `shape`, torch-compatible for `seed`.
    pub fn randn(shape: &[usize], seed: u64) -> Tensor {
        crate::noise::TorchGenerator::new(seed)
            .randn_tensor(shape, &Device::Cpu)
            .unwrap()
    }

    /// The largest absolute difference between two tensors of one shape.
    pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }
}
