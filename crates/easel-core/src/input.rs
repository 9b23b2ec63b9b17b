//! Input images for image-to-image and inpainting: data URIs, alpha
//! handling and masks, on 8-bit pixels (no tensors, no network: fetching a
//! URL is the caller's job).
//!
//! - [`parse_data_uri`]: `data:image/png;base64,...` (or bare base64) to bytes.
//! - [`InitImage::from_decoded`]: an RGB init image; an alpha channel is
//!   composited over white (a transparent pixel becomes white, not the
//!   color hidden under it, which is what dropping alpha would show).
//! - [`alpha_mask`]: the alpha channel as an inpainting mask, transparent
//!   = repaint (white), opaque = keep (black), as OpenAI's image edits read
//!   a transparent region.
//! - [`mask_luma`]: any decoded mask to one 8-bit channel (Pillow's `L`
//!   luma for color masks; alpha, if any, ignored).

use base64::Engine as _;

use crate::codec::{DecodedImage, PixelLayout};

/// Why an input image or mask was refused. Messages say what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    /// A `data:` URI that is malformed or not base64.
    #[error("invalid data URI: {0}")]
    DataUri(String),
    /// `--mask alpha` (use the image's alpha as the mask) on an image without alpha.
    #[error("the init image has no alpha channel to use as the mask; give a mask image")]
    NoAlpha,
}

/// The bytes of a `data:[<media type>][;base64],<data>` URI. Only base64
/// data is accepted (images are binary); a media type other than `image/*`
/// is refused. Whitespace in the data is ignored.
///
/// Errors: [`InputError::DataUri`] naming what is wrong.
pub fn parse_data_uri(uri: &str) -> Result<Vec<u8>, InputError> {
    let rest = uri
        .strip_prefix("data:")
        .ok_or_else(|| InputError::DataUri("it does not start with `data:`".into()))?;
    let (header, data) = rest
        .split_once(',')
        .ok_or_else(|| InputError::DataUri("no `,` before the data".into()))?;
    let mut parts = header.split(';');
    let media_type = parts.next().unwrap_or("").trim();
    if !media_type.is_empty() && !media_type.to_ascii_lowercase().starts_with("image/") {
        return Err(InputError::DataUri(format!(
            "media type `{media_type}` is not an image"
        )));
    }
    if !parts.any(|p| p.trim().eq_ignore_ascii_case("base64")) {
        return Err(InputError::DataUri(
            "only base64 data is supported (`data:image/png;base64,...`)".into(),
        ));
    }
    decode_base64(data)
}

/// Decode standard or URL-safe base64, padded or not, ignoring whitespace.
pub fn decode_base64(data: &str) -> Result<Vec<u8>, InputError> {
    let clean: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let engines = [
        base64::engine::general_purpose::STANDARD,
        base64::engine::general_purpose::STANDARD_NO_PAD,
        base64::engine::general_purpose::URL_SAFE,
        base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ];
    let mut last = String::new();
    for engine in engines {
        match engine.decode(&clean) {
            Ok(bytes) => return Ok(bytes),
            Err(e) => last = e.to_string(),
        }
    }
    Err(InputError::DataUri(format!(
        "the data is not base64: {last}"
    )))
}

/// An 8-bit RGB init image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitImage {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `width * height * 3` bytes, row-major RGB.
    pub rgb: Vec<u8>,
    /// Whether the file had an alpha channel (composited over white).
    pub had_alpha: bool,
}

impl InitImage {
    /// RGB pixels of `image`, alpha composited over white:
    /// `round((c · a + 255 · (255 − a)) / 255)` per channel.
    pub fn from_decoded(image: &DecodedImage) -> Self {
        let rgb = match image.layout {
            PixelLayout::Rgb8 => image.pixels.clone(),
            PixelLayout::Rgba8 => image
                .pixels
                .chunks_exact(4)
                .flat_map(|p| {
                    let a = p[3] as u32;
                    let over = |c: u8| ((c as u32 * a + 255 * (255 - a) + 127) / 255) as u8;
                    [over(p[0]), over(p[1]), over(p[2])]
                })
                .collect(),
        };
        Self {
            width: image.width,
            height: image.height,
            rgb,
            had_alpha: image.layout == PixelLayout::Rgba8,
        }
    }
}

/// The alpha channel of `image` as a mask: `255 − alpha` (transparent
/// repaints, opaque keeps).
///
/// Errors: [`InputError::NoAlpha`] when the image has no alpha channel.
pub fn alpha_mask(image: &DecodedImage) -> Result<Vec<u8>, InputError> {
    match image.layout {
        PixelLayout::Rgba8 => Ok(image.pixels.chunks_exact(4).map(|p| 255 - p[3]).collect()),
        PixelLayout::Rgb8 => Err(InputError::NoAlpha),
    }
}

/// A decoded mask file as one 8-bit channel: gray images as they are, color
/// images by Pillow's `L` conversion (`(r·19595 + g·38470 + b·7471 + 0x8000) >> 16`).
/// An alpha channel is ignored (use [`alpha_mask`] to read it).
pub fn mask_luma(image: &DecodedImage) -> Vec<u8> {
    image
        .pixels
        .chunks_exact(image.layout.channels())
        .map(|p| {
            ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16) as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::OutputFormat;

    fn decoded(layout: PixelLayout, pixels: Vec<u8>) -> DecodedImage {
        let n = (pixels.len() / layout.channels()) as u32;
        DecodedImage {
            width: n,
            height: 1,
            layout,
            pixels,
            format: OutputFormat::Png,
        }
    }

    #[test]
    fn data_uris() {
        assert_eq!(
            parse_data_uri("data:image/png;base64,aGVsbG8=").unwrap(),
            b"hello"
        );
        assert_eq!(parse_data_uri("data:;base64,aGVs\nbG8").unwrap(), b"hello");
        assert!(parse_data_uri("data:text/plain;base64,aGVsbG8=").is_err());
        assert!(parse_data_uri("data:image/png,hello").is_err());
        assert!(parse_data_uri("data:image/png;base64,***").is_err());
        assert!(parse_data_uri("image/png;base64,aGVsbG8=").is_err());
    }

    #[test]
    fn alpha_is_composited_on_white_or_read_as_mask() {
        let img = decoded(
            PixelLayout::Rgba8,
            vec![10, 20, 30, 255, 10, 20, 30, 0, 0, 0, 0, 128],
        );
        let init = InitImage::from_decoded(&img);
        assert_eq!(init.rgb, vec![10, 20, 30, 255, 255, 255, 127, 127, 127]);
        assert!(init.had_alpha);
        assert_eq!(alpha_mask(&img).unwrap(), vec![0, 255, 127]);
        let rgb = decoded(PixelLayout::Rgb8, vec![255, 0, 0, 9, 9, 9]);
        assert_eq!(alpha_mask(&rgb), Err(InputError::NoAlpha));
        assert_eq!(mask_luma(&rgb), vec![76, 9]);
        // Pillow: Image.new("RGBA", ...).convert("L") gives 18 for (10, 20, 30).
        assert_eq!(mask_luma(&img), vec![18, 18, 0]);
    }
}
