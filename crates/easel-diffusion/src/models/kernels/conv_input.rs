//! The input of the 3×3 convolution kernels, read row by row: the layer's
//! input as given, or the result of the operations that precede a
//! convolution in diffusers' blocks, computed as each row is read instead of
//! materialised as a whole tensor first:
//!
//! - a group norm's per-channel scale and shift, optionally followed by SiLU
//!   (`conv(silu(norm(x)))` of `ResnetBlock2D` and the VAE decoder's output
//!   convolution), and
//! - nearest-neighbour ×2 upsampling (`Upsample2D`).
//!
//! Each value is mapped by the same arithmetic as [`super::group_norm`]
//! (`v · scale + shift`, then `y / (1 + e^-y)`), so results are bit for bit
//! those of the separate operations. What it saves is memory: at 1024² the
//! VAE decoder's last blocks hold 128–256 channels of 1024² f32 values,
//! 0.5–1 GiB per tensor, and the normalised, upsampled and zero-padded
//! copies of such tensors were the largest transients of a FLUX or SDXL
//! generation at that size.

/// Where the 3×3 kernels read their `(batch, channels, h, w)` input from
/// (see the module documentation). Built by [`ConvInput::plain`], then
/// [`ConvInput::with_affine`] / [`ConvInput::upsampled_2x`].
#[derive(Clone, Copy)]
pub struct ConvInput<'a> {
    /// The source values, `(batch, channels, src_h, src_w)`.
    x: &'a [f32],
    src_h: usize,
    src_w: usize,
    /// Nearest ×2: the convolution's input is `(2 src_h, 2 src_w)` and pixel
    /// `(y, x)` reads source pixel `(y / 2, x / 2)`.
    upsample_2x: bool,
    /// Per `(batch, channel)` plane, in that order: `(scale, shift)`.
    affine: Option<&'a [(f32, f32)]>,
    /// SiLU after the affine map.
    silu: bool,
}

impl<'a> ConvInput<'a> {
    /// `x` as it is: `(batch, channels, h, w)`.
    pub fn plain(x: &'a [f32], h: usize, w: usize) -> Self {
        Self {
            x,
            src_h: h,
            src_w: w,
            upsample_2x: false,
            affine: None,
            silu: false,
        }
    }

    /// Map every value `v` of plane `(b, c)` to `v · scale + shift` with
    /// `(scale, shift) = affine[b · channels + c]` (a group norm's, see
    /// [`super::group_norm_affine`]), then, with `silu`, to `y / (1 + e^-y)`.
    pub fn with_affine(self, affine: &'a [(f32, f32)], silu: bool) -> Self {
        Self {
            affine: Some(affine),
            silu,
            ..self
        }
    }

    /// Read the source upsampled ×2 by nearest neighbour (`F.interpolate(
    /// scale_factor=2.0, mode="nearest")`): the input is `(2h, 2w)`.
    pub fn upsampled_2x(self) -> Self {
        Self {
            upsample_2x: true,
            ..self
        }
    }

    /// Height of the convolution's input.
    pub fn h(&self) -> usize {
        if self.upsample_2x {
            2 * self.src_h
        } else {
            self.src_h
        }
    }

    /// Width of the convolution's input.
    pub fn w(&self) -> usize {
        if self.upsample_2x {
            2 * self.src_w
        } else {
            self.src_w
        }
    }

    /// The source values (`(batch, channels, src_h, src_w)`).
    pub fn source(&self) -> &'a [f32] {
        self.x
    }

    #[inline]
    fn map(&self, plane: usize, v: f32) -> f32 {
        let y = match self.affine {
            Some(a) => {
                let (scale, shift) = a[plane];
                v * scale + shift
            }
            None => v,
        };
        if self.silu {
            y / (1.0 + (-y).exp())
        } else {
            y
        }
    }

    /// Write row `y` (of the convolution's input; any value, rows outside
    /// `0..h` are zeros) of plane `plane` (`b · channels + c`) into `dst`,
    /// zero padded: `dst[0]` and `dst[1 + w..]` are zeros, `dst[1..=w]` the
    /// row. `dst.len() ≥ w + 2`.
    pub fn fill_padded_row(&self, plane: usize, y: isize, dst: &mut [f32]) {
        let (h, w) = (self.h(), self.w());
        debug_assert!(dst.len() >= w + 2);
        if y < 0 || y as usize >= h {
            dst.fill(0.0);
            return;
        }
        dst[0] = 0.0;
        dst[1 + w..].fill(0.0);
        let sy = if self.upsample_2x {
            y as usize / 2
        } else {
            y as usize
        };
        let start = (plane * self.src_h + sy) * self.src_w;
        let src = &self.x[start..start + self.src_w];
        let row = &mut dst[1..1 + w];
        match (self.upsample_2x, self.affine.is_some() || self.silu) {
            (false, false) => row.copy_from_slice(src),
            (false, true) => {
                for (o, &v) in row.iter_mut().zip(src) {
                    *o = self.map(plane, v);
                }
            }
            (true, mapped) => {
                for (pair, &v) in row.chunks_exact_mut(2).zip(src) {
                    let m = if mapped { self.map(plane, v) } else { v };
                    pair[0] = m;
                    pair[1] = m;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_padded_mapped_and_upsampled() {
        // One plane of 2×3 values.
        let x = [1.0f32, -2.0, 3.0, 0.5, 0.0, -1.5];
        let plain = ConvInput::plain(&x, 2, 3);
        let mut row = [9.0f32; 5];
        plain.fill_padded_row(0, 1, &mut row);
        assert_eq!(row, [0.0, 0.5, 0.0, -1.5, 0.0]);
        plain.fill_padded_row(0, -1, &mut row);
        assert_eq!(row, [0.0; 5]);
        plain.fill_padded_row(0, 2, &mut row);
        assert_eq!(row, [0.0; 5]);

        let affine = [(2.0f32, 1.0f32)];
        let mapped = plain.with_affine(&affine, true);
        mapped.fill_padded_row(0, 0, &mut row);
        let silu = |v: f32| {
            let y = v * 2.0 + 1.0;
            y / (1.0 + (-y).exp())
        };
        assert_eq!(row, [0.0, silu(1.0), silu(-2.0), silu(3.0), 0.0]);

        let up = plain.upsampled_2x();
        assert_eq!((up.h(), up.w()), (4, 6));
        let mut row = [9.0f32; 8];
        up.fill_padded_row(0, 3, &mut row);
        assert_eq!(row, [0.0, 0.5, 0.5, 0.0, 0.0, -1.5, -1.5, 0.0]);
        up.fill_padded_row(0, 4, &mut row);
        assert_eq!(row, [0.0; 8]);
    }
}
