//! easel's diffusion engine.
//!
//! Layout (see `docs/ARCHITECTURE.md`): `loader` resolves a model reference
//! and reads its configs; `tokenizer` and `models` hold the text encoders,
//! UNet and VAE; `schedulers` the samplers; `pipelines` the numbered stages
//! that tie them together; `noise` the torch-compatible seeded noise.

pub mod device;
pub mod engine;
pub mod error;
pub mod image_processor;
pub mod json;
pub mod loader;
pub mod lora;
pub mod models;
pub mod noise;
pub mod os_memory;
pub mod output;
pub mod pipelines;
pub mod schedulers;
pub mod tokenizer;

pub use error::{Error, Result};
