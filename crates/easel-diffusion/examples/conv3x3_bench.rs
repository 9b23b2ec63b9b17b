//! Per-layer timings of the two 3×3 convolution kernels (direct nine
//! products vs Winograd F(2×2, 3×3)) on the layer shapes of SD 1.5 at 512²
//! (UNet at batch 2, VAE decoder), with the largest difference between them.
//!
//!     cargo run --release -p easel-diffusion --example conv3x3_bench [runs]
//!
//! Prints a markdown table; each time is the best of `runs` (default 3).

use std::time::Instant;

use easel_diffusion::models::kernels::{conv3x3_same, conv3x3_winograd};

fn best_of(runs: usize, mut f: impl FnMut() -> Vec<f32>) -> (f64, Vec<f32>) {
    let mut best = f64::INFINITY;
    let mut out = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        out = f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    (best, out)
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(3);
    println!(
        "| layer (batch × ci → co, h × w) | direct s (GFLOP/s) | winograd s | speedup | max diff |"
    );
    println!("| --- | --- | --- | --- | --- |");
    for &(b, ci, co, h, w) in &[
        (2usize, 320usize, 320usize, 64usize, 64usize),
        (2, 640, 640, 32, 32),
        (2, 1280, 1280, 16, 16),
        (2, 1280, 1280, 8, 8),
        (1, 512, 512, 128, 128),
        (1, 256, 256, 256, 256),
        (1, 128, 128, 512, 512),
        (2, 64, 64, 64, 64),
    ] {
        let x: Vec<f32> = (0..b * ci * h * w)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let weight: Vec<f32> = (0..co * ci * 9)
            .map(|i| ((i * 104_729) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let bias = vec![0.1f32; co];
        let flops = 2.0 * (b * co * h * w * ci * 9) as f64;
        let (td, direct) = best_of(runs, || conv3x3_same(&x, b, ci, h, w, &weight, &bias, co));
        let (tw, wino) = best_of(runs, || {
            conv3x3_winograd(&x, b, ci, h, w, &weight, &bias, co)
        });
        let diff = direct
            .iter()
            .zip(&wino)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        println!(
            "| {b} × {ci} → {co}, {h} × {w} | {td:.3} ({:.0}) | {tw:.3} | {:.2} | {diff:.1e} |",
            flops / td / 1e9,
            td / tw
        );
    }
}
