//! Which dtype a job computes in: the request's `precision` against the
//! device the engine runs on.
//!
//! - On a GPU the request is honoured: `fp16`, `bf16` or `fp32`; a request
//!   without one computes in the family's default
//!   ([`ModelFamily::default_gpu_precision`]: bf16 for FLUX.1, fp16 for
//!   Stable Diffusion), as diffusers' examples load them.
//! - On the CPU the engine's own kernels compute in f32, and candle has no
//!   CPU half-precision matrix product, so a half-precision request
//!   computes in f32 and the job's warnings say so, unless the engine is
//!   told to honour it ([`super::EngineOptions::half_precision_on_cpu`]):
//!   then each layer widens its half-precision input to f32, accumulates in
//!   f32 and rounds its output back (`models::layers`), which gives a
//!   half-precision run's numbers but not its speed.

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
/// the CPU (see the module documentation).
pub fn compute_precision(
    device: &Device,
    requested: Option<Precision>,
    family: Option<ModelFamily>,
    half_on_cpu: bool,
) -> ComputePrecision {
    if device.is_cpu() {
        return match requested {
            Some(p) if p != Precision::Fp32 && half_on_cpu => ComputePrecision {
                dtype: dtype_of(p),
                warning: None,
            },
            Some(p) if p != Precision::Fp32 => ComputePrecision {
                dtype: DType::F32,
                warning: Some(format!(
                    "precision: {p} was requested, but the CPU computes in fp32 (the engine's CPU \
                     kernels are f32; half precision runs on a GPU, --device cuda)"
                )),
            },
            _ => ComputePrecision {
                dtype: DType::F32,
                warning: None,
            },
        };
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
    fn the_cpu_computes_f32_and_says_so_unless_told_otherwise() {
        let cpu = Device::Cpu;
        let sd = Some(ModelFamily::StableDiffusion);
        let p = compute_precision(&cpu, Some(Precision::Bf16), sd, false);
        assert_eq!(p.dtype, DType::F32);
        let w = p.warning.expect("a warning");
        assert!(w.contains("bf16") && w.contains("fp32"), "{w}");
        assert_eq!(compute_precision(&cpu, None, sd, false).warning, None);
        assert_eq!(
            compute_precision(&cpu, Some(Precision::Fp32), sd, false),
            ComputePrecision {
                dtype: DType::F32,
                warning: None
            }
        );
        let honoured = compute_precision(&cpu, Some(Precision::Fp16), sd, true);
        assert_eq!((honoured.dtype, honoured.warning), (DType::F16, None));
        // No request: f32 on the CPU even when half precision is allowed.
        assert_eq!(compute_precision(&cpu, None, sd, true).dtype, DType::F32);
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
