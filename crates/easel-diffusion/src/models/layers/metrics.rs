//! What the layers count for `easel bench`: FLOPs of the matrix-product
//! layers, wall time per layer kind, which half-precision path each layer
//! call took, and the machine's own matrix-product peaks to report model
//! speed against.

use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::Tensor;

use super::kernels;
use crate::error::{Error, Result};

static FLOPS: AtomicU64 = AtomicU64::new(0);

/// Floating-point operations done by the matrix-product layers (linear,
/// convolution, attention) of this process so far; a multiply-add counts
/// two. Benchmarks read it before and after a model call to report
/// effective GFLOP/s. Element-wise work (norms, activations) is not counted.
pub fn flops() -> u64 {
    FLOPS.load(Ordering::Relaxed)
}

pub(super) fn count_flops(n: usize) {
    FLOPS.fetch_add(n as u64, Ordering::Relaxed);
}

/// The layer kinds whose wall time [`profile`] reports.
pub const PROFILE_KINDS: [&str; 6] = [
    "conv3x3",
    "conv1x1",
    "conv (other)",
    "linear",
    "attention",
    "group norm",
];
static PROFILE_NS: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];

/// Wall time spent so far in each kind of layer of [`PROFILE_KINDS`], in
/// seconds, for benchmarks that break a model call down.
pub fn profile() -> Vec<(&'static str, f64)> {
    PROFILE_KINDS
        .iter()
        .zip(&PROFILE_NS)
        .map(|(k, ns)| (*k, ns.load(Ordering::Relaxed) as f64 * 1e-9))
        .collect()
}

pub(super) fn timed<T>(kind: usize, f: impl FnOnce() -> T) -> T {
    let start = std::time::Instant::now();
    let out = f();
    PROFILE_NS[kind].fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    out
}

pub(super) static BF16_KERNEL_LAYERS: AtomicU64 = AtomicU64::new(0);
pub(super) static WIDENED_LAYERS: AtomicU64 = AtomicU64::new(0);

/// How the half-precision CPU layer calls of this process so far ran:
/// `(bf16_kernels, widened)`, the calls of linear, convolution and
/// attention layers that ran on the bf16 kernels ([`kernels::linear_bf16`],
/// [`kernels::conv_bf16`], [`kernels::attention_bf16`]: bf16 products, f32
/// accumulation) and those that
/// widened their half-precision input to f32 and ran the f32 path
/// ([`half_on_cpu`]'s route: no AVX512-BF16, an f16 model, a quantized
/// weight, a layer shape the bf16 kernels do not cover). Benchmarks read it
/// before and after a run to report which compute path ran.
pub fn half_precision_paths() -> (u64, u64) {
    (
        BF16_KERNEL_LAYERS.load(Ordering::Relaxed),
        WIDENED_LAYERS.load(Ordering::Relaxed),
    )
}

/// The machine's matrix-product throughput on the engine's own matmul path,
/// in GFLOP/s: the best of `repeats` products of two `n`×`n` matrices of
/// `dtype` (after one warm-up). Benchmarks report model speed against it.
///
/// Errors: when the dtype has no CPU matmul.
pub fn measure_matmul_gflops(dtype: candle_core::DType, n: usize, repeats: usize) -> Result<f64> {
    let device = candle_core::Device::Cpu;
    let a = Tensor::randn(0f32, 1f32, (n, n), &device)?.to_dtype(dtype)?;
    let b = Tensor::randn(0f32, 1f32, (n, n), &device)?.to_dtype(dtype)?;
    let _ = a.matmul(&b)?;
    let mut best = f64::INFINITY;
    for _ in 0..repeats.max(1) {
        let start = std::time::Instant::now();
        let c = a.matmul(&b)?;
        // Touch the result so the product is not skipped.
        let _ = c.dims();
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n as f64).powi(3) / best / 1e9)
}

/// The bf16 kernel's matrix-product throughput, in GFLOP/s: the best of
/// `repeats` products `A · Bᵀ` of two `n`×`n` bf16 matrices with f32
/// accumulation on [`kernels::linear_bf16`] (AVX512-BF16 `vdpbf16ps`;
/// the weight packing each call does is included), after one warm-up.
/// Benchmarks report a bf16 model's speed against it.
///
/// Errors: the CPU has no AVX512-BF16 ([`kernels::bf16_gemm_available`]).
pub fn measure_bf16_gemm_gflops(n: usize, repeats: usize) -> Result<f64> {
    if !kernels::bf16_gemm_available() {
        return Err(Error::invalid(
            "bf16 gemm",
            "this CPU has no AVX512-BF16 (vdpbf16ps)",
        ));
    }
    let values = |seed: u32| -> Vec<half::bf16> {
        (0..n * n)
            .map(|i| {
                half::bf16::from_f32(
                    ((i as u32).wrapping_mul(2654435761) ^ seed) as f32 / u32::MAX as f32 - 0.5,
                )
            })
            .collect()
    };
    let (a, b) = (values(1), values(2));
    let _ = kernels::linear_bf16(&a, n, n, &b, &[], n);
    let mut best = f64::INFINITY;
    for _ in 0..repeats.max(1) {
        let start = std::time::Instant::now();
        let c = kernels::linear_bf16(&a, n, n, &b, &[], n);
        std::hint::black_box(&c);
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n as f64).powi(3) / best / 1e9)
}
