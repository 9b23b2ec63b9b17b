//! Time a CLIP text encoder alone, as a pipeline runs it under classifier-
//! free guidance: the prompt and the negative prompt, 77 tokens each, on
//! random weights stored as f16 (as published checkpoints store them).
//! The peer is `tools/bench_diffusers.py`'s "text encoding" row (the same
//! two forward passes in transformers).
//!
//!     cargo run --release -p easel-diffusion --example text_encoder_bench \
//!         [folder with config.json, default ../shared/bench-models/sd15/text_encoder] [runs]
//!
//! Prints the best and the median of `runs` (default 10) after one
//! warm-up. `easel bench`'s "text encoding" stage also counts tokenizing
//! and the memory its first allocations fault in after the previous
//! image's decode.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device};
use easel_diffusion::models::clip_text::{ClipTextConfig, ClipTextModel};
use easel_diffusion::models::weights::{RandomSource, Weights};

fn main() -> easel_diffusion::Result<()> {
    let folder = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("../shared/bench-models/sd15/text_encoder"));
    let runs: usize = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10)
        .max(1);
    let config = ClipTextConfig::from_file(&folder.join("config.json"))?;
    let source = Arc::new(RandomSource::new(DType::F16));
    let weights = Weights::new(source, "text_encoder", DType::F32, &Device::Cpu);
    let model = ClipTextModel::load(&weights, &config)?;
    // Two rows of 77 ids spread over the vocabulary (compute does not
    // depend on which).
    let row: Vec<u32> = (0..77u32)
        .map(|i| (i * 7919) % config.vocab_size as u32)
        .collect();
    let ids = vec![row.clone(), row];
    model.forward(&ids, &Device::Cpu)?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        model.forward(&ids, &Device::Cpu)?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    println!(
        "text encoder {} ({} layers, hidden {}), 2 × 77 tokens, {} threads",
        folder.display(),
        config.num_hidden_layers,
        config.hidden_size,
        easel_diffusion::models::kernels::num_threads()
    );
    println!("| runs | best s | median s |");
    println!("| --- | --- | --- |");
    println!("| {runs} | {:.3} | {:.3} |", times[0], times[runs / 2]);
    Ok(())
}
