//! Memory modes for models larger than the compute device's memory, as
//! diffusers names them (`--offload none|model|sequential`):
//!
//! * `none`: every component resident on the device (the default).
//! * `model`: diffusers' `enable_model_cpu_offload()`. Every component's
//!   weights are kept in host memory (RAM, in the compute dtype, with the
//!   merged LoRA updates kept apart); a component is built on the device
//!   when its stage runs (text encoders for the prompt, the denoiser for
//!   the whole denoising loop, the VAE for the decode) and freed after it,
//!   so the device holds one component and its activations at a time.
//! * `sequential`: diffusers' `enable_sequential_cpu_offload()`. The
//!   components are built in host memory and each layer moves its weights
//!   to the device for its own forward pass and frees them after it
//!   (`models::layers`: [`crate::models::layers::on_device`]), so the
//!   device holds one layer's weights and the activations: the least
//!   memory and the slowest mode (every weight crosses the bus once per
//!   call).
//!
//! The numbers do not change with the mode: the same weights, in the same
//! dtype, computed by the same kernels (tested on the CPU, where host and
//! device are one memory and `model` / `sequential` only change when
//! components are built).
//!
//! [`Held`] is a component under `model` offload (or resident).

use std::ops::Deref;

use crate::error::Result;
use crate::models::autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig};
use crate::models::clip_text::{ClipTextConfig, ClipTextModel};
use crate::models::flux_transformer::{FluxTransformer2DConfig, FluxTransformer2DModel};
use crate::models::t5::{T5Config, T5EncoderModel};
use crate::models::unet_2d_condition::{UNet2DConditionConfig, UNet2DConditionModel};

pub use crate::device::Offload;

/// A model that a pipeline can hold as a [`Held`] component: its config
/// answers the pipeline's questions (sizes, channels) while the model
/// itself is not built.
pub trait Component: Send + Sync + Sized {
    /// The model's config (`config.json`).
    type Config: Clone + Send + Sync;

    /// The config the model was built from.
    fn component_config(&self) -> &Self::Config;
}

macro_rules! component {
    ($model:ty, $config:ty) => {
        impl Component for $model {
            type Config = $config;
            fn component_config(&self) -> &$config {
                self.config()
            }
        }
    };
}
component!(AutoencoderKL, AutoencoderKLConfig);
component!(ClipTextModel, ClipTextConfig);
component!(T5EncoderModel, T5Config);
component!(UNet2DConditionModel, UNet2DConditionConfig);
component!(FluxTransformer2DModel, FluxTransformer2DConfig);

/// How an offloaded component is built on the device for one use.
type Build<M> = Box<dyn Fn() -> Result<M> + Send + Sync>;

/// A pipeline component, resident on the device or (`model` offload) built
/// there for each use from weights kept in host memory.
pub struct Held<M: Component> {
    config: M::Config,
    state: State<M>,
}

enum State<M> {
    Resident(M),
    OnUse(Build<M>),
}

/// A component ready to run: borrowed when resident, or built for this use
/// and freed when dropped.
pub enum InUse<'a, M> {
    /// The resident component.
    Resident(&'a M),
    /// Built on the device for this use (`model` offload).
    Built(M),
}

impl<M> Deref for InUse<'_, M> {
    type Target = M;

    fn deref(&self) -> &M {
        match self {
            InUse::Resident(m) => m,
            InUse::Built(m) => m,
        }
    }
}

impl<M: Component> Held<M> {
    /// Build the component with `build` (its weights checked against the
    /// config now, not at the first run), and keep it resident, or, when
    /// `offloaded`, free it and keep `build` to build it again at each use.
    ///
    /// Errors: those of `build`.
    pub fn load(
        offloaded: bool,
        build: impl Fn() -> Result<M> + Send + Sync + 'static,
    ) -> Result<Self> {
        let model = build()?;
        let config = model.component_config().clone();
        let state = if offloaded {
            drop(model);
            crate::os_memory::release_freed_memory();
            State::OnUse(Box::new(build))
        } else {
            State::Resident(model)
        };
        Ok(Self { config, state })
    }

    /// Whether the component is built for each use (`model` offload).
    pub fn offloaded(&self) -> bool {
        matches!(self.state, State::OnUse(_))
    }

    /// The component's config (no build needed).
    pub fn config(&self) -> &M::Config {
        &self.config
    }

    /// The component on the device: the resident one, or one built now
    /// from host memory (freed when the returned value is dropped).
    ///
    /// Errors: building failed (out of device memory, a tensor error).
    pub fn get(&self) -> Result<InUse<'_, M>> {
        match &self.state {
            State::Resident(m) => Ok(InUse::Resident(m)),
            State::OnUse(build) => Ok(InUse::Built(build()?)),
        }
    }
}
