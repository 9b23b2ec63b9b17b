//! Turning init images and masks into the tensors the pipelines consume,
//! as diffusers' `VaeImageProcessor` does (`image_processor.py`), and the
//! 8-bit input types themselves ([`ImageInput`], [`MaskInput`]; re-exported
//! as `pipelines::{ImageInput, MaskInput}`), as diffusers keeps
//! `PipelineImageInput` in `image_processor.py`. The pipelines depend on
//! this module, never the other way.
//!
//! - Images are resized to the requested size with Pillow's Lanczos filter
//!   (`Image.resize(size, Image.LANCZOS)`, which diffusers uses for PIL
//!   inputs), reproduced here integer for integer: the same separable
//!   filter with support 3 widened by the downscale factor, coefficients
//!   normalised and quantised to 22 fractional bits, a horizontal then a
//!   vertical pass over 8-bit intermediates, rounding and clipping as
//!   `libImaging/Resample.c` does. The result equals Pillow's byte for byte
//!   (checked against it in the tests).
//! - Pixels map to `x / 255` (float32), then to `2x − 1` for images.
//! - Masks: resized like images (single channel), `x / 255`, then binarised
//!   (`< 0.5` → 0, else 1): 1 repaints, 0 keeps. diffusers resizes an RGB
//!   mask before converting it to grayscale; here masks arrive as luma, so
//!   an RGB mask is converted first (Pillow's `L` formula, see
//!   [`rgb_to_luma`]), which can move an edge pixel of a resized RGB mask by
//!   one level before binarisation.
//! - The mask at latent resolution is the nearest-neighbour sample
//!   (`torch.nn.functional.interpolate(mask, size=(h / 8, w / 8))`, mode
//!   `nearest`: source index `floor(i · in / out)`).

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

/// An 8-bit RGB image handed to the engine (decoded by the caller).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageInput {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `width * height * 3` bytes, row-major RGB.
    pub rgb: Vec<u8>,
}

/// An 8-bit single-channel mask: 255 (white) repaints, 0 (black) keeps.
#[derive(Debug, Clone, PartialEq)]
pub struct MaskInput {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `width * height` bytes, row-major.
    pub luma: Vec<u8>,
}

impl MaskInput {
    /// A mask from RGB8 pixels (`width * height * 3` bytes), converted to
    /// luma as PIL's `convert("L")` does (ITU-R 601-2:
    /// `(19595 R + 38470 G + 7471 B + 32768) >> 16`), so a grayscale file
    /// expanded to RGB keeps its values.
    ///
    /// Errors: a byte count that does not match the size.
    pub fn from_rgb8(width: usize, height: usize, rgb: &[u8]) -> Result<Self> {
        if rgb.len() != width * height * 3 {
            return Err(Error::invalid(
                "mask",
                format!("{} bytes for a {width}x{height} RGB image", rgb.len()),
            ));
        }
        let luma = rgb
            .chunks_exact(3)
            .map(|p| {
                let l = 19595 * p[0] as u32 + 38470 * p[1] as u32 + 7471 * p[2] as u32 + 0x8000;
                (l >> 16) as u8
            })
            .collect();
        Ok(Self {
            width,
            height,
            luma,
        })
    }
}

/// Fractional bits of Pillow's 8-bit resampling coefficients.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's Lanczos window (a = 3): `sinc(x) · sinc(x / 3)` on `[-3, 3)`.
fn lanczos(x: f64) -> f64 {
    fn sinc(x: f64) -> f64 {
        if x == 0.0 {
            1.0
        } else {
            let x = x * std::f64::consts::PI;
            x.sin() / x
        }
    }
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// For each output index: the first input index, the number of taps, and
/// the quantised weights (Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`).
fn coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 3.0 * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // C's `(int)` truncates toward zero; clamping to 0 afterwards makes
            // that the same as flooring here.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let taps = xmax.saturating_sub(xmin);
            let w: Vec<f64> = (0..taps)
                .map(|x| lanczos((x as f64 + xmin as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = w.iter().sum();
            let one = (1u32 << PRECISION_BITS) as f64;
            let k = w
                .iter()
                .map(|&v| {
                    let v = if total != 0.0 { v / total } else { v };
                    if v < 0.0 {
                        (-0.5 + v * one) as i32
                    } else {
                        (0.5 + v * one) as i32
                    }
                })
                .collect();
            (xmin, k)
        })
        .collect()
}

fn clip8(v: i64) -> u8 {
    if v >= (1i64 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Resize an 8-bit image of `channels` interleaved channels from
/// `width × height` to `out_width × out_height` with Pillow's Lanczos
/// filter, bit-exact with `Image.resize((out_width, out_height), Image.LANCZOS)`
/// for modes `L` and `RGB`. The same size returns a copy, as Pillow does.
///
/// Errors when a size is 0 or `pixels` has the wrong length.
pub fn resize_lanczos(
    pixels: &[u8],
    width: usize,
    height: usize,
    channels: usize,
    out_width: usize,
    out_height: usize,
) -> Result<Vec<u8>> {
    if width == 0 || height == 0 || out_width == 0 || out_height == 0 || channels == 0 {
        return Err(Error::invalid(
            "image",
            format!("cannot resize a {width}x{height} image to {out_width}x{out_height}"),
        ));
    }
    if pixels.len() != width * height * channels {
        return Err(Error::invalid(
            "image",
            format!(
                "{} bytes for a {width}x{height} image of {channels} channels (expected {})",
                pixels.len(),
                width * height * channels
            ),
        ));
    }
    let round = 1i64 << (PRECISION_BITS - 1);
    // Horizontal pass.
    let (mut cur, mut cur_w) = (pixels.to_vec(), width);
    if out_width != width {
        let coeffs = coefficients(width, out_width);
        let mut out = vec![0u8; out_width * height * channels];
        for y in 0..height {
            let row = &cur[y * width * channels..(y + 1) * width * channels];
            for (xx, (xmin, k)) in coeffs.iter().enumerate() {
                for c in 0..channels {
                    let mut ss = round;
                    for (i, &kv) in k.iter().enumerate() {
                        ss += row[(xmin + i) * channels + c] as i64 * kv as i64;
                    }
                    out[(y * out_width + xx) * channels + c] = clip8(ss);
                }
            }
        }
        cur = out;
        cur_w = out_width;
    }
    // Vertical pass.
    if out_height != height {
        let coeffs = coefficients(height, out_height);
        let stride = cur_w * channels;
        let mut out = vec![0u8; out_height * stride];
        for (yy, (ymin, k)) in coeffs.iter().enumerate() {
            for x in 0..stride {
                let mut ss = round;
                for (i, &kv) in k.iter().enumerate() {
                    ss += cur[(ymin + i) * stride + x] as i64 * kv as i64;
                }
                out[yy * stride + x] = clip8(ss);
            }
        }
        cur = out;
    }
    Ok(cur)
}

/// Pillow's RGB → `L` conversion (ITU-R 601-2 luma in 16-bit fixed point):
/// `(r·19595 + g·38470 + b·7471 + 0x8000) >> 16`.
pub fn rgb_to_luma(rgb: &[u8]) -> Vec<u8> {
    rgb.chunks_exact(3)
        .map(|p| {
            ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16) as u8
        })
        .collect()
}

/// Whether two sizes have the same aspect ratio within 1 % (a mask may be a
/// scaled copy of the image, not a differently shaped picture).
pub fn same_aspect_ratio(a: (usize, usize), b: (usize, usize)) -> bool {
    let ra = a.0 as f64 / a.1 as f64;
    let rb = b.0 as f64 / b.1 as f64;
    (ra / rb - 1.0).abs() <= 0.01
}

/// Check that a `mask` of `(width, height)` fits an init image of
/// `image_size`: the same aspect ratio within 1 % ([`same_aspect_ratio`]).
/// [`preprocess_mask`] applies it when a job runs; the server applies it
/// before accepting one.
///
/// # Errors
/// An invalid `mask` naming both sizes.
pub fn check_mask_shape(mask: (usize, usize), image_size: (usize, usize)) -> Result<()> {
    if !same_aspect_ratio(mask, image_size) {
        return Err(Error::invalid(
            "mask",
            format!(
                "the mask is {}x{} but the image is {}x{}: their aspect ratios differ; \
                 give a mask of the image's shape",
                mask.0, mask.1, image_size.0, image_size.1
            ),
        ));
    }
    Ok(())
}

fn check_dims(field: &str, width: usize, height: usize, len: usize, channels: usize) -> Result<()> {
    if width == 0 || height == 0 {
        return Err(Error::invalid(
            field,
            format!("the {field} is empty ({width}x{height})"),
        ));
    }
    if len != width * height * channels {
        return Err(Error::invalid(
            field,
            format!(
                "{len} bytes for a {width}x{height} {field} (expected {})",
                width * height * channels
            ),
        ));
    }
    Ok(())
}

/// `VaeImageProcessor.preprocess` for one RGB image: resize to
/// `width × height` (Lanczos, only when the size differs), `x / 255`,
/// `2x − 1`. Returns `(1, 3, height, width)` float32 in [-1, 1].
///
/// Errors: an empty image or a pixel buffer of the wrong length.
pub fn preprocess_image(
    image: &ImageInput,
    width: usize,
    height: usize,
    device: &Device,
) -> Result<Tensor> {
    check_dims("image", image.width, image.height, image.rgb.len(), 3)?;
    let pixels = if (image.width, image.height) == (width, height) {
        image.rgb.clone()
    } else {
        resize_lanczos(&image.rgb, image.width, image.height, 3, width, height)?
    };
    let values: Vec<f32> = pixels
        .iter()
        .map(|&v| 2.0f32 * (v as f32 / 255.0f32) - 1.0f32)
        .collect();
    Ok(Tensor::from_vec(values, (1, height, width, 3), device)?
        .permute((0, 3, 1, 2))?
        .contiguous()?)
}

/// The mask processor of the inpainting pipelines (`do_normalize=False,
/// do_binarize=True, do_convert_grayscale=True`): resize to `width × height`
/// (Lanczos), `x / 255`, binarise at 0.5. Returns `(1, 1, height, width)`
/// float32 of 0 (keep) and 1 (repaint).
///
/// Errors: an empty mask, a buffer of the wrong length, or a mask whose
/// aspect ratio differs from `image_size` (`(width, height)` of the init
/// image) by more than 1 %, which would stretch it over the wrong region.
pub fn preprocess_mask(
    mask: &MaskInput,
    image_size: (usize, usize),
    width: usize,
    height: usize,
    device: &Device,
) -> Result<Tensor> {
    check_dims("mask", mask.width, mask.height, mask.luma.len(), 1)?;
    check_mask_shape((mask.width, mask.height), image_size)?;
    let pixels = if (mask.width, mask.height) == (width, height) {
        mask.luma.clone()
    } else {
        resize_lanczos(&mask.luma, mask.width, mask.height, 1, width, height)?
    };
    let values: Vec<f32> = pixels
        .iter()
        .map(|&v| if v as f32 / 255.0f32 < 0.5 { 0.0 } else { 1.0 })
        .collect();
    Ok(Tensor::from_vec(values, (1, 1, height, width), device)?)
}

/// Nearest-neighbour resize of `(batch, channels, H, W)` to `(out_h, out_w)`,
/// as `torch.nn.functional.interpolate(x, size=(out_h, out_w))` (mode
/// `nearest`): output index `i` reads input index `floor(i · H / out_h)`.
pub fn interpolate_nearest(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let index = |out: usize, input: usize| -> Vec<u32> {
        let scale = input as f32 / out as f32;
        (0..out)
            .map(|i| ((i as f32 * scale).floor() as usize).min(input - 1) as u32)
            .collect()
    };
    let rows = Tensor::new(index(out_h, h), x.device())?;
    let cols = Tensor::new(index(out_w, w), x.device())?;
    Ok(x.index_select(&rows, 2)?.index_select(&cols, 3)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_is_identity_and_upscale_of_constant_is_constant() {
        let px: Vec<u8> = (0..4 * 3 * 3).map(|i| (i * 7 % 256) as u8).collect();
        assert_eq!(resize_lanczos(&px, 4, 3, 3, 4, 3).unwrap(), px);
        let flat = vec![77u8; 5 * 4];
        let up = resize_lanczos(&flat, 5, 4, 1, 13, 9).unwrap();
        assert!(up.iter().all(|&v| v == 77));
        let down = resize_lanczos(&flat, 5, 4, 1, 2, 3).unwrap();
        assert!(down.iter().all(|&v| v == 77));
    }

    #[test]
    fn bad_buffers_are_errors() {
        assert!(resize_lanczos(&[0; 5], 2, 2, 1, 1, 1).is_err());
        assert!(resize_lanczos(&[], 0, 2, 1, 1, 1).is_err());
        let mask = MaskInput {
            width: 4,
            height: 2,
            luma: vec![0; 8],
        };
        let e = preprocess_mask(&mask, (4, 4), 8, 8, &Device::Cpu).unwrap_err();
        assert!(e.to_string().contains("aspect"), "{e}");
    }

    #[test]
    fn luma_matches_pillow() {
        // Pillow: Image.new("RGB", (1, 1), c).convert("L").getpixel((0, 0))
        assert_eq!(
            rgb_to_luma(&[255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 200, 30, 9, 9, 9]),
            vec![76, 150, 29, 124, 9]
        );
    }

    #[test]
    fn nearest_picks_floor_index() {
        let x = Tensor::arange(0f32, 16f32, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 4, 4))
            .unwrap();
        let y = interpolate_nearest(&x, 2, 2).unwrap();
        let v: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v, vec![0.0, 2.0, 8.0, 10.0]);
    }
}
