//! Seeded Gaussian noise that reproduces PyTorch's CPU generator.
//!
//! `TorchGenerator::new(seed).randn(n)` returns the same values as
//! `torch.randn(n, generator=torch.Generator("cpu").manual_seed(seed))`
//! (PyTorch 2.x, float32). The algorithm follows ATen's CPU kernels
//! (`aten/src/ATen/native/cpu/DistributionTemplates.h`, `normal_fill`):
//!
//! * the engine is MT19937 seeded with the low 32 bits of the seed
//!   (the standard `init_genrand`);
//! * for 16 or more values, one float32 uniform `(u32 & 0xFFFFFF) * 2^-24` is
//!   drawn per value, in order; then every block of 16 is turned into
//!   normals by Box-Muller (`x[j] = r cos θ`, `x[j+8] = r sin θ` with
//!   `r = sqrt(-2 ln(1 - u[j]))`, `θ = 2π u[j+8]`, j in 0..8); when the count
//!   is not a multiple of 16 the last 16 values are recomputed from 16 fresh
//!   uniforms;
//! * for fewer than 16 values, each value comes from the scalar double-precision
//!   path (`at::normal_distribution<double>`): two 53-bit uniforms from two
//!   64-bit draws, Box-Muller, with the sine half cached in the generator for
//!   the next scalar draw.
//!
//! Randomness is always passed in explicitly (one generator per image), never
//! a process-wide global, so concurrent jobs stay reproducible.

use std::collections::VecDeque;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

const MT_N: usize = 624;
const MT_M: usize = 397;

/// The Mersenne Twister MT19937 (Matsumoto & Nishimura 1998), 32-bit output.
#[derive(Clone)]
struct Mt19937 {
    state: [u32; MT_N],
    index: usize,
}

impl Mt19937 {
    fn new(seed: u32) -> Self {
        let mut state = [0u32; MT_N];
        state[0] = seed;
        for i in 1..MT_N {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Self { state, index: MT_N }
    }

    fn twist(&mut self) {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        const MATRIX_A: u32 = 0x9908_b0df;
        for i in 0..MT_N {
            let y = (self.state[i] & UPPER) | (self.state[(i + 1) % MT_N] & LOWER);
            let mut next = self.state[(i + MT_M) % MT_N] ^ (y >> 1);
            if y & 1 != 0 {
                next ^= MATRIX_A;
            }
            self.state[i] = next;
        }
        self.index = 0;
    }

    fn next_u32(&mut self) -> u32 {
        if self.index >= MT_N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }
}

/// A reproduction of `torch.Generator("cpu").manual_seed(seed)` for `randn`.
#[derive(Clone)]
pub struct TorchGenerator {
    seed: u64,
    mt: Mt19937,
    /// The sine half of the last scalar Box-Muller pair, as ATen caches it.
    next_double_normal: Option<f64>,
}

impl TorchGenerator {
    /// A generator in the state `torch.Generator("cpu").manual_seed(seed)` leaves.
    /// Only the low 32 bits of `seed` reach the engine, as in PyTorch.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            mt: Mt19937::new(seed as u32),
            next_double_normal: None,
        }
    }

    /// The seed this generator was created with.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    fn uniform_f32(&mut self) -> f32 {
        (self.mt.next_u32() & 0x00ff_ffff) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    fn uniform_f64(&mut self) -> f64 {
        let hi = self.mt.next_u32() as u64;
        let lo = self.mt.next_u32() as u64;
        let x = (hi << 32) | lo;
        (x & ((1u64 << 53) - 1)) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    fn scalar_normal(&mut self) -> f64 {
        if let Some(v) = self.next_double_normal.take() {
            return v;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (1.0 - u2).ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    fn box_muller_16(u: &[f32], out: &mut [f32]) {
        for j in 0..8 {
            let r = (-2.0f32 * (1.0f32 - u[j]).ln()).sqrt();
            let theta = 2.0f32 * std::f32::consts::PI * u[j + 8];
            out[j] = r * theta.cos();
            out[j + 8] = r * theta.sin();
        }
    }

    /// `n` standard normal float32 values, as `torch.randn(n, generator=g)`.
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            return (0..n).map(|_| self.scalar_normal() as f32).collect();
        }
        let uniforms: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        let mut out = vec![0f32; n];
        let mut i = 0;
        while i + 16 <= n {
            Self::box_muller_16(&uniforms[i..i + 16], &mut out[i..i + 16]);
            i += 16;
        }
        if n % 16 != 0 {
            let tail: Vec<f32> = (0..16).map(|_| self.uniform_f32()).collect();
            Self::box_muller_16(&tail, &mut out[n - 16..n]);
        }
        out
    }

    /// A float32 tensor of `shape` filled as `torch.randn(shape, generator=g)`.
    pub fn randn_tensor(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let n = shape.iter().product();
        Ok(Tensor::from_vec(self.randn(n), shape, device)?)
    }
}

/// Where a pipeline's Gaussian draws come from, in the order it makes them:
/// the initial latents first, then any per-step draws of stochastic
/// schedulers (or the VAE posterior sample for image-to-image).
pub trait NoiseSource: Send {
    /// A tensor of `shape` (batch first) of standard normal values.
    fn randn(&mut self, shape: &[usize], device: &Device) -> Result<Tensor>;
}

/// One seeded generator per image of the batch: image `i` draws its slice of
/// every batch-shaped tensor from generator `i`, so each image is
/// reproducible on its own (`seed + i` alone gives the same image).
pub struct PerImageGenerators {
    generators: Vec<TorchGenerator>,
}

impl PerImageGenerators {
    /// Generators for `seeds`, one per image.
    pub fn new(seeds: &[u64]) -> Self {
        Self {
            generators: seeds.iter().map(|&s| TorchGenerator::new(s)).collect(),
        }
    }

    /// The seeds, one per image.
    pub fn seeds(&self) -> Vec<u64> {
        self.generators.iter().map(|g| g.seed()).collect()
    }
}

impl NoiseSource for PerImageGenerators {
    fn randn(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let batch = *shape
            .first()
            .ok_or_else(|| Error::invalid("noise", "empty shape"))?;
        if batch != self.generators.len() {
            return Err(Error::invalid(
                "noise",
                format!(
                    "batch of {batch} asked of {} per-image generators",
                    self.generators.len()
                ),
            ));
        }
        let per_image: Vec<usize> = std::iter::once(1)
            .chain(shape[1..].iter().copied())
            .collect();
        let parts = self
            .generators
            .iter_mut()
            .map(|g| g.randn_tensor(&per_image, device))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }
}

/// A single generator for the whole batch, as a diffusers pipeline called
/// with one `torch.Generator` draws: the batch-shaped tensor in one call.
pub struct BatchGenerator(pub TorchGenerator);

impl NoiseSource for BatchGenerator {
    fn randn(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        self.0.randn_tensor(shape, device)
    }
}

/// Draws replayed from a recording (the `noise.0`, `noise.1`, ... tensors of
/// a reference run), in order. Running out, or a shape that differs from the
/// recording, is an error.
pub struct RecordedNoise {
    draws: VecDeque<Tensor>,
}

impl RecordedNoise {
    /// Replay `draws` in order.
    pub fn new(draws: Vec<Tensor>) -> Self {
        Self {
            draws: draws.into(),
        }
    }

    /// How many recorded draws have not been used.
    pub fn remaining(&self) -> usize {
        self.draws.len()
    }
}

impl NoiseSource for RecordedNoise {
    fn randn(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let t = self
            .draws
            .pop_front()
            .ok_or_else(|| Error::invalid("noise", "the recorded noise has run out"))?;
        if t.dims() != shape {
            return Err(Error::invalid(
                "noise",
                format!(
                    "recorded draw has shape {:?}, pipeline asked for {shape:?}",
                    t.dims()
                ),
            ));
        }
        Ok(t.to_device(device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_matches_reference_sequence() {
        // First outputs of init_genrand(5489), the reference implementation's default seed.
        let mut mt = Mt19937::new(5489);
        let first: Vec<u32> = (0..3).map(|_| mt.next_u32()).collect();
        assert_eq!(first, vec![3_499_211_612, 581_869_302, 3_890_346_734]);
    }

    /// Fewer than 16 values take ATen's scalar double path; a later call on
    /// the same generator continues from the cached sine half. Values from
    /// `torch.randn(5)`, `torch.randn(3)`, `torch.randn(16)` on one generator
    /// seeded 42 (PyTorch 2.15).
    #[test]
    fn short_draws_match_torch_scalar_path() {
        let mut g = TorchGenerator::new(42);
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6);
        assert!(close(
            &g.randn(5),
            &[
                0.336_690_37,
                0.128_809_4,
                0.234_462_37,
                0.230_333_03,
                -1.122_856_4
            ]
        ));
        assert!(close(
            &g.randn(3),
            &[-0.186_328_29, 2.208_201_4, -0.637_997_03]
        ));
        assert!(close(
            &g.randn(16)[..3],
            &[1.642_316_9, -0.159_597_47, -0.497_397_54]
        ));
        assert!(close(&TorchGenerator::new(7).randn(1), &[-0.146_795_1]));
    }

    #[test]
    fn per_image_generators_equal_single_draws() {
        let mut batch = PerImageGenerators::new(&[3, 4]);
        let t = batch.randn(&[2, 4, 2, 2], &Device::Cpu).unwrap();
        let a = TorchGenerator::new(4).randn(16);
        let row: Vec<f32> = t.get(1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(row, a);
    }
}
