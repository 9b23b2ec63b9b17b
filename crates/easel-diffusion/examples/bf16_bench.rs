//! Per-shape timings of the AVX512-BF16 kernels (`linear_bf16`,
//! `conv_bf16`, `attention_bf16`) on the layer shapes of SD 1.5 at 512²
//! (UNet at batch 2, so 2 × 4096 tokens at the first level), in GFLOP/s,
//! beside the f32 kernels on the same shapes (with f16 weights, as
//! checkpoints store them and the layers read them).
//!
//!     cargo run --release -p easel-diffusion --example bf16_bench [runs] [linear|conv|attention]
//!
//! Prints a markdown table; each time is the best of `runs` (default 3).
//! Needs a CPU with AVX512-BF16 (prints why and exits otherwise).

use std::time::Instant;

use easel_diffusion::models::kernels::{
    attention, attention_bf16, bf16_gemm_available, conv1x1, conv3x3_prefers_winograd,
    conv3x3_same, conv3x3_winograd, conv_bf16, linear_bf16, linear_stored,
};
use half::bf16;

fn best_of<T>(runs: usize, mut f: impl FnMut() -> T) -> f64 {
    let mut best = f64::INFINITY;
    for _ in 0..runs {
        let t = Instant::now();
        std::hint::black_box(f());
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

fn values(len: usize, seed: u32) -> Vec<f32> {
    (0..len)
        .map(|i| {
            (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / 16_777_216.0)
                - 0.5
        })
        .collect()
}

fn halve(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

fn row(what: &str, flop: f64, t16: f64, t32: f64) {
    println!(
        "| {what} | {:.4} ({:.0}) | {:.4} ({:.0}) | {:.2} |",
        t16,
        flop / t16 / 1e9,
        t32,
        flop / t32 / 1e9,
        t32 / t16
    );
}

fn main() {
    if !bf16_gemm_available() {
        eprintln!("this CPU has no AVX512-BF16: nothing to time");
        return;
    }
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(3);
    let only = std::env::args().nth(2);
    let wanted = |kind: &str| only.as_deref().is_none_or(|o| o == kind);
    println!("| shape | bf16 s (GFLOP/s) | f32 s (GFLOP/s) | bf16 speedup |");
    println!("| --- | --- | --- | --- |");
    // Linear: rows × in → out.
    for &(m, k, n) in if wanted("linear") {
        &[
            (8192usize, 320usize, 320usize),
            (8192, 320, 2560),
            (8192, 1280, 320),
            (2048, 640, 640),
            (2048, 640, 5120),
            (2048, 2560, 640),
            (512, 1280, 1280),
            (512, 1280, 10240),
            (154, 768, 320),
            (77, 768, 3072),
            (77, 3072, 768),
        ][..]
    } else {
        &[]
    } {
        let a = values(m * k, 1);
        let w = values(n * k, 2);
        let bias = values(n, 3);
        let (ah, wh) = (halve(&a), halve(&w));
        let flop = 2.0 * (m * k * n) as f64;
        let t16 = best_of(runs, || linear_bf16(&ah, m, k, &wh, &bias, n));
        // The f32 layer's weight as checkpoints store it (f16), read as
        // `Linear` reads it.
        let w16: Vec<half::f16> = w.iter().map(|&v| half::f16::from_f32(v)).collect();
        let w16 = candle_core::Tensor::from_vec(w16, (n, k), &candle_core::Device::Cpu)
            .expect("an f16 weight");
        let t32 = best_of(runs, || {
            linear_stored(&a, m, k, &w16, &bias, n).expect("an f16 CPU weight")
        });
        row(&format!("linear {m}×{k}→{n}"), flop, t16, t32);
    }
    // Convolutions: batch × ci → co, h × w, kernel size.
    for &(b, ci, co, h, w, ks) in if wanted("conv") {
        &[
            (2usize, 320usize, 320usize, 64usize, 64usize, 3usize),
            (2, 640, 640, 32, 32, 3),
            (2, 1280, 1280, 16, 16, 3),
            (2, 1280, 1280, 8, 8, 3),
            (1, 512, 512, 128, 128, 3),
            (1, 256, 256, 256, 256, 3),
            (1, 128, 128, 512, 512, 3),
            (2, 320, 320, 64, 64, 1),
        ][..]
    } else {
        &[]
    } {
        let x = values(b * ci * h * w, 4);
        let wt = values(co * ci * ks * ks, 5);
        let bias = values(co, 6);
        let (xh, wh) = (halve(&x), halve(&wt));
        let flop = 2.0 * (b * ci * co * h * w * ks * ks) as f64;
        let t16 = best_of(runs, || conv_bf16(&xh, b, ci, h, w, &wh, &bias, co, ks));
        // The f32 kernel the models run for the layer: Winograd from
        // WINOGRAD_MIN_CHANNELS channels, the direct one below.
        let t32 = if ks == 1 {
            best_of(runs, || conv1x1(&x, b, ci, h * w, &wt, &bias, co))
        } else if conv3x3_prefers_winograd(ci, co) {
            best_of(runs, || conv3x3_winograd(&x, b, ci, h, w, &wt, &bias, co))
        } else {
            best_of(runs, || conv3x3_same(&x, b, ci, h, w, &wt, &bias, co))
        };
        row(
            &format!("conv{ks}x{ks} {b}×{ci}→{co}, {h}×{w}"),
            flop,
            t16,
            t32,
        );
    }
    // Attention: (batch·heads) × n queries × m keys × head dim.
    for &(bh, n, m, d) in if wanted("attention") {
        &[
            (16usize, 4096usize, 4096usize, 40usize),
            (16, 1024, 1024, 80),
            (16, 256, 256, 160),
            (16, 4096, 77, 40),
            (1, 4096, 4096, 512),
        ][..]
    } else {
        &[]
    } {
        let q = values(bh * n * d, 7);
        let k = values(bh * m * d, 8);
        let v = values(bh * m * d, 9);
        let (qh, kh, vh) = (halve(&q), halve(&k), halve(&v));
        let scale = 1.0 / (d as f32).sqrt();
        let flop = 4.0 * (bh * n * m * d) as f64;
        let t16 = best_of(runs, || attention_bf16(&qh, &kh, &vh, bh, n, m, d, scale));
        let t32 = best_of(runs, || attention(&q, &k, &v, bh, n, m, d, scale));
        row(&format!("attention {bh}×{n}×{m}×{d}"), flop, t16, t32);
    }
}
