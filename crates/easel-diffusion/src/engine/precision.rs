//! Which dtype a job computes in: the request's `precision` against the
//! device the engine runs on.
//!
//! - On a GPU the request is honoured: `fp16`, `bf16` or `fp32`; a request
//!   without one computes in the family's default
//!   ([`ModelFamily::default_gpu_precision`]: bf16 for FLUX.1, fp16 for
//!   Stable Diffusion), as diffusers' examples load them.
//! - On the CPU, `bf16` computes in bf16 where the CPU has AVX512-BF16
//!   (Intel Cooper Lake / Sapphire Rapids and later, AMD Zen 4 and later;
//!   detected at run time, [`crate::models::kernels::bf16_compute_available`]):
//!   the matrix products and convolutions on the engine's `vdpbf16ps`
//!   kernels with f32 accumulation, as oneDNN computes PyTorch's CPU bf16.
//!   `fp16` computes as bf16 there too (a CPU has no fast fp16 product) and
//!   the job's warnings say so. Elsewhere a half-precision request
//!   computes in f32 and the warnings say so. A request without a
//!   precision computes f32 on the CPU.
//! - [`super::EngineOptions::half_precision_on_cpu`] (`easel bench
//!   --precision`, the half-precision tests) honours `fp16` and `bf16`
//!   exactly on any CPU: layers without bf16 instructions widen their
//!   half-precision input to f32, accumulate in f32 and round their output
//!   back (`models::layers`), a half-precision run's numbers at f32 speed.

use candle_core::{DType, Device};
use easel_core::params::Precision;

use crate::loader::ModelFamily;

/// The dtype of a precision name.
pub fn dtype_of(precision: Precision) -> DType {
    match precision {
        Precision::Fp16 => DType::F16,
        Precision::Bf16 => DType::BF16,
        Precision::Fp32 => DType::F32,
    }
}

/// The precision name of a compute dtype (f32 for anything that is not a
/// half-precision float).
pub fn precision_of(dtype: DType) -> Precision {
    match dtype {
        DType::F16 => Precision::Fp16,
        DType::BF16 => Precision::Bf16,
        _ => Precision::Fp32,
    }
}

/// The compute precision a job runs in, and a warning when that is not
/// the one requested.
#[derive(Debug, Clone, PartialEq)]
pub struct ComputePrecision {
    /// The dtype the text encoders, denoiser and VAE compute in (the SDXL
    /// VAE upcasts f16 to f32 on its own, as diffusers').
    pub dtype: DType,
    /// Set when a requested precision is not what runs.
    pub warning: Option<String>,
}

/// Decide the compute precision of a job that asks for `requested` on a
/// model of `family` (`None`: not a known family; treated as Stable
/// Diffusion) running on `device`; `half_on_cpu` honours half precision on
/// the CPU exactly, `cpu_bf16` says the CPU runs the bf16 kernels (see the
/// module documentation).
pub fn compute_precision(
    device: &Device,
    requested: Option<Precision>,
    family: Option<ModelFamily>,
    half_on_cpu: bool,
    cpu_bf16: bool,
) -> ComputePrecision {
    if device.is_cpu() {
        let (dtype, warning) = match requested {
            Some(p) if p != Precision::Fp32 && half_on_cpu => (dtype_of(p), None),
            Some(Precision::Bf16) if cpu_bf16 => (DType::BF16, None),
            Some(Precision::Fp16) if cpu_bf16 => (
                DType::BF16,
                Some(
                    "precision: fp16 was requested; the CPU computes half precision as bf16 \
                     (AVX512-BF16 products with f32 accumulation; fp16 runs on a GPU, \
                     --device cuda)"
                        .to_string(),
                ),
            ),
            Some(p) if p != Precision::Fp32 => (
                DType::F32,
                Some(format!(
                    "precision: {p} was requested, but this CPU has no AVX512-BF16 \
                     instructions, so it computed fp32 (half precision runs as bf16 on CPUs with \
                     AVX512-BF16, or on a GPU, --device cuda)"
                )),
            ),
            _ => (DType::F32, None),
        };
        return ComputePrecision { dtype, warning };
    }
    let precision = requested.unwrap_or_else(|| {
        family
            .unwrap_or(ModelFamily::StableDiffusion)
            .default_gpu_precision()
    });
    ComputePrecision {
        dtype: dtype_of(precision),
        warning: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_computes_bf16_where_it_can_and_says_what_ran() {
        let cpu = Device::Cpu;
        let sd = Some(ModelFamily::StableDiffusion);
        let run = |p: Option<Precision>, exact: bool, bf16: bool| {
            compute_precision(&cpu, p, sd, exact, bf16)
        };
        // Without AVX512-BF16: f32, and the warning names both.
        let p = run(Some(Precision::Bf16), false, false);
        assert_eq!(p.dtype, DType::F32);
        let w = p.warning.expect("a warning");
        assert!(
            w.contains("bf16") && w.contains("fp32") && w.contains("AVX512-BF16"),
            "{w}"
        );
        assert_eq!(run(Some(Precision::Fp16), false, false).dtype, DType::F32);
        // With it: bf16 as asked; fp16 as bf16, with a warning.
        assert_eq!(
            run(Some(Precision::Bf16), false, true),
            ComputePrecision {
                dtype: DType::BF16,
                warning: None
            }
        );
        let p = run(Some(Precision::Fp16), false, true);
        assert_eq!(p.dtype, DType::BF16);
        let w = p.warning.expect("a warning");
        assert!(
            w.contains("fp16 was requested") && w.contains("bf16"),
            "{w}"
        );
        // fp32, or no request: f32 and no warning.
        for bf16 in [false, true] {
            assert_eq!(
                run(None, false, bf16),
                run(Some(Precision::Fp32), false, bf16)
            );
            assert_eq!(
                run(None, false, bf16),
                ComputePrecision {
                    dtype: DType::F32,
                    warning: None
                }
            );
            assert_eq!(run(None, true, bf16).dtype, DType::F32);
        }
        // Honoured exactly when the engine is told to.
        let honoured = run(Some(Precision::Fp16), true, true);
        assert_eq!((honoured.dtype, honoured.warning), (DType::F16, None));
    }

    #[test]
    fn names_and_dtypes_round_trip() {
        for p in [Precision::Fp16, Precision::Bf16, Precision::Fp32] {
            assert_eq!(precision_of(dtype_of(p)), p);
        }
        assert_eq!(ModelFamily::Flux.default_gpu_precision(), Precision::Bf16);
        assert_eq!(
            ModelFamily::StableDiffusionXl.default_gpu_precision(),
            Precision::Fp16
        );
    }
}
