//! The engine's front door (stub while being written).
pub mod cache;
pub mod memory;
pub use memory::estimate_model_bytes;
