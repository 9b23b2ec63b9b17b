//! easel-core: the request schema, validation and defaults, and the image
//! codecs. No tensors, no network.
//!
//! - [`params`]: [`GenerationParams`], the per-image parameters the engine
//!   runs, and their validation ([`ValidationError`] names the field path and
//!   the allowed range; nothing is clamped silently).
//! - [`codec`]: encode RGB8 pixels to PNG (with generation metadata), JPEG or
//!   lossy WebP, each with AUTOMATIC1111's `parameters` text; decode
//!   PNG/JPEG/WebP; read the metadata back from a PNG.
//! - [`exif`]: the `parameters` text as EXIF `UserComment` in JPEG and WebP.
//! - [`sampler_names`]: diffusers scheduler classes in the web UI's spelling.
//! - [`input`]: init images and masks: data URIs, alpha composited on white
//!   or read as the mask, mask luma.
//! - [`fs`]: atomic file writes and output file naming for the CLI.
//! - [`request`]: the native request (`images[]` with request-wide defaults
//!   and per-image overrides), parsed with field paths and validated.

#![warn(missing_docs)]

pub mod codec;
pub mod exif;
pub mod fs;
pub mod input;
pub mod integer;
pub mod params;
pub mod request;
pub mod sampler_names;

pub use codec::{
    decode_image, encode_image, read_png_metadata, CodecError, DecodedImage, ImageMetadata,
    PixelLayout, RgbImageRef,
};
pub use fs::{output_paths, resolve_output_format, write_atomic, OutputPathError, OutputTarget};
pub use input::{alpha_mask, mask_luma, parse_data_uri, InitImage, InputError};
pub use params::{
    GenerationParams, OutputFormat, ParseEnumError, Precision, ValidateOptions, ValidationError,
};
pub use request::{ImageDefinition, LoraRef, NativeRequest, RequestError, RequestErrorKind};
