//! Tiled VAE decode, as diffusers' `AutoencoderKL.enable_tiling()` (what
//! `pipe.enable_vae_tiling()` switches on) does it in `_decode` and
//! `tiled_decode` (diffusers 0.42, `models/autoencoders/autoencoder_kl.py`).
//!
//! The latents are cut into overlapping square tiles of
//! `tile_latent_min_size` latents, one every `overlap_stride` latents; each
//! tile goes through `post_quant_conv` and the decoder alone; each decoded
//! tile is blended linearly into the one above it (`blend_v`) and the one to
//! its left (`blend_h`) over `blend_extent` pixels, and the first
//! `row_limit` rows and columns of each are kept. The decoder's activations
//! are then those of one tile, whatever the image size; only the decoded
//! 3-channel tiles of one row of tiles and the output are held beside them.
//! The result differs from an untiled decode (every tile's group norms and
//! attention see only the tile), most where the tiles overlap.
//!
//! [`VaeTiling`] says when a pipeline's decode tiles: `on` as diffusers with
//! tiling enabled (only latents larger than a tile), `off` never, `auto`
//! only for large images ([`VaeTiling::resolve`]).

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};

use super::autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig};
use crate::error::{Error, Result};

/// diffusers' `tile_overlap_factor`: the share of a tile that overlaps its
/// neighbour.
pub const TILE_OVERLAP_FACTOR: f64 = 0.25;

/// `auto` tiles a CUDA (or other accelerator) decode above this many pixels
/// per image: 1024², SDXL's and FLUX's native size, decodes whole.
pub const AUTO_ACCELERATOR_PIXELS: usize = 1024 * 1024;

/// `auto` tiles a decode on any device, the CPU included, above this many
/// pixels per image (2048²). The CPU decoder reuses its buffers, so below
/// this an untiled decode fits ordinary machines and keeps diffusers'
/// default (untiled) pixels.
pub const AUTO_ANY_DEVICE_PIXELS: usize = 2048 * 2048;

/// When the VAE decode is tiled (`--vae-tiling`, [`crate::engine::EngineOptions::vae_tiling`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum VaeTiling {
    /// Tile only large images: above [`AUTO_ACCELERATOR_PIXELS`] per image on
    /// a CUDA / Metal device, above [`AUTO_ANY_DEVICE_PIXELS`] on any device;
    /// never with seamless tiling (see [`VaeTiling::resolve`]).
    #[default]
    Auto,
    /// Always, as diffusers after `vae.enable_tiling()`: latents larger
    /// than one tile in either direction are decoded in tiles.
    On,
    /// Never: one decode of the whole latent (diffusers' default).
    Off,
}

impl VaeTiling {
    /// The accepted names, as [`FromStr`] reads them.
    pub const NAMES: [&'static str; 3] = ["auto", "on", "off"];

    /// The lower-case name (`auto`, `on`, `off`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::On => "on",
            Self::Off => "off",
        }
    }

    /// Whether a decode of `latents` (`(batch, c, h, w)`) on `device` tiles:
    /// never when the latents fit one tile (diffusers' rule, see
    /// [`VaeTileLayout::tiles`]) or with `seamless` tiling under `auto`;
    /// for `auto`, above [`AUTO_ACCELERATOR_PIXELS`] output pixels per
    /// image on a non-CPU device or [`AUTO_ANY_DEVICE_PIXELS`] on any.
    ///
    /// # Errors
    /// `on` with `seamless` (each tile's circular convolutions would wrap
    /// around the tile instead of the image); a VAE config whose
    /// `sample_size` gives no tile ([`VaeTileLayout::from_config`]).
    pub fn resolve(
        self,
        config: &AutoencoderKLConfig,
        latents: &Tensor,
        seamless: bool,
    ) -> Result<bool> {
        if self == Self::Off {
            return Ok(false);
        }
        if self == Self::On && seamless {
            return Err(seamless_conflict());
        }
        if self == Self::Auto && seamless {
            return Ok(false);
        }
        let (_, _, h, w) = latents.dims4()?;
        let layout = VaeTileLayout::from_config(config)?;
        if !layout.tiles(h, w) {
            return Ok(false);
        }
        if self == Self::On {
            return Ok(true);
        }
        let f = config.vae_scale_factor();
        let pixels = h * f * w * f;
        let accelerator = !matches!(latents.device(), Device::Cpu);
        Ok(pixels > AUTO_ANY_DEVICE_PIXELS || (accelerator && pixels > AUTO_ACCELERATOR_PIXELS))
    }
}

/// The error for VAE tiling `on` together with seamless tiling.
pub(crate) fn seamless_conflict() -> Error {
    Error::invalid(
        "vae_tiling",
        "VAE tiling `on` cannot be combined with seamless tiling (`tiling`): each tile's \
         circular convolutions would wrap around the tile, not the image, and the image \
         would have seams; use VAE tiling `auto` (which decodes a seamless image whole) or `off`",
    )
}

impl fmt::Display for VaeTiling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for VaeTiling {
    type Err = Error;

    /// `auto`, `on` or `off` (case-insensitive; `true` / `false` too).
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "on" | "true" => Ok(Self::On),
            "off" | "false" => Ok(Self::Off),
            other => Err(Error::invalid(
                "vae_tiling",
                format!(
                    "`{other}` is not a VAE tiling mode (allowed: {})",
                    Self::NAMES.join(", ")
                ),
            )),
        }
    }
}

/// diffusers' tile geometry of an `AutoencoderKL`, in latents (tile size,
/// stride) and in pixels (tile size, blend, kept rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VaeTileLayout {
    /// `tile_latent_min_size = int(sample_size / 2**(len(block_out_channels) - 1))`:
    /// a tile's side in latents (64 for SD 1.x's `sample_size` 512, 128 for
    /// SDXL's and FLUX's 1024).
    pub tile_latent_min_size: usize,
    /// `tile_sample_min_size = sample_size`: a decoded full tile's side in pixels.
    pub tile_sample_min_size: usize,
    /// `int(tile_latent_min_size * (1 - 0.25))`: latents from one tile's
    /// start to the next's.
    pub overlap_stride: usize,
    /// `int(tile_sample_min_size * 0.25)`: pixels blended between
    /// neighbouring tiles (fewer where a tile is smaller).
    pub blend_extent: usize,
    /// `tile_sample_min_size - blend_extent`: pixels kept of each tile in
    /// each direction.
    pub row_limit: usize,
}

impl VaeTileLayout {
    /// The layout diffusers derives from the config's `sample_size` (an
    /// integer, or the first of a list as diffusers takes it for the
    /// latent tile; absent: diffusers' default 32) and `block_out_channels`.
    ///
    /// # Errors
    /// A `sample_size` that is not a positive integer (or list starting
    /// with one), or so small that a tile would be under two latents
    /// (no stride: diffusers would fail too).
    pub fn from_config(config: &AutoencoderKLConfig) -> Result<Self> {
        let value = match &config.sample_size {
            None => serde_json::Value::from(32),
            Some(serde_json::Value::Array(items)) => {
                items.first().cloned().unwrap_or(serde_json::Value::Null)
            }
            Some(v) => v.clone(),
        };
        let sample_size = value
            .as_f64()
            .filter(|v| *v >= 1.0 && v.fract() == 0.0)
            .ok_or_else(|| {
                Error::config(
                    "vae",
                    format!("sample_size {value} is not a positive integer (VAE tiling needs it)"),
                )
            })? as usize;
        let factor = 1usize << config.block_out_channels.len().saturating_sub(1);
        let tile_latent_min_size = sample_size / factor;
        let overlap_stride = (tile_latent_min_size as f64 * (1.0 - TILE_OVERLAP_FACTOR)) as usize;
        if overlap_stride == 0 {
            return Err(Error::config(
                "vae",
                format!(
                    "sample_size {sample_size} gives tiles of {tile_latent_min_size} latents \
                     (at least 2 are needed to tile the decode)"
                ),
            ));
        }
        let blend_extent = (sample_size as f64 * TILE_OVERLAP_FACTOR) as usize;
        Ok(Self {
            tile_latent_min_size,
            tile_sample_min_size: sample_size,
            overlap_stride,
            blend_extent,
            row_limit: sample_size - blend_extent,
        })
    }

    /// diffusers' rule in `_decode`: latents `h x w` are tiled when either
    /// side is larger than a tile.
    pub fn tiles(&self, h: usize, w: usize) -> bool {
        h > self.tile_latent_min_size || w > self.tile_latent_min_size
    }

    /// The tiles of latents `h x w`: `(rows, columns)`, one starting every
    /// `overlap_stride` latents.
    pub fn grid(&self, h: usize, w: usize) -> (usize, usize) {
        (
            h.div_ceil(self.overlap_stride),
            w.div_ceil(self.overlap_stride),
        )
    }
}

impl AutoencoderKL {
    /// Decode as diffusers' `AutoencoderKL._decode` does with
    /// `use_tiling = tiled`: tiled ([`AutoencoderKL::tiled_decode`]) when
    /// `tiled` and the latents are larger than one tile, else
    /// [`AutoencoderKL::decode`].
    ///
    /// # Errors
    /// As [`AutoencoderKL::tiled_decode`] and [`AutoencoderKL::decode`].
    pub fn decode_with_tiling(&self, z: &Tensor, tiled: bool) -> Result<Tensor> {
        if tiled {
            let (_, _, h, w) = z.dims4()?;
            if VaeTileLayout::from_config(self.config())?.tiles(h, w) {
                return self.tiled_decode(z);
            }
        }
        self.decode(z)
    }

    /// diffusers' `tiled_decode`: decode latents `(batch, latent_channels,
    /// h, w)` tile by tile (each through `post_quant_conv` and the decoder,
    /// as [`AutoencoderKL::decode`]), blend each tile into the one above and
    /// the one to its left, and keep `row_limit` pixels of each; returns
    /// `(batch, out_channels, 8h, 8w)` (for a scale factor of 8). As in
    /// diffusers, a tile starts every `overlap_stride` latents whatever the
    /// size: latents of one full tile are still cut in overlapping tiles
    /// (callers go through [`AutoencoderKL::decode_with_tiling`], which
    /// does not tile those); only sides up to `overlap_stride` give one
    /// tile, the plain decode. Only one tile's decoder activations are
    /// alive at a time.
    ///
    /// # Errors
    /// A config without a usable `sample_size` ([`VaeTileLayout::from_config`]);
    /// latents that are not 4-D.
    pub fn tiled_decode(&self, z: &Tensor) -> Result<Tensor> {
        let layout = VaeTileLayout::from_config(self.config())?;
        let (_, _, h, w) = z.dims4()?;
        let tile = layout.tile_latent_min_size;
        let stride = layout.overlap_stride;
        let mut above: Vec<Tensor> = Vec::new();
        let mut rows = Vec::with_capacity(h.div_ceil(stride));
        for i in (0..h).step_by(stride) {
            let mut row: Vec<Tensor> = Vec::with_capacity(w.div_ceil(stride));
            for (col, j) in (0..w).step_by(stride).enumerate() {
                let latents = z
                    .narrow(2, i, tile.min(h - i))?
                    .narrow(3, j, tile.min(w - j))?
                    .contiguous()?;
                let mut decoded = self.decode(&latents)?;
                // diffusers blends in place, in raster order: the tile above
                // and the one to the left have been blended already.
                if let Some(a) = above.get(col) {
                    decoded = blend(a, &decoded, layout.blend_extent, 2)?;
                }
                if let Some(left) = row.last() {
                    decoded = blend(left, &decoded, layout.blend_extent, 3)?;
                }
                row.push(decoded);
            }
            let kept = row
                .iter()
                .map(|t| {
                    let (_, _, th, tw) = t.dims4()?;
                    Ok(t.narrow(2, 0, layout.row_limit.min(th))?.narrow(
                        3,
                        0,
                        layout.row_limit.min(tw),
                    )?)
                })
                .collect::<Result<Vec<_>>>()?;
            rows.push(Tensor::cat(&kept, 3)?);
            above = row;
        }
        Ok(Tensor::cat(&rows, 2)?)
    }
}

/// diffusers' `blend_v` (`dim` 2) / `blend_h` (`dim` 3): the first `e`
/// lines of `b` along `dim` become `a[-e + y] * (1 - y / e) + b[y] * (y / e)`,
/// with `e = min(extent, a's and b's size along dim)`. Computed in f32 (the
/// weights rounded to f32, as PyTorch multiplies a float32 tensor by a
/// Python scalar) and returned in `b`'s dtype.
fn blend(a: &Tensor, b: &Tensor, extent: usize, dim: usize) -> Result<Tensor> {
    let e = extent.min(a.dim(dim)?).min(b.dim(dim)?);
    if e == 0 {
        return Ok(b.clone());
    }
    let mut shape = [1usize; 4];
    shape[dim] = e;
    let weights = |f: &dyn Fn(f64) -> f64| {
        let v: Vec<f32> = (0..e).map(|y| f(y as f64 / e as f64) as f32).collect();
        Tensor::from_vec(v, &shape[..], b.device())
    };
    let w_a = weights(&|t| 1.0 - t)?;
    let w_b = weights(&|t| t)?;
    let a_tail = a.narrow(dim, a.dim(dim)? - e, e)?.to_dtype(DType::F32)?;
    let b_head = b.narrow(dim, 0, e)?.to_dtype(DType::F32)?;
    let blended =
        (a_tail.broadcast_mul(&w_a)? + b_head.broadcast_mul(&w_b)?)?.to_dtype(b.dtype())?;
    let rest = b.dim(dim)? - e;
    if rest == 0 {
        return Ok(blended);
    }
    Ok(Tensor::cat(&[&blended, &b.narrow(dim, e, rest)?], dim)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blend_ramps_from_the_previous_tile_into_the_next() {
        // a = 1 everywhere, b = 0 everywhere, 5 rows each, extent 4: the
        // first 4 rows of b become 1 - y/4 (diffusers' blend_v), the 5th stays.
        let a = Tensor::ones((1, 1, 5, 2), DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros((1, 1, 5, 2), DType::F32, &Device::Cpu).unwrap();
        let v = blend(&a, &b, 4, 2).unwrap();
        let rows: Vec<f32> = v
            .narrow(3, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(rows, [1.0, 0.75, 0.5, 0.25, 0.0]);
        // blend_h along the width; the extent shrinks to the smaller tile.
        let a = Tensor::arange(0f32, 6., &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 1, 6))
            .unwrap();
        let b = Tensor::zeros((1, 1, 1, 2), DType::F32, &Device::Cpu).unwrap();
        let h: Vec<f32> = blend(&a, &b, 4, 3)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // e = 2: b[x] = a[4 + x] * (1 - x/2) + 0.
        assert_eq!(h, [4.0, 2.5]);
    }
}
