//! Image inputs (`image`, `mask`): an `http(s)` URL, a `data:` URI, plain
//! base64, or an asset id, read and decoded when the request arrives (a bad
//! one is a 422 `invalid_image` naming the field, before anything is stored).
//! URLs of this server's own files (`/v1/files/<hash>.<ext>`) are read from
//! disk; other URLs go through the outbound fetcher ([`crate::fetch`]).

use base64::Engine as _;
use easel_core::{decode_image, DecodedImage, OutputFormat};

use crate::auth::Principal;
use crate::error::ApiError;
use crate::util::is_uuid;
use crate::AppState;

/// An input image, read and checked.
#[derive(Debug, Clone)]
pub struct LoadedInput {
    /// The file's bytes, as given.
    pub bytes: Vec<u8>,
    /// Its format.
    pub format: OutputFormat,
    /// Pixels.
    pub width: u32,
    /// Pixels.
    pub height: u32,
}

fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid("invalid_image", field, message)
}

/// Decode base64 in any of its common spellings (standard or URL-safe,
/// padded or not, with line breaks).
pub fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let clean: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    let engines = [
        base64::engine::general_purpose::STANDARD,
        base64::engine::general_purpose::STANDARD_NO_PAD,
        base64::engine::general_purpose::URL_SAFE,
        base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ];
    engines.iter().find_map(|e| e.decode(&clean).ok())
}

/// `(hash, extension)` of a URL pointing at this server's files
/// (`…/v1/files/<hash>.<ext>`).
fn own_file(url: &str) -> Option<(String, String)> {
    let parsed = url::Url::parse(url).ok()?;
    let name = parsed.path().strip_prefix("/v1/files/")?;
    let (hash, ext) = name.split_once('.')?;
    crate::assets::is_hash(hash).then(|| (hash.to_string(), ext.to_string()))
}

/// Read the input `value` of request field `field` for `principal`.
///
/// # Errors
/// 422 `invalid_image` when it is none of the accepted forms, cannot be
/// fetched (one message for every refused or failed fetch,
/// [`crate::fetch::FETCH_FAILED`]), is too large, or is not a PNG/JPEG/WebP image that decodes.
pub async fn load_input(
    state: &AppState,
    principal: &Principal,
    value: &str,
    field: &str,
) -> Result<LoadedInput, ApiError> {
    let value = value.trim();
    let limit = state.config().max_input_image_bytes;
    let bytes = if let Some(rest) = value.strip_prefix("data:") {
        let Some((meta, payload)) = rest.split_once(',') else {
            return Err(invalid(field, "a data URI needs a `,` before its data"));
        };
        if !meta.ends_with(";base64") {
            return Err(invalid(
                field,
                "a data URI must be base64 (`data:image/png;base64,...`)",
            ));
        }
        decode_base64(payload)
            .ok_or_else(|| invalid(field, "the data URI's payload is not valid base64"))?
    } else if value.starts_with("http://") || value.starts_with("https://") {
        if let Some((hash, ext)) = own_file(value) {
            match state.assets().get(&hash, &ext).await {
                Ok(Some(bytes)) => bytes.to_vec(),
                Ok(None) => return Err(invalid(field, format!("no stored file {hash}.{ext}"))),
                Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
                    return Err(invalid(field, format!("no stored file {hash}.{ext}")))
                }
                Err(e) => return Err(ApiError::internal("reading an input file", e)),
            }
        } else if !state.config().allow_remote_images {
            return Err(invalid(
                field,
                "this server does not fetch image URLs (allow_remote_images = false); \
                 send the image as base64 or a data URI",
            ));
        } else {
            let url = value.to_string();
            let fetcher = state.fetcher().clone();
            let timeout = std::time::Duration::from_secs(state.config().fetch_timeout_seconds);
            let result =
                tokio::task::spawn_blocking(move || fetcher.get(&url, limit as u64, timeout))
                    .await
                    .map_err(|e| ApiError::internal("fetching an input image", e))?;
            result.map_err(|e| {
                tracing::info!("{field}: fetching {value} failed: {}", e.detail);
                invalid(field, e.to_string())
            })?
        }
    } else if is_uuid(value) {
        let asset = state
            .store()
            .asset(value)
            .await?
            .filter(|a| a.key_id == principal.key_id)
            .ok_or_else(|| invalid(field, format!("no asset with id `{value}`")))?;
        state
            .assets()
            .get(&asset.hash, &asset.extension)
            .await
            .map_err(|e| ApiError::internal("reading an asset file", e))?
            .ok_or_else(|| ApiError::internal("reading an asset file", "the file is gone"))?
            .to_vec()
    } else {
        decode_base64(value).ok_or_else(|| {
            invalid(
                field,
                "not an image: give an http(s) URL, a data URI, an asset id, or valid base64",
            )
        })?
    };
    if bytes.len() > limit {
        return Err(invalid(
            field,
            format!(
                "the image is {} bytes; the limit is {limit} (max_input_image_bytes)",
                bytes.len()
            ),
        ));
    }
    let decoded = decode_image(&bytes).map_err(|e| invalid(field, e.to_string()))?;
    Ok(LoadedInput {
        format: decoded.format,
        width: decoded.width,
        height: decoded.height,
        bytes,
    })
}

/// A mask as 8-bit luma: PIL's `convert("L")` of the RGB channels
/// (`(19595 R + 38470 G + 7471 B + 2^15) >> 16`); alpha is ignored.
pub fn mask_luma(image: DecodedImage) -> Vec<u8> {
    let channels = image.layout.channels();
    image
        .pixels
        .chunks_exact(channels)
        .map(|p| {
            let (r, g, b) = (u32::from(p[0]), u32::from(p[1]), u32::from(p[2]));
            ((19595 * r + 38470 * g + 7471 * b + 0x8000) >> 16) as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_spellings() {
        assert_eq!(decode_base64("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(decode_base64("aGVsbG8").unwrap(), b"hello");
        assert_eq!(decode_base64("aGVs\nbG8=").unwrap(), b"hello");
        assert!(decode_base64("not base64!").is_none());
    }

    #[test]
    fn own_file_urls() {
        let h = "a".repeat(64);
        assert_eq!(
            own_file(&format!("http://x:1/v1/files/{h}.png")),
            Some((h.clone(), "png".into()))
        );
        assert_eq!(own_file("http://x/v1/files/abc.png"), None);
        assert_eq!(own_file("http://x/other"), None);
    }
}
