//! Image codecs: encode generated RGB8 pixels to PNG, JPEG or lossy WebP;
//! decode PNG, JPEG and WebP files (for image-to-image and inpainting); read
//! the generation metadata back from a PNG.
//!
//! Every format carries the `parameters` text of AUTOMATIC1111's web UI
//! (prompt, `Negative prompt: ...`, then `Steps: 25, Sampler: Euler a, CFG
//! scale: 7.5, Seed: ..., Size: WxH, Model: ...`, see
//! [`ImageMetadata::parameters_text`]), where that web UI, Forge, ComfyUI
//! loaders, Civitai and similar tools look for it:
//!
//! - PNG: two text chunks, `parameters` and `easel` (the JSON of
//!   [`ImageMetadata`], which [`read_png_metadata`] reads). Each is a `tEXt`
//!   chunk when its text is Latin-1, else an `iTXt` (UTF-8) chunk, so any
//!   prompt round-trips.
//! - JPEG: EXIF `UserComment` (`UNICODE` + UTF-16BE) in an `APP1` segment;
//! - WebP: the same EXIF in an `EXIF` chunk of an extended (`VP8X`) file;
//!
//! see [`crate::exif`] for the exact bytes. JPEG and WebP carry no `easel`
//! JSON (the job record keeps it).

use std::collections::BTreeMap;
use std::io::{Cursor, Write};

use image::codecs::jpeg::JpegEncoder;
use image::{ExtendedColorType, ImageEncoder, ImageFormat};
use serde::{Deserialize, Serialize};

use crate::exif::{jpeg_with_user_comment, webp_with_user_comment};
use crate::params::OutputFormat;
use crate::sampler_names::a1111_sampler;

/// Largest width or height libwebp encodes, in pixels.
pub const WEBP_MAX_DIMENSION: u32 = 16383;
/// Largest width or height JPEG can store, in pixels.
pub const JPEG_MAX_DIMENSION: u32 = 65535;
/// Largest width or height [`decode_image`] accepts, in pixels (a guard
/// against decompression bombs; the decoder also caps memory at 512 MiB).
pub const DECODE_MAX_DIMENSION: u32 = 16384;

/// PNG text chunk keyword of the human-readable parameters line.
pub const PNG_PARAMETERS_KEY: &str = "parameters";
/// PNG text chunk keyword of the [`ImageMetadata`] JSON.
pub const PNG_EASEL_KEY: &str = "easel";

/// Errors of encoding and decoding images. Messages say what is wrong and
/// what would work.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The pixel buffer's length is not `width * height * 3`.
    #[error("the pixel buffer holds {actual} bytes, but a {width}x{height} RGB8 image needs {expected} (width * height * 3)")]
    BufferSize {
        /// Image width in pixels.
        width: u32,
        /// Image height in pixels.
        height: u32,
        /// Bytes needed.
        expected: u64,
        /// Bytes given.
        actual: usize,
    },
    /// Width or height is 0.
    #[error("cannot encode a {width}x{height} image: width and height must be at least 1")]
    EmptyImage {
        /// Image width in pixels.
        width: u32,
        /// Image height in pixels.
        height: u32,
    },
    /// The format cannot store an image this large.
    #[error("a {width}x{height} image is too large for {format} (at most {max} pixels per side); use png or a smaller size")]
    TooLarge {
        /// The format asked for.
        format: OutputFormat,
        /// Image width in pixels.
        width: u32,
        /// Image height in pixels.
        height: u32,
        /// The format's limit per side.
        max: u32,
    },
    /// Quality outside 1..=100 for a lossy format.
    #[error("quality {quality} is out of range (allowed: 1 to 100)")]
    InvalidQuality {
        /// The quality given.
        quality: u8,
    },
    /// The encoder failed.
    #[error("could not encode the image as {format}: {reason}")]
    Encode {
        /// The format asked for.
        format: OutputFormat,
        /// The encoder's message.
        reason: String,
    },
    /// The data's signature matches no known image format.
    #[error(
        "the data is not a PNG, JPEG or WebP image (its first bytes match no known image format)"
    )]
    UnknownFormat,
    /// A known image format that easel does not read.
    #[error(
        "{format} images are not supported (supported: PNG, JPEG, WebP); convert the image first"
    )]
    UnsupportedFormat {
        /// The detected format, e.g. `Gif`.
        format: String,
    },
    /// A PNG, JPEG or WebP file that could not be decoded (truncated, corrupt,
    /// too large).
    #[error(
        "could not decode the {format} image: {reason} (is the file complete and not corrupt?)"
    )]
    Decode {
        /// The detected format.
        format: OutputFormat,
        /// The decoder's message.
        reason: String,
    },
}

/// Borrowed RGB8 pixels: `data` holds `width * height * 3` bytes, rows top to
/// bottom, each pixel `r, g, b`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RgbImageRef<'a> {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Row-major RGB8 bytes, `width * height * 3` of them.
    pub data: &'a [u8],
}

impl<'a> RgbImageRef<'a> {
    /// Borrow `data` as a `width` x `height` RGB8 image.
    ///
    /// # Errors
    /// [`CodecError::EmptyImage`] for a zero side, [`CodecError::BufferSize`]
    /// when `data.len() != width * height * 3`.
    pub fn new(width: u32, height: u32, data: &'a [u8]) -> Result<Self, CodecError> {
        let image = Self {
            width,
            height,
            data,
        };
        image.check()?;
        Ok(image)
    }

    fn check(&self) -> Result<(), CodecError> {
        let (width, height) = (self.width, self.height);
        if width == 0 || height == 0 {
            return Err(CodecError::EmptyImage { width, height });
        }
        let expected = u64::from(width) * u64::from(height) * 3;
        if u64::try_from(self.data.len()) != Ok(expected) {
            return Err(CodecError::BufferSize {
                width,
                height,
                expected,
                actual: self.data.len(),
            });
        }
        Ok(())
    }
}

/// The parameters an image was generated with: enough to regenerate it.
///
/// Serialized as camelCase JSON in the PNG `easel` text chunk.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageMetadata {
    /// The prompt.
    pub prompt: String,
    /// The negative prompt, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
    /// Denoising steps run.
    pub steps: u32,
    /// The diffusers scheduler class that ran (e.g.
    /// `EulerAncestralDiscreteScheduler`); the `parameters` text spells it
    /// as the web UI does (see [`crate::sampler_names`]).
    pub scheduler: String,
    /// The scheduler's sigma schedule when not the class default: `karras`
    /// or `exponential` (diffusers' `use_karras_sigmas` /
    /// `use_exponential_sigmas`); `None` for the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sigma_schedule: Option<String>,
    /// Guidance scale used.
    pub guidance_scale: f64,
    /// This image's own seed (image `i` of a batch has `seed + i`).
    pub seed: u64,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// The model reference (repo id, registry name or path).
    pub model: String,
    /// Anything else worth keeping (LoRAs, strength, easel version, ...),
    /// written after the standard fields of the `parameters` line.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, String>,
}

impl ImageMetadata {
    /// The AUTOMATIC1111-style parameters text:
    ///
    /// ```text
    /// a lighthouse at dusk
    /// Negative prompt: blurry
    /// Steps: 25, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 512x768, Model: sd15, key: value
    /// ```
    ///
    /// The `Negative prompt` line is left out when there is none; values
    /// holding `,`, `:`, `"` or a line break are written as JSON strings, as
    /// the web UI's `quote` does, so its `parse_generation_parameters` reads
    /// them back. `Sampler` (and, where needed, `Schedule type`, right after
    /// it) use the web UI's names ([`crate::sampler_names::a1111_sampler`]).
    pub fn parameters_text(&self) -> String {
        let mut text = self.prompt.clone();
        if let Some(negative) = &self.negative_prompt {
            text.push_str("\nNegative prompt: ");
            text.push_str(negative);
        }
        let sampler = a1111_sampler(&self.scheduler, self.sigma_schedule.as_deref());
        let mut fields = vec![
            ("Steps".to_string(), self.steps.to_string()),
            ("Sampler".to_string(), quote(&sampler.sampler)),
            ("CFG scale".to_string(), self.guidance_scale.to_string()),
            ("Seed".to_string(), self.seed.to_string()),
            (
                "Size".to_string(),
                format!("{}x{}", self.width, self.height),
            ),
            ("Model".to_string(), quote(&self.model)),
        ];
        if let Some(schedule_type) = sampler.schedule_type {
            fields.insert(2, ("Schedule type".to_string(), schedule_type.to_string()));
        }
        fields.extend(self.extra.iter().map(|(k, v)| (k.clone(), quote(v))));
        let line: Vec<String> = fields.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        text.push('\n');
        text.push_str(&line.join(", "));
        text
    }
}

fn quote(value: &str) -> String {
    if value.contains([',', ':', '"', '\n', '\r']) {
        serde_json::Value::from(value).to_string()
    } else {
        value.to_string()
    }
}

/// Encode RGB8 pixels as `format`.
///
/// - PNG: lossless, 8-bit RGB, `quality` ignored; `metadata` embedded as the
///   `parameters` and `easel` text chunks (see the module docs).
/// - JPEG: baseline at `quality` (1..=100); the `parameters` text as EXIF
///   `UserComment` in an `APP1` segment.
/// - WebP: lossy (libwebp) at `quality` (1..=100), at most 16383 pixels per
///   side; an extended (`VP8X`) file with the `parameters` text as EXIF
///   `UserComment` in an `EXIF` chunk.
///
/// # Errors
/// [`CodecError::EmptyImage`] / [`CodecError::BufferSize`] for a bad buffer,
/// [`CodecError::InvalidQuality`] for a lossy format's quality outside
/// 1..=100, [`CodecError::TooLarge`] past the format's size limit,
/// [`CodecError::Encode`] when the encoder fails or (JPEG) the parameters
/// text does not fit one EXIF segment (about 32,700 UTF-16 code units).
pub fn encode_image(
    rgb: &RgbImageRef<'_>,
    format: OutputFormat,
    quality: u8,
    metadata: &ImageMetadata,
) -> Result<Vec<u8>, CodecError> {
    rgb.check()?;
    if format.is_lossy() && !(1..=100).contains(&quality) {
        return Err(CodecError::InvalidQuality { quality });
    }
    let max = match format {
        OutputFormat::Png => u32::MAX >> 1,
        OutputFormat::Jpeg => JPEG_MAX_DIMENSION,
        OutputFormat::Webp => WEBP_MAX_DIMENSION,
    };
    if rgb.width > max || rgb.height > max {
        return Err(CodecError::TooLarge {
            format,
            width: rgb.width,
            height: rgb.height,
            max,
        });
    }
    let encode_error = |reason: String| CodecError::Encode { format, reason };
    match format {
        OutputFormat::Png => {
            let json = serde_json::to_string(metadata).map_err(|e| encode_error(e.to_string()))?;
            encode_png(rgb, metadata.parameters_text(), json)
                .map_err(|e| encode_error(e.to_string()))
        }
        OutputFormat::Jpeg => {
            let mut out = Vec::new();
            JpegEncoder::new_with_quality(&mut out, quality)
                .write_image(rgb.data, rgb.width, rgb.height, ExtendedColorType::Rgb8)
                .map_err(|e| encode_error(e.to_string()))?;
            jpeg_with_user_comment(out, &metadata.parameters_text())
                .map_err(|e| encode_error(e.to_string()))
        }
        OutputFormat::Webp => {
            let mut config = webp::WebPConfig::new()
                .map_err(|()| encode_error("libwebp rejected its default configuration".into()))?;
            config.lossless = 0;
            config.quality = f32::from(quality);
            // `from_rgb` checks the buffer length, which `rgb.check()` did.
            let encoded = webp::Encoder::from_rgb(rgb.data, rgb.width, rgb.height)
                .encode_advanced(&config)
                .map_err(|e| encode_error(format!("libwebp error {e:?}")))?;
            webp_with_user_comment(encoded.to_vec(), &metadata.parameters_text())
                .map_err(|e| encode_error(e.to_string()))
        }
    }
}

fn encode_png(
    rgb: &RgbImageRef<'_>,
    parameters: String,
    json: String,
) -> Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, rgb.width, rgb.height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    add_text(&mut encoder, PNG_PARAMETERS_KEY, parameters)?;
    add_text(&mut encoder, PNG_EASEL_KEY, json)?;
    let mut writer = encoder.write_header()?;
    writer.write_image_data(rgb.data)?;
    writer.finish()?;
    Ok(out)
}

/// Add a `tEXt` chunk when `text` is Latin-1, else an `iTXt` (UTF-8) chunk.
fn add_text<W: Write>(
    encoder: &mut png::Encoder<'_, W>,
    keyword: &str,
    text: String,
) -> Result<(), png::EncodingError> {
    if text.chars().all(|c| u32::from(c) <= 0xFF) {
        encoder.add_text_chunk(keyword.to_string(), text)
    } else {
        encoder.add_itxt_chunk(keyword.to_string(), text)
    }
}

/// Read the [`ImageMetadata`] that [`encode_image`] embedded in a PNG (the
/// `easel` text chunk, whether `tEXt`, `zTXt` or `iTXt`, before or after the
/// image data).
///
/// `None` when `bytes` is not a readable PNG or carries no valid `easel`
/// chunk; the parameters line alone (e.g. from other tools) is not parsed.
pub fn read_png_metadata(bytes: &[u8]) -> Option<ImageMetadata> {
    let mut reader = png::Decoder::new(Cursor::new(bytes)).read_info().ok()?;
    if let Some(metadata) = find_easel_chunk(reader.info()) {
        return Some(metadata);
    }
    // Text chunks may also follow the image data.
    reader.finish().ok()?;
    find_easel_chunk(reader.info())
}

fn find_easel_chunk(info: &png::Info<'_>) -> Option<ImageMetadata> {
    let texts = info
        .utf8_text
        .iter()
        .filter(|c| c.keyword == PNG_EASEL_KEY)
        .filter_map(|c| c.get_text().ok())
        .chain(
            info.uncompressed_latin1_text
                .iter()
                .filter(|c| c.keyword == PNG_EASEL_KEY)
                .map(|c| c.text.clone()),
        )
        .chain(
            info.compressed_latin1_text
                .iter()
                .filter(|c| c.keyword == PNG_EASEL_KEY)
                .filter_map(|c| c.get_text().ok()),
        );
    texts
        .into_iter()
        .find_map(|text| serde_json::from_str(&text).ok())
}

/// How the bytes of a [`DecodedImage`] are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelLayout {
    /// 3 bytes per pixel: r, g, b.
    Rgb8,
    /// 4 bytes per pixel: r, g, b, a (straight, not premultiplied alpha).
    Rgba8,
}

impl PixelLayout {
    /// Bytes per pixel: 3 or 4.
    pub fn channels(self) -> usize {
        match self {
            PixelLayout::Rgb8 => 3,
            PixelLayout::Rgba8 => 4,
        }
    }
}

/// A decoded image: 8-bit pixels, row-major, top to bottom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedImage {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// [`PixelLayout::Rgba8`] when the file has an alpha channel, else
    /// [`PixelLayout::Rgb8`] (grayscale is expanded to RGB, 16-bit reduced
    /// to 8-bit).
    pub layout: PixelLayout,
    /// `width * height * layout.channels()` bytes.
    pub pixels: Vec<u8>,
    /// The file's format.
    pub format: OutputFormat,
}

impl DecodedImage {
    /// The pixels as RGB8 (`width * height * 3` bytes). Alpha is dropped, not
    /// composited, as PIL's `convert("RGB")` does in diffusers.
    pub fn into_rgb8(self) -> Vec<u8> {
        match self.layout {
            PixelLayout::Rgb8 => self.pixels,
            PixelLayout::Rgba8 => self
                .pixels
                .chunks_exact(4)
                .flat_map(|p| [p[0], p[1], p[2]])
                .collect(),
        }
    }
}

/// Decode a PNG, JPEG or WebP file (the format is detected from its first
/// bytes, not from a file name) to 8-bit RGB or RGBA.
///
/// # Errors
/// [`CodecError::UnknownFormat`] when the data is no image,
/// [`CodecError::UnsupportedFormat`] for other image formats (GIF, BMP, ...),
/// [`CodecError::Decode`] for a truncated or corrupt file or one larger than
/// [`DECODE_MAX_DIMENSION`] per side. Never panics on bad input.
///
/// The decoders are lenient where browsers are: a file whose compressed data
/// stops early (a JPEG cut in its scan, a file missing only its last bytes)
/// may decode, with the missing part filled in. A file cut inside its
/// headers, or a PNG cut in its image data, is an error.
pub fn decode_image(bytes: &[u8]) -> Result<DecodedImage, CodecError> {
    let detected = image::guess_format(bytes).map_err(|_| CodecError::UnknownFormat)?;
    let format = match detected {
        ImageFormat::Png => OutputFormat::Png,
        ImageFormat::Jpeg => OutputFormat::Jpeg,
        ImageFormat::WebP => OutputFormat::Webp,
        other => {
            return Err(CodecError::UnsupportedFormat {
                format: format!("{other:?}"),
            })
        }
    };
    let decode_error = |e: image::ImageError| CodecError::Decode {
        format,
        reason: e.to_string().trim_end().to_string(),
    };
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(DECODE_MAX_DIMENSION);
    limits.max_image_height = Some(DECODE_MAX_DIMENSION);
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), detected);
    reader.limits(limits);
    let image = reader.decode().map_err(decode_error)?;
    let (width, height) = (image.width(), image.height());
    let (layout, pixels) = if image.color().has_alpha() {
        (PixelLayout::Rgba8, image.into_rgba8().into_raw())
    } else {
        (PixelLayout::Rgb8, image.into_rgb8().into_raw())
    };
    Ok(DecodedImage {
        width,
        height,
        layout,
        pixels,
        format,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A smooth gradient with some texture, `width * height * 3` bytes.
    fn test_pixels(width: u32, height: u32) -> Vec<u8> {
        let mut data = Vec::with_capacity((width * height * 3) as usize);
        for y in 0..height {
            for x in 0..width {
                let t = ((x as f32 * 0.3).sin() * (y as f32 * 0.2).cos() * 40.0) as i32;
                data.push((x * 255 / width) as u8);
                data.push((y * 255 / height) as u8);
                data.push((128 + t).clamp(0, 255) as u8);
            }
        }
        data
    }

    fn metadata(prompt: &str) -> ImageMetadata {
        ImageMetadata {
            prompt: prompt.into(),
            negative_prompt: Some("blurry, low quality".into()),
            steps: 25,
            scheduler: "EulerAncestralDiscreteScheduler".into(),
            sigma_schedule: None,
            guidance_scale: 7.5,
            seed: u64::MAX - 1,
            width: 64,
            height: 48,
            model: "stable-diffusion-v1-5/stable-diffusion-v1-5".into(),
            extra: BTreeMap::from([
                ("Lora".to_string(), "detail: 0.9".to_string()),
                ("Version".to_string(), "easel 0.1.0".to_string()),
            ]),
        }
    }

    fn mean_abs_diff(a: &[u8], b: &[u8]) -> f64 {
        assert_eq!(a.len(), b.len());
        let sum: u64 = a
            .iter()
            .zip(b)
            .map(|(&x, &y)| u64::from(x.abs_diff(y)))
            .sum();
        sum as f64 / a.len() as f64
    }

    #[test]
    fn png_round_trips_pixels_and_metadata() {
        let data = test_pixels(64, 48);
        let rgb = RgbImageRef::new(64, 48, &data).unwrap();
        for prompt in [
            "a lighthouse at dusk",
            "café crème, 50% off",
            "一只猫坐在窗台上 🐈 — «ночь»",
        ] {
            let meta = metadata(prompt);
            let png = encode_image(&rgb, OutputFormat::Png, 0, &meta).unwrap();
            let decoded = decode_image(&png).unwrap();
            assert_eq!((decoded.width, decoded.height), (64, 48));
            assert_eq!(decoded.layout, PixelLayout::Rgb8);
            assert_eq!(decoded.format, OutputFormat::Png);
            assert_eq!(decoded.pixels, data);
            assert_eq!(read_png_metadata(&png), Some(meta));
        }
    }

    #[test]
    fn png_text_chunks_are_latin1_or_utf8() {
        let data = test_pixels(8, 8);
        let rgb = RgbImageRef::new(8, 8, &data).unwrap();
        let chunks = |prompt: &str| {
            let png = encode_image(&rgb, OutputFormat::Png, 80, &metadata(prompt)).unwrap();
            let reader = png::Decoder::new(Cursor::new(png)).read_info().unwrap();
            let info = reader.info();
            let latin1: Vec<(String, String)> = info
                .uncompressed_latin1_text
                .iter()
                .map(|c| (c.keyword.clone(), c.text.clone()))
                .collect();
            let utf8: Vec<(String, String)> = info
                .utf8_text
                .iter()
                .map(|c| (c.keyword.clone(), c.get_text().unwrap()))
                .collect();
            (latin1, utf8)
        };

        let (latin1, utf8) = chunks("café");
        assert!(utf8.is_empty());
        assert_eq!(latin1[0].0, "parameters");
        assert_eq!(
            latin1[0].1,
            "café\nNegative prompt: blurry, low quality\n\
             Steps: 25, Sampler: Euler a, CFG scale: 7.5, Seed: 18446744073709551614, \
             Size: 64x48, Model: stable-diffusion-v1-5/stable-diffusion-v1-5, \
             Lora: \"detail: 0.9\", Version: easel 0.1.0"
        );
        assert_eq!(latin1[1].0, "easel");

        let (latin1, utf8) = chunks("猫");
        assert!(latin1.is_empty());
        assert_eq!(utf8[0].0, "parameters");
        assert!(utf8[0].1.starts_with("猫\nNegative prompt: "));
        assert_eq!(utf8[1].0, "easel");
    }

    #[test]
    fn lossy_formats_decode_close_to_the_source() {
        let data = test_pixels(64, 48);
        let rgb = RgbImageRef::new(64, 48, &data).unwrap();
        for format in [OutputFormat::Jpeg, OutputFormat::Webp] {
            let bytes = encode_image(&rgb, format, 90, &metadata("x")).unwrap();
            let decoded = decode_image(&bytes).unwrap();
            assert_eq!(decoded.format, format);
            assert_eq!((decoded.width, decoded.height), (64, 48));
            assert_eq!(decoded.layout, PixelLayout::Rgb8);
            let diff = mean_abs_diff(&decoded.pixels, &data);
            assert!(diff < 4.0, "{format}: mean abs diff {diff}");
            // The `easel` JSON is a PNG chunk only.
            assert_eq!(read_png_metadata(&bytes), None);
        }
    }

    #[test]
    fn quality_affects_size() {
        let data = test_pixels(128, 96);
        let rgb = RgbImageRef::new(128, 96, &data).unwrap();
        for format in [OutputFormat::Jpeg, OutputFormat::Webp] {
            let low = encode_image(&rgb, format, 10, &metadata("x")).unwrap();
            let high = encode_image(&rgb, format, 95, &metadata("x")).unwrap();
            assert!(
                low.len() < high.len(),
                "{format}: q10 {} bytes, q95 {} bytes",
                low.len(),
                high.len()
            );
        }
    }

    #[test]
    fn bad_input_to_the_encoder_is_an_error() {
        let data = test_pixels(8, 8);
        let meta = metadata("x");
        let short = RgbImageRef {
            width: 8,
            height: 9,
            data: &data,
        };
        for format in OutputFormat::ALL {
            let err = encode_image(&short, format, 80, &meta).unwrap_err();
            assert!(matches!(
                err,
                CodecError::BufferSize {
                    expected: 216,
                    actual: 192,
                    ..
                }
            ));
        }
        assert_eq!(
            RgbImageRef::new(8, 9, &data).unwrap_err().to_string(),
            "the pixel buffer holds 192 bytes, but a 8x9 RGB8 image needs 216 (width * height * 3)"
        );
        assert!(matches!(
            RgbImageRef::new(0, 8, &[]),
            Err(CodecError::EmptyImage { .. })
        ));
        let rgb = RgbImageRef::new(8, 8, &data).unwrap();
        for quality in [0, 101] {
            let err = encode_image(&rgb, OutputFormat::Webp, quality, &meta).unwrap_err();
            assert!(matches!(err, CodecError::InvalidQuality { .. }), "{err}");
        }
        let wide = vec![0u8; 16384 * 2 * 3];
        let rgb = RgbImageRef::new(16384, 2, &wide).unwrap();
        let err = encode_image(&rgb, OutputFormat::Webp, 80, &meta).unwrap_err();
        assert_eq!(
            err.to_string(),
            "a 16384x2 image is too large for webp (at most 16383 pixels per side); use png or a smaller size"
        );
    }

    #[test]
    fn corrupt_or_unsupported_files_are_errors_not_panics() {
        let data = test_pixels(64, 48);
        let rgb = RgbImageRef::new(64, 48, &data).unwrap();
        for format in OutputFormat::ALL {
            let bytes = encode_image(&rgb, format, 90, &metadata("x")).unwrap();
            // Cut anywhere: an error or (JPEG decoders pad a cut scan) a
            // full-size image, never a panic. Cut in the header: an error.
            for cut in [
                1,
                4,
                12,
                30,
                bytes.len() / 3,
                bytes.len() / 2,
                bytes.len() - 1,
            ] {
                if let Ok(image) = decode_image(&bytes[..cut]) {
                    assert_eq!((image.width, image.height), (64, 48));
                }
            }
            assert!(decode_image(&bytes[..30]).is_err(), "{format}");
            // Flip bytes in the middle of the data.
            let mut corrupt = bytes.clone();
            for b in &mut corrupt[20..60] {
                *b ^= 0xA5;
            }
            let _ = decode_image(&corrupt);
        }
        let png = encode_image(&rgb, OutputFormat::Png, 90, &metadata("x")).unwrap();
        let err = decode_image(&png[..png.len() / 2]).unwrap_err();
        assert!(
            matches!(
                err,
                CodecError::Decode {
                    format: OutputFormat::Png,
                    ..
                }
            ),
            "{err}"
        );
        assert!(matches!(decode_image(&[]), Err(CodecError::UnknownFormat)));
        assert!(matches!(
            decode_image(b"hello, this is not an image"),
            Err(CodecError::UnknownFormat)
        ));
        let err = decode_image(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;").unwrap_err();
        assert_eq!(
            err.to_string(),
            "Gif images are not supported (supported: PNG, JPEG, WebP); convert the image first"
        );
        assert_eq!(read_png_metadata(&png[..20]), None);
        assert_eq!(read_png_metadata(b"not a png"), None);
    }

    #[test]
    fn png_without_easel_chunk_has_no_metadata() {
        let mut out = Vec::new();
        let mut encoder = png::Encoder::new(&mut out, 2, 1);
        encoder.set_color(png::ColorType::Rgb);
        encoder
            .add_text_chunk("easel".into(), "not json".into())
            .unwrap();
        let mut writer = encoder.write_header().unwrap();
        writer.write_image_data(&[0; 6]).unwrap();
        writer.finish().unwrap();
        assert_eq!(read_png_metadata(&out), None);
    }

    #[test]
    fn easel_chunk_after_the_image_data_is_found() {
        let meta = metadata("after the pixels");
        let mut out = Vec::new();
        let mut encoder = png::Encoder::new(&mut out, 2, 1);
        encoder.set_color(png::ColorType::Rgb);
        let mut writer = encoder.write_header().unwrap();
        writer.write_image_data(&[0; 6]).unwrap();
        let mut chunk = png::text_metadata::ZTXtChunk::new(
            PNG_EASEL_KEY,
            serde_json::to_string(&meta).unwrap(),
        );
        chunk.compress_text().unwrap();
        writer.write_text_chunk(&chunk).unwrap();
        writer.finish().unwrap();
        assert_eq!(read_png_metadata(&out), Some(meta));
    }

    #[test]
    fn rgba_png_decodes_with_alpha() {
        let mut out = Vec::new();
        let mut encoder = png::Encoder::new(&mut out, 2, 1);
        encoder.set_color(png::ColorType::Rgba);
        let mut writer = encoder.write_header().unwrap();
        writer.write_image_data(&[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
        writer.finish().unwrap();
        let decoded = decode_image(&out).unwrap();
        assert_eq!(decoded.layout, PixelLayout::Rgba8);
        assert_eq!(decoded.pixels, [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(decoded.into_rgb8(), [1, 2, 3, 5, 6, 7]);
    }

    /// AUTOMATIC1111's `parse_generation_parameters` (modules/infotext_utils.py),
    /// transcribed: prompt lines, then lines after `Negative prompt:`, and
    /// the last line as `key: value` pairs when it holds at least 3 (quoted
    /// values are JSON strings; `WxH` values split into `key-1`/`key-2`).
    fn parse_generation_parameters(text: &str) -> BTreeMap<String, String> {
        let re_param =
            regex::Regex::new(r#"\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)"#).unwrap();
        let re_size = regex::Regex::new(r"^(\d+)x(\d+)$").unwrap();
        let mut res = BTreeMap::new();
        let (mut prompt, mut negative) = (String::new(), String::new());
        let mut done_with_prompt = false;
        let mut lines: Vec<&str> = text.trim().split('\n').collect();
        let mut last = lines.pop().unwrap_or("");
        if re_param.captures_iter(last).count() < 3 {
            lines.push(last);
            last = "";
        }
        for line in lines {
            let mut line = line.trim();
            if let Some(rest) = line.strip_prefix("Negative prompt:") {
                done_with_prompt = true;
                line = rest.trim();
            }
            let target = if done_with_prompt {
                &mut negative
            } else {
                &mut prompt
            };
            if !target.is_empty() {
                target.push('\n');
            }
            target.push_str(line);
        }
        res.insert("Prompt".to_string(), prompt);
        res.insert("Negative prompt".to_string(), negative);
        for c in re_param.captures_iter(last) {
            let key = c[1].to_string();
            let mut value = c[2].to_string();
            if value.len() >= 2 && value.starts_with('"') && value.ends_with('"') {
                value = serde_json::from_str(&value).unwrap();
            }
            if let Some(m) = re_size.captures(&value) {
                res.insert(format!("{key}-1"), m[1].to_string());
                res.insert(format!("{key}-2"), m[2].to_string());
            } else {
                res.insert(key, value);
            }
        }
        res
    }

    /// The `UserComment` of an EXIF block read by `kamadak-exif` (not by
    /// this crate), decoded as piexif's `UserComment.load` does.
    fn user_comment(exif: &exif::Exif) -> String {
        let field = exif
            .get_field(exif::Tag::UserComment, exif::In::PRIMARY)
            .expect("no UserComment");
        let exif::Value::Undefined(bytes, _) = &field.value else {
            panic!("UserComment is {:?}", field.value);
        };
        let (code, text) = bytes.split_at(8);
        assert_eq!(code, b"UNICODE\0");
        let units: Vec<u16> = text
            .chunks_exact(2)
            .map(|b| match exif.little_endian() {
                false => u16::from_be_bytes([b[0], b[1]]),
                true => u16::from_le_bytes([b[0], b[1]]),
            })
            .collect();
        String::from_utf16(&units).unwrap()
    }

    /// A prompt that needs every escape: commas, quotes, colons, line breaks
    /// and text outside the BMP (UTF-16 surrogates).
    fn hard_metadata() -> ImageMetadata {
        ImageMetadata {
            prompt: "a \"quoted\" café, at dusk: 夜\nsecond line 🐈".into(),
            negative_prompt: Some("blurry, «low» quality\nsecond negative line".into()),
            steps: 28,
            scheduler: "DPMSolverMultistepScheduler".into(),
            sigma_schedule: Some("karras".into()),
            guidance_scale: 6.5,
            seed: 18_446_744_073_709_551_614,
            width: 64,
            height: 48,
            model: "org/model, v2: \"best\"".into(),
            extra: BTreeMap::from([("Lora".to_string(), "detail: 0.9".to_string())]),
        }
    }

    fn assert_a1111_round_trip(text: &str, meta: &ImageMetadata) {
        let parsed = parse_generation_parameters(text);
        let get = |k: &str| parsed.get(k).map(String::as_str);
        assert_eq!(get("Prompt"), Some(meta.prompt.as_str()), "{text}");
        assert_eq!(get("Negative prompt"), meta.negative_prompt.as_deref());
        assert_eq!(get("Steps"), Some("28"));
        assert_eq!(get("Sampler"), Some("DPM++ 2M Karras"));
        assert_eq!(get("Schedule type"), None);
        assert_eq!(get("CFG scale"), Some("6.5"));
        assert_eq!(get("Seed"), Some("18446744073709551614"));
        assert_eq!((get("Size-1"), get("Size-2")), (Some("64"), Some("48")));
        assert_eq!(get("Model"), Some("org/model, v2: \"best\""));
        assert_eq!(get("Lora"), Some("detail: 0.9"));
    }

    fn encode_hard(format: OutputFormat) -> Vec<u8> {
        let data = test_pixels(64, 48);
        let rgb = RgbImageRef::new(64, 48, &data).unwrap();
        encode_image(&rgb, format, 90, &hard_metadata()).unwrap()
    }

    #[test]
    fn png_parameters_parse_with_a1111_rules() {
        let png = encode_hard(OutputFormat::Png);
        let reader = png::Decoder::new(Cursor::new(png)).read_info().unwrap();
        let text = reader
            .info()
            .utf8_text
            .iter()
            .find(|c| c.keyword == PNG_PARAMETERS_KEY)
            .unwrap()
            .get_text()
            .unwrap();
        assert_a1111_round_trip(&text, &hard_metadata());
    }

    #[test]
    fn jpeg_parameters_are_an_exif_user_comment_a1111_reads() {
        let jpeg = encode_hard(OutputFormat::Jpeg);
        // APP1 right after SOI and the encoder's JFIF APP0.
        assert_eq!(&jpeg[..2], &[0xFF, 0xD8]);
        let exif = exif::Reader::new()
            .read_from_container(&mut Cursor::new(&jpeg))
            .unwrap();
        assert!(!exif.little_endian(), "piexif writes big-endian TIFF");
        assert_a1111_round_trip(&user_comment(&exif), &hard_metadata());
        // Still a JPEG every decoder reads, pixels intact.
        let decoded = decode_image(&jpeg).unwrap();
        assert_eq!((decoded.width, decoded.height), (64, 48));
        let diff = mean_abs_diff(&decoded.pixels, &test_pixels(64, 48));
        assert!(diff < 4.0, "mean abs diff {diff}");
    }

    #[test]
    fn webp_parameters_are_an_exif_chunk_in_a_vp8x_file() {
        let webp = encode_hard(OutputFormat::Webp);
        assert_eq!(&webp[..4], b"RIFF");
        assert_eq!(&webp[8..16], b"WEBPVP8X");
        // VP8X flags: EXIF (bit 3) set; canvas 64x48 stored minus one.
        assert_eq!(webp[20] & 0b0000_1000, 0b0000_1000);
        assert_eq!(&webp[24..30], &[63, 0, 0, 47, 0, 0]);
        let riff_size = u32::from_le_bytes(webp[4..8].try_into().unwrap()) as usize;
        assert_eq!(riff_size + 8, webp.len());
        let exif = exif::Reader::new()
            .read_from_container(&mut Cursor::new(&webp))
            .unwrap();
        assert_a1111_round_trip(&user_comment(&exif), &hard_metadata());
        // Both the `image` crate and libwebp still decode it.
        let decoded = decode_image(&webp).unwrap();
        assert_eq!((decoded.width, decoded.height), (64, 48));
        let diff = mean_abs_diff(&decoded.into_rgb8(), &test_pixels(64, 48));
        assert!(diff < 4.0, "mean abs diff {diff}");
        let libwebp = webp::Decoder::new(&webp).decode().expect("libwebp decodes");
        assert_eq!((libwebp.width(), libwebp.height()), (64, 48));
    }

    #[test]
    fn flow_match_is_euler_with_schedule_type_simple() {
        let meta = ImageMetadata {
            scheduler: "FlowMatchEulerDiscreteScheduler".into(),
            ..hard_metadata()
        };
        let meta = ImageMetadata {
            sigma_schedule: None,
            ..meta
        };
        let parsed = parse_generation_parameters(&meta.parameters_text());
        assert_eq!(parsed.get("Sampler").map(String::as_str), Some("Euler"));
        assert_eq!(
            parsed.get("Schedule type").map(String::as_str),
            Some("Simple")
        );
        // The JSON record keeps the diffusers class.
        let json: serde_json::Value = serde_json::to_value(&meta).unwrap();
        assert_eq!(json["scheduler"], "FlowMatchEulerDiscreteScheduler");
        assert!(json.get("sigmaSchedule").is_none());
    }
}
