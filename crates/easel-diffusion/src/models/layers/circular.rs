//! Seamless tiling: the per-thread scope in which every padded [`Conv2d`]
//! pads circularly (PyTorch's `padding_mode="circular"`), and the circular
//! pad itself.

use std::cell::Cell;
use std::marker::PhantomData;

use candle_core::Tensor;

#[allow(unused_imports)] // named by the docs
use super::Conv2d;
use crate::error::{Error, Result};

thread_local! {
    /// Whether the convolutions run on this thread pad circularly; set only
    /// through [`circular_padding`].
    static CIRCULAR_PADDING: Cell<bool> = const { Cell::new(false) };
}

/// Seamless tiling, as A1111's `tiling` option (every `nn.Conv2d` switched
/// to `padding_mode="circular"`) and stable-diffusion.cpp's `--circular`
/// do it: while the returned guard lives, every [`Conv2d`] with
/// `padding > 0` run **on this thread** pads its input by wrapping it
/// around on both axes instead of with zeros, so the left edge continues
/// the right one and the top the bottom. `false` selects zero padding (the
/// default) for the scope, e.g. inside an outer circular scope. Dropping
/// the guard restores the mode that was set before, also on unwinding.
///
/// Padding that is not a convolution's own (the VAE encoder's explicit
/// right/bottom zero pad before its stride-2 down-samplers) stays zeros,
/// as in A1111, where only the convolutions' `padding_mode` changes.
///
/// Why a scope on the calling thread rather than a flag in the model: the
/// pipelines take `&self` and may be shared between threads; a per-thread
/// scope gives each run its own mode, so two runs on one shared model
/// never see each other's setting, and the model needs no interior
/// mutability. It works because a model's layers run on the thread that
/// calls the model (the kernels fan out over worker threads below the
/// layer, on already padded inputs); the guard is not `Send`, so it cannot
/// be dropped on another thread.
#[must_use = "circular padding applies only while the guard lives"]
pub fn circular_padding(circular: bool) -> CircularPaddingGuard {
    let previous = CIRCULAR_PADDING.with(|c| c.replace(circular));
    CircularPaddingGuard {
        previous,
        _not_send: PhantomData,
    }
}

/// Whether a [`circular_padding`] scope is active on this thread.
pub fn circular_padding_active() -> bool {
    CIRCULAR_PADDING.with(Cell::get)
}

/// Restores the padding mode of before [`circular_padding`] when dropped.
#[derive(Debug)]
pub struct CircularPaddingGuard {
    previous: bool,
    /// Thread-bound: the mode is per thread.
    _not_send: PhantomData<*const ()>,
}

impl Drop for CircularPaddingGuard {
    fn drop(&mut self) {
        CIRCULAR_PADDING.with(|c| c.set(self.previous));
    }
}

/// Pad `x`, `(batch, channels, h, w)`, by `pad` on every side with the
/// values wrapped around (PyTorch's `F.pad(x, (pad,) * 4, mode="circular")`):
/// the left pad is the last `pad` columns, the right pad the first ones,
/// and likewise for rows, so corners come from the opposite corners.
/// Returns `(batch, channels, h + 2 pad, w + 2 pad)`.
///
/// Errors: `x` not of rank 4, or `pad` larger than `h` or `w` (wrapping
/// more than once; PyTorch refuses it too).
pub fn pad_circular(x: &Tensor, pad: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if pad > h || pad > w {
        return Err(Error::invalid(
            "tiling",
            format!(
                "circular padding of {pad} needs a feature map of at least {pad}x{pad}, got {h}x{w}"
            ),
        ));
    }
    if pad == 0 {
        return Ok(x.clone());
    }
    let x = Tensor::cat(&[&x.narrow(3, w - pad, pad)?, x, &x.narrow(3, 0, pad)?], 3)?;
    Ok(Tensor::cat(
        &[&x.narrow(2, h - pad, pad)?, &x, &x.narrow(2, 0, pad)?],
        2,
    )?)
}
