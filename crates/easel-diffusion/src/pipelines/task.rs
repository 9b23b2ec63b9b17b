//! Which inputs a model family takes: the one rule that decides whether a
//! request's init image and mask fit the model ([`check_inputs_for_family`]),
//! applied by the server before it accepts a job and by every pipeline when
//! it runs ([`Task::of`]), so the refusals and their messages are written
//! once.

use super::GenerationRequest;
use crate::error::{Error, Result};
use crate::image_processor::{ImageInput, MaskInput};
use crate::loader::{MaskRule, ModelFamily};

/// What a request asks of a pipeline, from its `image` and `mask`, with
/// the inputs each task uses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Task<'a> {
    /// No init image: pure noise, the whole schedule.
    TextToImage,
    /// An init image, no mask.
    ImageToImage(&'a ImageInput),
    /// An init image and a mask (white repaints).
    Inpaint(&'a ImageInput, &'a MaskInput),
}

/// What a request does, as a tag without its inputs: the kind of a
/// [`Task`] ([`Task::kind`]), reported with a job's resolved parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskKind {
    /// No init image.
    TextToImage,
    /// An init image, no mask.
    ImageToImage,
    /// An init image and a mask.
    Inpainting,
}

impl TaskKind {
    /// The kind of a request with (`has_image`) an init image and
    /// (`has_mask`) a mask; a mask without an image (refused by
    /// [`check_inputs_for_family`]) counts as text-to-image.
    pub fn from_inputs(has_image: bool, has_mask: bool) -> Self {
        match (has_image, has_mask) {
            (false, _) => TaskKind::TextToImage,
            (true, false) => TaskKind::ImageToImage,
            (true, true) => TaskKind::Inpainting,
        }
    }

    /// `text-to-image`, `image-to-image` or `inpainting`.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::TextToImage => "text-to-image",
            TaskKind::ImageToImage => "image-to-image",
            TaskKind::Inpainting => "inpainting",
        }
    }
}

impl<'a> Task<'a> {
    /// The task's kind, without its inputs.
    pub fn kind(&self) -> TaskKind {
        match self {
            Task::TextToImage => TaskKind::TextToImage,
            Task::ImageToImage(_) => TaskKind::ImageToImage,
            Task::Inpaint(..) => TaskKind::Inpainting,
        }
    }

    /// The task of `request` for a model of `family`, after
    /// [`check_inputs_for_family`].
    ///
    /// # Errors
    /// An invalid `mask` or `image` the family does not take (see
    /// [`check_inputs_for_family`]).
    pub fn of(family: ModelFamily, request: &'a GenerationRequest) -> Result<Task<'a>> {
        check_inputs_for_family(
            Some(family),
            request.image.is_some(),
            request.mask.is_some(),
        )?;
        Ok(match (&request.image, &request.mask) {
            (Some(image), Some(mask)) => Task::Inpaint(image, mask),
            (Some(image), None) => Task::ImageToImage(image),
            // A mask without an image was refused above.
            (None, _) => Task::TextToImage,
        })
    }
}

/// Check, before loading, that a model of `family` (`None`: a class the
/// engine does not know, as the server's fake engine) can run a request with
/// (`has_image`) an init image and (`has_mask`) a mask, by the family's
/// [`MaskRule`]: FLUX.1 schnell / dev cannot inpaint, FLUX.1 Fill only
/// inpaints (image and mask), and no pipeline takes a mask without an
/// image. The pipelines apply the same rule when they run ([`Task::of`]).
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

#[cfg(test)]
mod tests {
    use super::*;

    fn request(image: bool, mask: bool) -> GenerationRequest {
        GenerationRequest {
            image: image.then(|| ImageInput {
                width: 1,
                height: 1,
                rgb: vec![0; 3],
            }),
            mask: mask.then(|| MaskInput {
                width: 1,
                height: 1,
                luma: vec![255],
            }),
            ..Default::default()
        }
    }

    /// The field a refusal names, or the task's name.
    fn outcome(family: ModelFamily, image: bool, mask: bool) -> String {
        let r = request(image, mask);
        match Task::of(family, &r) {
            Ok(Task::TextToImage) => "text".into(),
            Ok(Task::ImageToImage(_)) => "image-to-image".into(),
            Ok(Task::Inpaint(..)) => "inpaint".into(),
            Err(Error::InvalidArgument { field, .. }) => format!("refused {field}"),
            Err(e) => panic!("unexpected error {e}"),
        }
    }

    #[test]
    fn each_family_takes_the_inputs_its_mask_rule_allows() {
        use ModelFamily::*;
        let cases = [
            // (family, image, mask, outcome)
            (StableDiffusion, false, false, "text"),
            (StableDiffusion, true, false, "image-to-image"),
            (StableDiffusionXl, true, true, "inpaint"),
            (StableDiffusion, false, true, "refused mask"),
            (Flux, false, false, "text"),
            (Flux, true, false, "image-to-image"),
            (Flux, true, true, "refused mask"),
            (Flux, false, true, "refused mask"),
            (FluxFill, false, false, "refused image"),
            (FluxFill, true, false, "refused mask"),
            (FluxFill, true, true, "inpaint"),
            (FluxFill, false, true, "refused mask"),
        ];
        for (family, image, mask, want) in cases {
            assert_eq!(
                outcome(family, image, mask),
                want,
                "{family:?} {image} {mask}"
            );
            // The pre-load check and the run-time task agree.
            assert_eq!(
                check_inputs_for_family(Some(family), image, mask).is_ok(),
                !want.starts_with("refused"),
                "{family:?} {image} {mask}"
            );
        }
        // An unknown class (the server's fake engine): only the
        // mask-without-image rule applies.
        assert!(check_inputs_for_family(None, true, true).is_ok());
        assert!(check_inputs_for_family(None, false, true).is_err());
    }

    #[test]
    fn a_task_and_its_inputs_have_the_same_kind() {
        for (image, mask, kind) in [
            (false, false, TaskKind::TextToImage),
            (true, false, TaskKind::ImageToImage),
            (true, true, TaskKind::Inpainting),
        ] {
            let r = request(image, mask);
            let task = Task::of(ModelFamily::StableDiffusion, &r).unwrap();
            assert_eq!(task.kind(), kind);
            assert_eq!(TaskKind::from_inputs(image, mask), kind);
        }
        assert_eq!(TaskKind::Inpainting.as_str(), "inpainting");
        assert_eq!(TaskKind::ImageToImage.as_str(), "image-to-image");
    }

    #[test]
    fn the_task_carries_the_request_inputs() {
        let r = request(true, true);
        let Ok(Task::Inpaint(image, mask)) = Task::of(ModelFamily::FluxFill, &r) else {
            panic!("not an inpaint task");
        };
        assert!(std::ptr::eq(image, r.image.as_ref().unwrap()));
        assert!(std::ptr::eq(mask, r.mask.as_ref().unwrap()));
    }
}
