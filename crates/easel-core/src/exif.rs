//! The AUTOMATIC1111 `parameters` text as EXIF, for JPEG and WebP files.
//!
//! AUTOMATIC1111's web UI (`modules/images.py`, `save_image_with_geninfo`)
//! stores the parameters of a JPEG or WebP image as
//! `piexif.dump({"Exif": {UserComment: UserComment.dump(text, encoding="unicode")}})`
//! and reads them back from the same tag (`read_info_from_image`). This
//! module writes the same bytes:
//!
//! - a big-endian (`MM`) TIFF structure, as piexif writes, holding IFD0 with
//!   one entry, the Exif IFD pointer (tag 0x8769), and the Exif IFD with one
//!   entry, `UserComment` (tag 0x9286, type UNDEFINED);
//! - the comment is the 8-byte character code `UNICODE\0` followed by the
//!   text in UTF-16 in the TIFF header's byte order (EXIF 2.32, section
//!   4.6.5, table 9), i.e. UTF-16BE, which is what piexif's
//!   `UserComment.load` decodes for the `UNICODE` code.
//!
//! The TIFF bytes go into a JPEG `APP1` segment (`Exif\0\0` + TIFF, right
//! after SOI and any APP0/JFIF segment) or a WebP `EXIF` chunk (raw TIFF, as
//! the WebP container specification says) in an extended (`VP8X`) file with
//! the EXIF flag set. The container surgery is done by the `img-parts` crate.

use img_parts::jpeg::Jpeg;
use img_parts::webp::WebP;
use img_parts::{Bytes, ImageEXIF};

/// EXIF tag of the pointer from IFD0 to the Exif IFD (TIFF/EXIF `ExifIFDPointer`).
pub const TAG_EXIF_IFD_POINTER: u16 = 0x8769;
/// EXIF tag `UserComment`, in the Exif IFD.
pub const TAG_USER_COMMENT: u16 = 0x9286;
/// The 8-byte character code of a `UserComment` in Unicode (UCS-2/UTF-16).
pub const USER_COMMENT_UNICODE: &[u8; 8] = b"UNICODE\0";

/// Bytes of TIFF structure before the comment: header (8), IFD0 (2 + 12 + 4),
/// Exif IFD (2 + 12 + 4).
const TIFF_OVERHEAD: usize = 8 + 18 + 18;
/// Largest TIFF payload of one JPEG APP1 segment: 65535 minus the 2-byte
/// length and the 6-byte `Exif\0\0` identifier.
pub const JPEG_EXIF_MAX_BYTES: usize = 65535 - 2 - 6;

/// Errors of embedding EXIF.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExifError {
    /// The text does not fit one JPEG APP1 segment.
    #[error("the parameters text needs {needed} bytes of EXIF, but a JPEG APP1 segment holds at most {max}; shorten the prompt or use png or webp")]
    TooLarge {
        /// Bytes the EXIF block would take.
        needed: usize,
        /// The limit, [`JPEG_EXIF_MAX_BYTES`].
        max: usize,
    },
    /// The bytes given are not a JPEG or WebP file `img-parts` can read.
    #[error("could not read the encoded {container} to add EXIF: {reason}")]
    Container {
        /// `JPEG` or `WebP`.
        container: &'static str,
        /// The parser's message.
        reason: String,
    },
}

/// The TIFF (EXIF) bytes holding `text` as a `UNICODE` `UserComment`,
/// big-endian, as `piexif.dump` writes them. Text of any length; the JPEG
/// limit is checked by [`jpeg_with_user_comment`].
pub fn user_comment_tiff(text: &str) -> Vec<u8> {
    let comment: Vec<u8> = USER_COMMENT_UNICODE
        .iter()
        .copied()
        .chain(text.encode_utf16().flat_map(u16::to_be_bytes))
        .collect();
    let mut out = Vec::with_capacity(TIFF_OVERHEAD + comment.len());
    // Header: byte order, magic 42, offset of IFD0.
    out.extend_from_slice(b"MM\0\x2A");
    out.extend_from_slice(&8u32.to_be_bytes());
    // IFD0 at 8: one entry, the Exif IFD pointer (LONG), then no next IFD.
    let exif_ifd = 8 + 18u32;
    push_ifd(&mut out, TAG_EXIF_IFD_POINTER, 4, 1, exif_ifd);
    // Exif IFD at 26: one entry, UserComment (UNDEFINED), data after it.
    let data_offset = exif_ifd + 18;
    // A comment of at most 4 bytes would be stored inline; ours has the
    // 8-byte code, so it is always at `data_offset`.
    let count = u32::try_from(comment.len()).unwrap_or(u32::MAX);
    push_ifd(&mut out, TAG_USER_COMMENT, 7, count, data_offset);
    debug_assert_eq!(out.len(), TIFF_OVERHEAD);
    out.extend_from_slice(&comment);
    out
}

/// One IFD with a single 12-byte entry and a zero next-IFD offset.
fn push_ifd(out: &mut Vec<u8>, tag: u16, field_type: u16, count: u32, value: u32) {
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&tag.to_be_bytes());
    out.extend_from_slice(&field_type.to_be_bytes());
    out.extend_from_slice(&count.to_be_bytes());
    out.extend_from_slice(&value.to_be_bytes());
    out.extend_from_slice(&0u32.to_be_bytes());
}

/// `jpeg` with an `APP1` EXIF segment holding `text` as `UserComment`
/// (replacing any EXIF segment already there).
///
/// # Errors
/// [`ExifError::TooLarge`] when the EXIF block exceeds
/// [`JPEG_EXIF_MAX_BYTES`] (about 32,700 UTF-16 code units of text),
/// [`ExifError::Container`] when `jpeg` cannot be parsed.
pub fn jpeg_with_user_comment(jpeg: Vec<u8>, text: &str) -> Result<Vec<u8>, ExifError> {
    let tiff = user_comment_tiff(text);
    if tiff.len() > JPEG_EXIF_MAX_BYTES {
        return Err(ExifError::TooLarge {
            needed: tiff.len(),
            max: JPEG_EXIF_MAX_BYTES,
        });
    }
    let mut parsed = Jpeg::from_bytes(Bytes::from(jpeg)).map_err(|e| ExifError::Container {
        container: "JPEG",
        reason: e.to_string(),
    })?;
    parsed.set_exif(Some(Bytes::from(tiff)));
    Ok(parsed.encoder().bytes().to_vec())
}

/// `webp` as an extended (`VP8X`) WebP with the EXIF flag and an `EXIF`
/// chunk holding `text` as `UserComment` (a simple `VP8 ` file is converted;
/// the canvas size is taken from its frame header).
///
/// # Errors
/// [`ExifError::Container`] when `webp` cannot be parsed.
pub fn webp_with_user_comment(webp: Vec<u8>, text: &str) -> Result<Vec<u8>, ExifError> {
    let mut parsed = WebP::from_bytes(Bytes::from(webp)).map_err(|e| ExifError::Container {
        container: "WebP",
        reason: e.to_string(),
    })?;
    parsed.set_exif(Some(Bytes::from(user_comment_tiff(text))));
    Ok(parsed.encoder().bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiff_layout_matches_piexif() {
        let tiff = user_comment_tiff("Aé");
        // Header, IFD0 -> Exif IFD at 26, UserComment of 8 + 4 bytes at 44.
        assert_eq!(&tiff[..8], b"MM\0\x2A\0\0\0\x08");
        assert_eq!(&tiff[8..10], &[0, 1]);
        assert_eq!(&tiff[10..12], &[0x87, 0x69]);
        assert_eq!(&tiff[18..22], &26u32.to_be_bytes());
        assert_eq!(&tiff[28..30], &[0x92, 0x86]);
        assert_eq!(&tiff[30..32], &[0, 7]);
        assert_eq!(&tiff[32..36], &12u32.to_be_bytes());
        assert_eq!(&tiff[36..40], &44u32.to_be_bytes());
        assert_eq!(&tiff[44..], b"UNICODE\0\0A\0\xE9");
    }

    #[test]
    fn too_long_text_for_jpeg_is_an_error_not_a_silent_drop() {
        let text = "x".repeat(40_000);
        let err = jpeg_with_user_comment(vec![0xFF, 0xD8, 0xFF, 0xD9], &text).unwrap_err();
        assert_eq!(
            err,
            ExifError::TooLarge {
                needed: 80_052,
                max: 65527
            }
        );
        assert!(matches!(
            jpeg_with_user_comment(b"not a jpeg".to_vec(), "x"),
            Err(ExifError::Container { .. })
        ));
        assert!(matches!(
            webp_with_user_comment(b"not a webp".to_vec(), "x"),
            Err(ExifError::Container { .. })
        ));
    }
}
