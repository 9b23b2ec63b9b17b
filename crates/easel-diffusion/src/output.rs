//! 8-bit images out of a pipeline run, for callers that never see tensors
//! (the CLI, the server's worker).

use candle_core::Tensor;

use crate::error::Result;
use crate::pipelines::{DiffusionPipeline, GenerationRequest, RunContext, StageTimings};

/// Quantise `(batch, H, W, 3)` float images in [0, 1] to RGB8 as diffusers'
/// `numpy_to_pil` does: `round(x * 255)`, ties to even like NumPy.
/// One `H * W * 3` buffer per image, in batch order.
pub fn images_to_rgb8(images: &Tensor) -> Result<Vec<Vec<u8>>> {
    let (b, _, _, _) = images.dims4()?;
    (0..b)
        .map(|i| {
            let v: Vec<f32> = images.get(i)?.flatten_all()?.to_vec1()?;
            Ok(v.iter()
                .map(|x| (x * 255.0).round_ties_even().clamp(0.0, 255.0) as u8)
                .collect())
        })
        .collect()
}

/// The images of a run as RGB8, with what the run reports.
#[derive(Debug, Clone)]
pub struct Rgb8Output {
    /// Width of every image, in pixels.
    pub width: usize,
    /// Height of every image, in pixels.
    pub height: usize,
    /// One `width * height * 3` RGB buffer per image, in batch order
    /// (prompt-major: all images of prompt 0, then prompt 1, ...).
    pub images: Vec<Vec<u8>>,
    /// The scheduler class that ran.
    pub scheduler: String,
    /// Its σ ramp when not the class default (`karras`, `exponential`).
    pub sigma_schedule: Option<String>,
    /// Things the user should know (e.g. a truncated prompt).
    pub warnings: Vec<String>,
    /// Per-stage timings.
    pub timings: StageTimings,
}

impl dyn DiffusionPipeline {
    /// [`DiffusionPipeline::run`], then [`images_to_rgb8`].
    pub fn run_rgb8(
        &self,
        request: &GenerationRequest,
        ctx: &mut RunContext<'_>,
    ) -> Result<Rgb8Output> {
        let output = self.run(request, ctx)?;
        let (_, height, width, _) = output.images.dims4()?;
        Ok(Rgb8Output {
            width,
            height,
            images: images_to_rgb8(&output.images)?,
            scheduler: output.scheduler,
            sigma_schedule: output.sigma_schedule,
            warnings: output.warnings,
            timings: output.timings,
        })
    }
}
