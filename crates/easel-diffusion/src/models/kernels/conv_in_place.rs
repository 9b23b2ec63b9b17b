//! 3×3 Winograd convolutions that write their output over their own input,
//! so a `ResnetBlock2D` at 1024² holds one activation tensor instead of
//! two or three: [`conv3x3_winograd_in_place`] (as many output as input
//! channels) and [`conv3x3_winograd_shrink_in_place`] (fewer output
//! channels, plus the block's 1×1 residual shortcut stored beside them).
//!
//! Both compute Winograd F(2×2, 3×3) (Lavin & Gray 2015,
//! arXiv:1509.09308) block by block of tile rows, exactly as
//! [`super::conv3x3_winograd_from`] does, and hold each block's outputs
//! back until the next block has read the input rows it shares with them;
//! the values are those of the allocating kernel, bit for bit.

use rayon::prelude::*;

use super::conv::{SharedMut, WinogradGeometry};
use super::conv_input::ConvInput;
use super::matmul::matmul_row_bias;
use super::{parallelism, winograd_filter};

/// A 1×1 convolution computed alongside [`conv3x3_winograd_shrink_in_place`]
/// from the same (un-normalised) input: `weight` `(co, ci)` row-major,
/// `bias` `co` values.
#[derive(Clone, Copy, Debug)]
pub struct Shortcut1x1<'a> {
    /// `(co, ci)`, row-major (PyTorch's `(co, ci, 1, 1)`).
    pub weight: &'a [f32],
    /// `co` values.
    pub bias: &'a [f32],
    /// Output channels.
    pub co: usize,
}

/// [`super::conv3x3_winograd_from`] with as many output as input channels,
/// writing its output over its input `x` (`(batch, channels, h, w)`), read
/// through the optional per-plane `affine` map (`(scale, shift)`, then SiLU
/// with `silu`: a group norm's, as [`ConvInput::with_affine`]).
///
/// The values are those of [`super::conv3x3_winograd_from`], bit for bit;
/// the memory is one tensor less (0.5 GiB for 128 channels at 1024²).
#[allow(clippy::too_many_arguments)]
pub fn conv3x3_winograd_in_place(
    x: &mut [f32],
    batch: usize,
    channels: usize,
    h: usize,
    w: usize,
    affine: Option<(&[(f32, f32)], bool)>,
    weight: &[f32],
    bias: &[f32],
) {
    conv3x3_winograd_shrink_in_place(
        x, batch, channels, h, w, affine, weight, bias, channels, None,
    );
}

/// A 3×3 "same" convolution of `x` (`(batch, ci, h, w)`, read through the
/// optional per-plane `affine` map as in [`conv3x3_winograd_in_place`]) to
/// `co ≤ ci` channels, plus optionally the 1×1 `shortcut` of the raw `x`,
/// written over `x`: afterwards the first `batch · (co + shortcut.co) · h · w`
/// values of `x` are, per image, the convolution's `co` planes followed by
/// the shortcut's planes (`(batch, co + shortcut.co, h, w)`); the rest of
/// `x` is left as scratch.
///
/// This is `ResnetBlock2D`'s `conv1` and `conv_shortcut` when the block
/// halves its channels (the VAE decoder's 256 → 128 block at 1024²): both
/// outputs fit in the input's buffer, so the block holds one 1 GiB tensor
/// instead of 1.5 GiB. The convolution's values are those of
/// [`super::conv3x3_winograd_from`] bit for bit; the shortcut's are the
/// product `W x + b` computed over runs of whole rows (within 1e-5 of
/// [`super::conv1x1`], which takes other column blocks).
///
/// Every write lands on an input row that has been read for good: a
/// block's rows are written (to the same row of the same or an earlier
/// plane) only after the next block of tile rows has read its input, and
/// images are processed in order.
///
/// # Panics
/// When `co + shortcut.co > ci` (the outputs would not fit), in debug
/// builds when `x`'s length is not `batch · ci · h · w`.
#[allow(clippy::too_many_arguments)]
pub fn conv3x3_winograd_shrink_in_place(
    x: &mut [f32],
    batch: usize,
    ci: usize,
    h: usize,
    w: usize,
    affine: Option<(&[(f32, f32)], bool)>,
    weight: &[f32],
    bias: &[f32],
    co: usize,
    shortcut: Option<Shortcut1x1<'_>>,
) {
    debug_assert_eq!(x.len(), batch * ci * h * w);
    let co_s = shortcut.map_or(0, |s| s.co);
    let planes = co + co_s;
    assert!(
        planes <= ci,
        "in-place convolution: {co} + {co_s} output channels do not fit in {ci} input channels"
    );
    let g = WinogradGeometry::new(batch, h, w);
    let u = winograd_filter(weight, co, ci);
    let mut v = vec![0f32; ci * 16 * g.block];
    let mut m = vec![0f32; co * 16 * g.block];
    // The last block's outputs: (co, 2 rows_per_block, w); the shortcut's
    // rows of the block being flushed: (co_s, 2 rows_per_block, w).
    let staged_rows = 2 * g.rows_per_block;
    let mut staged = vec![0f32; co * staged_rows * w];
    let staged_ptr = SharedMut(staged.as_mut_ptr());
    let mut shortcut_rows = vec![0f32; co_s * staged_rows * w];
    let mut pending: Option<(usize, usize)> = None;
    let mut flush = |x: &mut [f32], staged: &[f32], row0: usize, nr: usize| {
        if let Some(s) = shortcut {
            // Read the block's input rows before anything is written over them.
            shortcut_block(&g, x, ci, s, &mut shortcut_rows, staged_rows, row0, nr);
            flush_rows(
                &g,
                &shortcut_rows,
                staged_rows,
                x,
                co_s,
                co,
                planes,
                row0,
                nr,
            );
        }
        flush_rows(&g, staged, staged_rows, x, co, 0, planes, row0, nr);
    };
    for row0 in (0..g.tile_rows).step_by(g.rows_per_block) {
        let nr = g.rows_per_block.min(g.tile_rows - row0);
        {
            let mut input = ConvInput::plain(x, h, w);
            if let Some((affine, silu)) = affine {
                input = input.with_affine(affine, silu);
            }
            g.input_transform(&input, &mut v, row0, nr);
        }
        if let Some((prev0, prev_nr)) = pending.take() {
            flush(x, &staged, prev0, prev_nr);
        }
        g.products(&u, &v, &mut m, co, ci, nr);
        g.output_transform(&m, bias, row0, nr, staged_ptr, |o, rr, _, y| {
            (o * staged_rows + 2 * rr + y % 2) * w
        });
        pending = Some((row0, nr));
    }
    if let Some((prev0, prev_nr)) = pending {
        flush(x, &staged, prev0, prev_nr);
    }
}

/// The shortcut `W x + b` of the image rows of tile rows `row0..row0 + nr`
/// into `dst` (`(co, staged_rows, w)`, local row `2 rr + i` as the staged
/// convolution rows), one matrix product per run of rows of one image.
#[allow(clippy::too_many_arguments)]
fn shortcut_block(
    g: &WinogradGeometry,
    x: &[f32],
    ci: usize,
    s: Shortcut1x1<'_>,
    dst: &mut [f32],
    staged_rows: usize,
    row0: usize,
    nr: usize,
) {
    let (h, w, th) = (g.h, g.w, g.th);
    let mut rr = 0;
    while rr < nr {
        let (b, ty0) = ((row0 + rr) / th, (row0 + rr) % th);
        // The run: tile rows of image b from ty0 to the block's end or the image's.
        let run = (th - ty0).min(nr - rr);
        let (y0, y1) = (2 * ty0, (2 * (ty0 + run)).min(h));
        let n = (y1 - y0) * w;
        // SAFETY: dst is (co × staged_rows·w), the run's rows 2rr.. at
        // column 2rr·w with n ≤ (staged_rows − 2rr)·w values; x's rows
        // y0..y1 of the ci planes of image b, plane stride h·w; weight
        // (co × ci). dst does not alias x or the weight.
        unsafe {
            matmul_row_bias(
                s.co,
                n,
                ci,
                dst.as_mut_ptr().add(2 * rr * w),
                staged_rows * w,
                s.bias,
                s.weight.as_ptr(),
                ci,
                x.as_ptr().add((b * ci * h + y0) * w),
                h * w,
                parallelism(),
            );
        }
        rr += run;
    }
}

/// Copy the staged rows of tile rows `row0..row0 + nr` (laid out
/// `(channels, staged_rows, w)`, local row `2 rr + i`) into `x`, channel
/// `o` to plane `offset + o` of each image's `planes` planes (`x` read as
/// `(batch, planes, h, w)`).
#[allow(clippy::too_many_arguments)]
fn flush_rows(
    g: &WinogradGeometry,
    staged: &[f32],
    staged_rows: usize,
    x: &mut [f32],
    channels: usize,
    offset: usize,
    planes: usize,
    row0: usize,
    nr: usize,
) {
    let (h, w, th) = (g.h, g.w, g.th);
    let x_len = x.len();
    let x_ptr = SharedMut(x.as_mut_ptr());
    (0..channels).into_par_iter().for_each(|o| {
        #[allow(clippy::redundant_locals)]
        let x_ptr = x_ptr;
        for rr in 0..nr {
            let (b, ty) = ((row0 + rr) / th, (row0 + rr) % th);
            for i in 0..2 {
                let y = 2 * ty + i;
                if y >= h {
                    continue;
                }
                let src = &staged[(o * staged_rows + 2 * rr + i) * w..][..w];
                let at = ((b * planes + offset + o) * h + y) * w;
                debug_assert!(at + w <= x_len);
                // SAFETY: row (b, offset + o, y) of x is written by this
                // task only (channel o), within x (planes ≤ the input's
                // channels, checked by the caller).
                let dst = unsafe { std::slice::from_raw_parts_mut(x_ptr.0.add(at), w) };
                dst.copy_from_slice(src);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::super::testing::randn;
    use super::super::{conv1x1, conv1x1_add_into, conv3x3_winograd_from, with_f32};
    use super::*;

    fn values(shape: &[usize], seed: u64) -> Vec<f32> {
        randn(shape, seed)
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    #[test]
    fn in_place_winograd_and_shortcut_equal_the_allocating_kernels() {
        // Single rows, odd sizes, several blocks across a batch of 3, more
        // columns than one shortcut chunk.
        for &(b, c, h, w) in &[(1, 3, 1, 5), (2, 4, 7, 9), (3, 6, 45, 51), (1, 2, 130, 131)] {
            let x = randn(&[b, c, h, w], 21).affine(1.5, -0.25).unwrap();
            let xv = with_f32(&x, <[f32]>::to_vec).unwrap();
            let wd = randn(&[c, c, 3, 3], 22)
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let bias = randn(&[c], 23).to_vec1::<f32>().unwrap();
            let gamma = randn(&[c], 24).to_vec1::<f32>().unwrap();
            let beta = randn(&[c], 25).to_vec1::<f32>().unwrap();
            let groups = if c % 2 == 0 { 2 } else { 1 };
            let affine =
                super::super::group_norm_affine(&xv, c, h * w, groups, 1e-6, &gamma, &beta);
            for mapped in [false, true] {
                let mut input = ConvInput::plain(&xv, h, w);
                if mapped {
                    input = input.with_affine(&affine, true);
                }
                let want = conv3x3_winograd_from(&input, b, c, &wd, &bias, c);
                let mut got = xv.clone();
                let map = mapped.then_some((affine.as_slice(), true));
                conv3x3_winograd_in_place(&mut got, b, c, h, w, map, &wd, &bias);
                assert!(want == got, "{b}x{c}x{h}x{w} mapped {mapped}");
            }
            // The shortcut: dst + conv1x1(x), chunked, against the whole one.
            let co = c + 1;
            let w1 = randn(&[co, c], 26)
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let b1 = randn(&[co], 27).to_vec1::<f32>().unwrap();
            let dst0 = randn(&[b, co, h, w], 28)
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let s = conv1x1(&xv, b, c, h * w, &w1, &b1, co);
            let want: Vec<f32> = s.iter().zip(&dst0).map(|(s, d)| s + d).collect();
            let mut got = dst0.clone();
            conv1x1_add_into(&mut got, &xv, b, c, h * w, &w1, &b1, co);
            let diff = want
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-5, "shortcut {b}x{c}x{h}x{w}: {diff}");
        }
    }

    /// The shrinking kernel: its convolution planes `==` the allocating
    /// kernel's, its shortcut planes within 1e-5 of `conv1x1`, for each
    /// image of a batch (odd sizes, several blocks, partial tiles).
    #[test]
    fn shrink_in_place_equals_the_allocating_kernels() {
        for &(b, ci, co, co_s, h, w) in &[
            (1, 4, 2, 2, 1, 5),
            (2, 8, 4, 4, 7, 9),
            (3, 6, 3, 2, 45, 51),
            (1, 4, 2, 2, 130, 131),
            (2, 5, 3, 0, 33, 40),
        ] {
            let x = randn(&[b, ci, h, w], 31).affine(1.5, -0.25).unwrap();
            let xv = with_f32(&x, <[f32]>::to_vec).unwrap();
            let wd = values(&[co, ci, 3, 3], 32);
            let bias = values(&[co], 33);
            let w1 = values(&[co_s.max(1), ci], 34);
            let b1 = values(&[co_s.max(1)], 35);
            let gamma = values(&[ci], 36);
            let beta = values(&[ci], 37);
            let groups = if ci % 2 == 0 { 2 } else { 1 };
            let affine =
                super::super::group_norm_affine(&xv, ci, h * w, groups, 1e-6, &gamma, &beta);
            let input = ConvInput::plain(&xv, h, w).with_affine(&affine, true);
            let want = conv3x3_winograd_from(&input, b, ci, &wd, &bias, co);
            let want_s = conv1x1(&xv, b, ci, h * w, &w1, &b1, co_s.max(1));
            let mut got = xv.clone();
            let shortcut = (co_s > 0).then_some(Shortcut1x1 {
                weight: &w1,
                bias: &b1,
                co: co_s,
            });
            conv3x3_winograd_shrink_in_place(
                &mut got,
                b,
                ci,
                h,
                w,
                Some((&affine, true)),
                &wd,
                &bias,
                co,
                shortcut,
            );
            let (hw, planes) = (h * w, co + co_s);
            for img in 0..b {
                let conv = &got[img * planes * hw..][..co * hw];
                assert!(
                    conv == &want[img * co * hw..][..co * hw],
                    "{b}x{ci}->{co}+{co_s} {h}x{w}: image {img}'s convolution"
                );
                if co_s > 0 {
                    let s = &got[(img * planes + co) * hw..][..co_s * hw];
                    let diff = s
                        .iter()
                        .zip(&want_s[img * co_s * hw..][..co_s * hw])
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    assert!(
                        diff < 1e-5,
                        "{b}x{ci}->{co}+{co_s} {h}x{w}: shortcut {diff}"
                    );
                }
            }
        }
    }
}
