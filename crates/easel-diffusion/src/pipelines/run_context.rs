//! Per-run inputs that are not part of the request: progress reports, the
//! cancel token, and the [`RunContext`] that carries them with the noise.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::noise::NoiseSource;

/// A progress report from a running pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// The prompt has been encoded.
    PromptEncoded,
    /// Denoising step `step` (1-based) of `total` finished.
    Step { step: usize, total: usize },
    /// The latents have been decoded to images.
    Decoded,
}

/// A cancel token: cheap to clone, checked before every denoising step.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token that is not canceled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Ask the job to stop at its next check.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether [`CancelToken::cancel`] was called.
    pub fn is_canceled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    pub(super) fn check(&self) -> Result<()> {
        if self.is_canceled() {
            Err(Error::Canceled)
        } else {
            Ok(())
        }
    }
}

/// Per-run inputs that are not part of the request: where the randomness
/// comes from, who hears about progress, and how to cancel.
pub struct RunContext<'a> {
    /// Gaussian draws in pipeline order (initial latents first).
    pub noise: &'a mut dyn NoiseSource,
    /// Called after each stage and each denoising step.
    pub progress: &'a mut dyn FnMut(Progress),
    /// Checked before every denoising step.
    pub cancel: CancelToken,
}

impl RunContext<'_> {
    /// Tell the caller about `progress`. At the end of a stage (the prompt
    /// encoded, the last denoising step, the latents decoded) the memory the
    /// stage freed is first handed back to the operating system
    /// ([`crate::os_memory::release_freed_memory`]): the allocator would
    /// otherwise keep a stage's freed activations (over 1 GiB after a FLUX
    /// step at 1024²) resident under the next stage's own.
    pub(super) fn report(&mut self, progress: Progress) {
        let stage_end = match progress {
            Progress::PromptEncoded | Progress::Decoded => true,
            Progress::Step { step, total } => step == total,
        };
        if stage_end {
            crate::os_memory::release_freed_memory();
        }
        (self.progress)(progress);
    }
}
