//! Which inputs a model family takes: the rule that decides whether a
//! request's init image and mask fit the model.

use crate::error::{Error, Result};
use crate::loader::{MaskRule, ModelFamily};

/// Check, before loading, that a model of `family` (`None`: a class the
/// engine does not know, as the server's fake engine) can run a request with
/// (`has_image`) an init image and (`has_mask`) a mask, by the family's
/// [`MaskRule`]: FLUX.1 schnell / dev cannot inpaint, FLUX.1 Fill only
/// inpaints (image and mask), and no pipeline takes a mask without an
/// image. The pipelines refuse the same when they run.
///
/// # Errors
/// An invalid `mask` or `image`.
pub fn check_inputs_for_family(
    family: Option<ModelFamily>,
    has_image: bool,
    has_mask: bool,
) -> Result<()> {
    if has_mask && !has_image {
        return Err(Error::invalid(
            "mask",
            "a mask needs an init image to repaint: give `image` too",
        ));
    }
    match family.map(ModelFamily::mask_rule) {
        Some(MaskRule::Refused) if has_mask => Err(Error::invalid(
            "mask",
            "FLUX.1 schnell / dev cannot inpaint; use a FLUX.1 Fill model (FluxFillPipeline)",
        )),
        Some(MaskRule::Required) if !has_image => Err(Error::invalid(
            "image",
            "FLUX.1 Fill needs an image to inpaint (and a mask)",
        )),
        Some(MaskRule::Required) if !has_mask => Err(Error::invalid(
            "mask",
            "FLUX.1 Fill needs a mask (white repaints, black keeps)",
        )),
        _ => Ok(()),
    }
}
