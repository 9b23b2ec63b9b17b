//! Where models compute: `--device auto|cpu|cuda|cuda:N`, the server's
//! `device` key and `EASEL_DEVICE`, resolved to a candle [`Device`].
//!
//! * `cpu`: the CPU (the engine's own f32 kernels where they apply).
//! * `cuda` / `cuda:N`: CUDA device `N` (`cuda` is `cuda:0`, as in
//!   PyTorch). It needs a build with the `cuda` cargo feature (candle's
//!   CUDA backend) and a GPU that opens; otherwise resolving it is an error
//!   naming the device and the cause, never a silent run on the CPU.
//! * `auto` (the default): `cuda:0` when this build has the `cuda` feature
//!   and that device opens, else the CPU; the choice is logged.
//!
//! Whether a GPU is usable is found by opening it: candle's
//! `utils::cuda_is_available()` only says whether the backend was compiled
//! in, not whether a device is present.

use std::fmt;
use std::str::FromStr;

/// The candle device a [`DeviceSpec`] opens (re-exported so that callers
/// need not depend on candle).
pub use candle_core::Device;
use candle_core::DeviceLocation;

use crate::{Error, Result};

/// Whether this build has candle's CUDA backend (the `cuda` feature).
pub const CUDA_COMPILED: bool = cfg!(feature = "cuda");

/// The values a device may be written as, for error messages.
pub const DEVICE_NAMES: &str = "auto, cpu, cuda, cuda:N (N = the GPU's index, from 0)";

/// A device as requested (`--device`, `device = ...`, `EASEL_DEVICE`),
/// before it is opened ([`DeviceSpec::resolve`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DeviceSpec {
    /// A present, compiled-in GPU (`cuda:0`), else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA device by ordinal (`cuda` = `cuda:0`).
    Cuda(usize),
}

/// A device name that is not one of [`DEVICE_NAMES`]. Its message names
/// the value and the allowed ones; the caller names the field (`--device`,
/// `device`, `EASEL_DEVICE`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{value}` is not a device; allowed: {DEVICE_NAMES}")]
pub struct ParseDeviceError {
    /// The text as given.
    pub value: String,
}

impl FromStr for DeviceSpec {
    type Err = ParseDeviceError;

    /// `auto`, `cpu`, `cuda` or `cuda:N`, case-insensitive, surrounding
    /// blanks ignored.
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let err = || ParseDeviceError {
            value: s.to_string(),
        };
        let lower = s.trim().to_ascii_lowercase();
        match lower.as_str() {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            other => {
                let ordinal = other.strip_prefix("cuda:").ok_or_else(err)?;
                // Digits only: `usize::from_str` would take `+1`.
                if ordinal.is_empty() || !ordinal.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(err());
                }
                ordinal.parse().map(DeviceSpec::Cuda).map_err(|_| err())
            }
        }
    }
}

impl fmt::Display for DeviceSpec {
    /// The canonical spelling: `auto`, `cpu`, `cuda:N`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl serde::Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl DeviceSpec {
    /// Open the device.
    ///
    /// `auto` never fails: it is `cuda:0` when this build has CUDA and that
    /// device opens, else the CPU (logged at info level, with the reason).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for field `device` when `cuda` / `cuda:N`
    /// is asked of a build without the `cuda` feature (saying to rebuild
    /// with `--features cuda`), or when the device cannot be opened: no
    /// driver, no such ordinal (the message gives the device count), or
    /// CUDA's own error.
    pub fn resolve(&self) -> Result<Device> {
        match *self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Auto => {
                if !CUDA_COMPILED {
                    tracing::info!("device auto: the CPU (this build has no CUDA support)");
                    return Ok(Device::Cpu);
                }
                match open_cuda(0) {
                    Ok(device) => {
                        tracing::info!("device auto: cuda:0");
                        Ok(device)
                    }
                    Err(cause) => {
                        tracing::info!("device auto: the CPU (cuda:0 is not usable: {cause})");
                        Ok(Device::Cpu)
                    }
                }
            }
            DeviceSpec::Cuda(ordinal) => {
                if !CUDA_COMPILED {
                    return Err(Error::invalid(
                        "device",
                        format!(
                            "`{self}` needs CUDA, and this easel was built without it: rebuild \
                             with `cargo build --release --features cuda` (README: GPU (CUDA)), \
                             or use --device cpu"
                        ),
                    ));
                }
                open_cuda(ordinal).map_err(|cause| {
                    Error::invalid("device", format!("`{self}` cannot be used: {cause}"))
                })
            }
        }
    }
}

/// How a device is written in records and logs: `cpu`, `cuda:0`,
/// `metal:0` (the spelling `--device` takes).
pub fn device_name(device: &Device) -> String {
    match device.location() {
        DeviceLocation::Cpu => "cpu".into(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Where a pipeline's weights live between uses (`--offload
/// none|model|sequential`, diffusers' names; see
/// [`crate::pipelines::offload`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Offload {
    /// Every component resident on the device.
    #[default]
    None,
    /// diffusers' `enable_model_cpu_offload()`: weights in host memory,
    /// each component built on the device while its stage runs.
    Model,
    /// diffusers' `enable_sequential_cpu_offload()`: weights in host
    /// memory, each layer's moved to the device for its own forward pass.
    Sequential,
}

impl Offload {
    /// The accepted names, as [`FromStr`] reads them.
    pub const NAMES: [&'static str; 3] = ["none", "model", "sequential"];

    /// The lower-case name (`none`, `model`, `sequential`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Model => "model",
            Self::Sequential => "sequential",
        }
    }

    /// The device the components' weights are built on: the compute
    /// `device`, except under `sequential` offload, where they stay on the
    /// CPU and each layer moves its own.
    pub fn weights_device(self, device: &Device) -> Device {
        match self {
            Self::Sequential => Device::Cpu,
            Self::None | Self::Model => device.clone(),
        }
    }

    /// Where the weights are kept between uses: the CPU under `model` and
    /// `sequential` offload, the compute `device` otherwise.
    pub fn host_device(self, device: &Device) -> Device {
        match self {
            Self::None => device.clone(),
            Self::Model | Self::Sequential => Device::Cpu,
        }
    }
}

impl fmt::Display for Offload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for Offload {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Offload {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl FromStr for Offload {
    type Err = Error;

    /// `none`, `model` or `sequential` (case-insensitive).
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" => Ok(Self::None),
            "model" => Ok(Self::Model),
            "sequential" => Ok(Self::Sequential),
            other => Err(Error::invalid(
                "offload",
                format!(
                    "`{other}` is not an offload mode (allowed: {})",
                    Self::NAMES.join(", ")
                ),
            )),
        }
    }
}

/// Open CUDA device `ordinal`, first checking it exists so that an ordinal
/// past the count says how many there are. The error is the cause, in words.
#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> std::result::Result<Device, String> {
    use candle_core::cuda_backend::cudarc::driver::CudaContext;
    let count = CudaContext::device_count()
        .map_err(|e| format!("the CUDA driver cannot be initialised ({e})"))?;
    let count = usize::try_from(count).unwrap_or(0);
    if ordinal >= count {
        return Err(match count {
            0 => "the CUDA driver reports no GPU".to_string(),
            1 => "this machine has 1 CUDA device (cuda:0)".to_string(),
            n => format!(
                "this machine has {n} CUDA devices (cuda:0 to cuda:{})",
                n - 1
            ),
        });
    }
    Device::new_cuda(ordinal).map_err(|e| format!("opening it failed: {e}"))
}

/// Without the `cuda` feature no CUDA device opens.
#[cfg(not(feature = "cuda"))]
fn open_cuda(_ordinal: usize) -> std::result::Result<Device, String> {
    Err("this build has no CUDA support".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_four_forms_case_insensitively() {
        for (text, spec) in [
            ("auto", DeviceSpec::Auto),
            ("AUTO", DeviceSpec::Auto),
            ("cpu", DeviceSpec::Cpu),
            (" Cpu ", DeviceSpec::Cpu),
            ("cuda", DeviceSpec::Cuda(0)),
            ("CUDA:0", DeviceSpec::Cuda(0)),
            ("cuda:3", DeviceSpec::Cuda(3)),
            ("cuda:12", DeviceSpec::Cuda(12)),
        ] {
            assert_eq!(text.parse::<DeviceSpec>(), Ok(spec), "{text}");
        }
        assert_eq!(DeviceSpec::default(), DeviceSpec::Auto);
    }

    #[test]
    fn display_round_trips_in_the_canonical_spelling() {
        for spec in [DeviceSpec::Auto, DeviceSpec::Cpu, DeviceSpec::Cuda(2)] {
            assert_eq!(spec.to_string().parse::<DeviceSpec>(), Ok(spec));
        }
        assert_eq!("CUDA".parse::<DeviceSpec>().unwrap().to_string(), "cuda:0");
    }

    #[test]
    fn other_text_is_refused_with_the_allowed_values() {
        for text in [
            "", "gpu", "cuda:", "cuda:x", "cuda:-1", "cuda:+1", "cuda0", "cuda:1:2", "metal",
            "cpu:0",
        ] {
            let e = text.parse::<DeviceSpec>().unwrap_err();
            let message = e.to_string();
            assert!(
                message.contains(&format!("`{text}`"))
                    && message.contains("auto, cpu, cuda, cuda:N"),
                "{text}: {message}"
            );
        }
    }

    #[test]
    fn serde_reads_and_writes_the_text() {
        let spec: DeviceSpec = serde_json::from_str("\"Cuda:1\"").unwrap();
        assert_eq!(spec, DeviceSpec::Cuda(1));
        assert_eq!(serde_json::to_string(&spec).unwrap(), "\"cuda:1\"");
        let e = serde_json::from_str::<DeviceSpec>("\"tpu\"").unwrap_err();
        assert!(e.to_string().contains("`tpu` is not a device"), "{e}");
    }

    #[test]
    fn cpu_resolves_to_the_cpu() {
        let device = DeviceSpec::Cpu.resolve().unwrap();
        assert!(device.is_cpu());
        assert_eq!(device_name(&device), "cpu");
    }

    /// Without the `cuda` feature, `auto` is the CPU and an explicit CUDA
    /// device is an error saying how to get one.
    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_cpu_only_build_runs_auto_on_the_cpu_and_refuses_cuda() {
        assert!(DeviceSpec::Auto.resolve().unwrap().is_cpu());
        for spec in [DeviceSpec::Cuda(0), DeviceSpec::Cuda(1)] {
            let e = spec.resolve().unwrap_err().to_string();
            assert!(
                e.starts_with("device: ")
                    && e.contains(&format!("`{spec}`"))
                    && e.contains("--features cuda"),
                "{e}"
            );
        }
    }

    /// With the `cuda` feature, an ordinal past any machine's GPU count is
    /// an error naming the device and the cause (on a machine without a
    /// GPU, the driver's); `auto` opens a device either way.
    #[cfg(feature = "cuda")]
    #[test]
    fn a_cuda_build_names_a_device_that_is_not_there() {
        let spec = DeviceSpec::Cuda(4096);
        let e = spec.resolve().unwrap_err().to_string();
        assert!(
            e.starts_with("device: `cuda:4096` cannot be used: ") && !e.contains("--features"),
            "{e}"
        );
        let auto = DeviceSpec::Auto.resolve().unwrap();
        assert!(auto.is_cpu() || device_name(&auto) == "cuda:0");
    }
}
