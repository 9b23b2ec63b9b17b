//! `--device auto|cpu|cuda|cuda:N` (or `EASEL_DEVICE`) for the commands
//! that run the engine here: generate, bench, flow run.

use anyhow::{anyhow, Result};
use clap::Args;
use easel_diffusion::device::{Device, DeviceSpec};

/// Where the models compute.
#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    /// Where the models compute: auto (the first GPU when this easel was
    /// built with `--features cuda` and one is present, else the CPU), cpu,
    /// cuda (= cuda:0) or cuda:N. A CUDA device that is absent, or not built
    /// in, stops with the reason; it never falls back to the CPU.
    #[arg(
        long,
        env = "EASEL_DEVICE",
        default_value = "auto",
        value_name = "auto|cpu|cuda|cuda:N"
    )]
    pub device: DeviceSpec,
}

impl DeviceArgs {
    /// Open the device (`auto`: see [`DeviceSpec::resolve`]).
    ///
    /// # Errors
    /// `--device: ...` naming the device and why it cannot be used.
    pub fn open(&self) -> Result<Device> {
        self.device.resolve().map_err(|e| {
            let message = e.to_string();
            match message.strip_prefix("device: ") {
                Some(rest) => anyhow!("--device: {rest}"),
                None => anyhow!("--device: {message}"),
            }
        })
    }
}
