//! AUTOMATIC1111's informational routes that clients call besides
//! generation: `POST /sdapi/v1/png-info` (the `parameters` text a PNG
//! carries, as the web UI's `pnginfoapi` answers it), and
//! `GET /sdapi/v1/upscalers` / `GET /sdapi/v1/scripts` (what easel has:
//! no upscalers, no web UI scripts).

use std::collections::BTreeMap;
use std::io::Cursor;

use axum::Json;
use base64::Engine as _;
use serde_json::{json, Map, Value};

use super::names::invalid;
use super::{docs, parse_body, Result};

/// The text chunks of a PNG (`tEXt`, `zTXt`, `iTXt`, before or after the
/// image data), by keyword; the first of a repeated keyword wins.
///
/// # Errors
/// When `bytes` is not a readable PNG (the message says why).
pub fn png_text_chunks(bytes: &[u8]) -> std::result::Result<BTreeMap<String, String>, String> {
    let mut reader = png::Decoder::new(Cursor::new(bytes))
        .read_info()
        .map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    collect_text(reader.info(), &mut out);
    // Chunks after the image data are read by skipping the frames.
    if reader.finish().is_ok() {
        collect_text(reader.info(), &mut out);
    }
    Ok(out)
}

fn collect_text(info: &png::Info<'_>, out: &mut BTreeMap<String, String>) {
    for c in &info.uncompressed_latin1_text {
        out.entry(c.keyword.clone())
            .or_insert_with(|| c.text.clone());
    }
    for c in &info.compressed_latin1_text {
        if let Ok(text) = c.get_text() {
            out.entry(c.keyword.clone()).or_insert(text);
        }
    }
    for c in &info.utf8_text {
        if let Ok(text) = c.get_text() {
            out.entry(c.keyword.clone()).or_insert(text);
        }
    }
}

/// One `key: value` pair of a parameters line at `s`: the key (a word
/// character, then word characters, spaces, `-` or `/`), the value (a
/// JSON-quoted string or everything up to the next comma) and the rest
/// after the comma. `None` when no pair starts here.
fn next_pair(s: &str) -> Option<(String, String, &str)> {
    let s = s.trim_start();
    let colon = s.find(':')?;
    let key = s[..colon].trim_end();
    let first = key.chars().next()?;
    let key_ok = (first.is_alphanumeric() || first == '_')
        && key
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '_' | ' ' | '-' | '/'));
    if !key_ok {
        return None;
    }
    let rest = s[colon + 1..].trim_start();
    if rest.starts_with('"') {
        // A quoted value: up to the closing quote, escapes kept for JSON.
        let mut escaped = false;
        for (i, c) in rest.char_indices().skip(1) {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => {
                    let quoted = &rest[..=i];
                    let value = serde_json::from_str::<String>(quoted)
                        .unwrap_or_else(|_| quoted.to_string());
                    let after = rest[i + 1..].trim_start();
                    let after = after.strip_prefix(',').unwrap_or(after);
                    return Some((key.to_string(), value, after));
                }
                _ => escaped = false,
            }
        }
    }
    match rest.find(',') {
        Some(i) => Some((key.to_string(), rest[..i].to_string(), &rest[i + 1..])),
        None => Some((key.to_string(), rest.to_string(), "")),
    }
}

fn pairs(line: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = line;
    while !rest.trim().is_empty() {
        let Some((k, v, after)) = next_pair(rest) else {
            break;
        };
        out.push((k, v));
        rest = after;
    }
    out
}

/// The web UI's reading of a `parameters` text (its
/// `parse_generation_parameters`, without the defaults it adds for
/// settings the text omits): `Prompt` (the lines before `Negative
/// prompt:`), `Negative prompt`, and each `Key: value` of the last line
/// when it holds at least 3 pairs, values as strings (quoted ones
/// unquoted), `WxH` values split into `Key-1` / `Key-2`.
pub fn parse_parameters(text: &str) -> Map<String, Value> {
    let mut lines: Vec<&str> = text.trim().split('\n').collect();
    let mut last = lines.pop().unwrap_or("");
    let settings = pairs(last);
    if settings.len() < 3 {
        lines.push(last);
        last = "";
    }
    let (mut prompt, mut negative) = (Vec::new(), Vec::new());
    let mut in_negative = false;
    for line in lines {
        let mut line = line.trim();
        if let Some(rest) = line.strip_prefix("Negative prompt:") {
            in_negative = true;
            line = rest.trim();
        }
        if in_negative {
            negative.push(line);
        } else {
            prompt.push(line);
        }
    }
    let mut out = Map::new();
    out.insert("Prompt".into(), prompt.join("\n").into());
    out.insert("Negative prompt".into(), negative.join("\n").into());
    if !last.is_empty() {
        for (k, v) in settings {
            let size = v.split_once('x').filter(|(w, h)| {
                !w.is_empty()
                    && !h.is_empty()
                    && w.chars().chain(h.chars()).all(|c| c.is_ascii_digit())
            });
            match size {
                Some((w, h)) => {
                    out.insert(format!("{k}-1"), w.into());
                    out.insert(format!("{k}-2"), h.into());
                }
                None => {
                    out.insert(k, v.into());
                }
            }
        }
    }
    out
}

/// `POST /sdapi/v1/png-info`: `{image}` (a base64 PNG, or a `data:` URI)
/// → `{info, items, parameters}`: `info` the `parameters` text chunk (empty
/// when there is none), `items` the other text chunks by keyword (easel's
/// own `easel` chunk among them), `parameters` [`parse_parameters`] of
/// `info`.
#[utoipa::path(post, path = "/sdapi/v1/png-info", tag = "a1111",
    request_body = docs::PngInfoRequest,
    responses((status = 200, description = "`{info, items, parameters}`", body = docs::PngInfoResponse),
              (status = 401, description = "Missing or wrong key", body = docs::HttpError),
              (status = 413, description = "Body too large", body = docs::HttpError),
              (status = 422, description = "`image` missing, not base64 or not a PNG", body = docs::ValidationError)),
    security(("bearer" = []), ("basic" = [])))]
pub async fn png_info(crate::http::RawBody(body): crate::http::RawBody) -> Result<Json<Value>> {
    let body = parse_body(&body)?;
    let image = match body.get("image") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.trim(),
        Some(Value::String(_)) | None | Some(Value::Null) => {
            return Err(invalid("image", "`image` is required: a base64 PNG").into())
        }
        Some(other) => {
            return Err(invalid(
                "image",
                format!("`image` must be a base64 string, not `{other}`"),
            )
            .into())
        }
    };
    let encoded = match image.strip_prefix("data:") {
        Some(uri) => uri.split_once(',').map_or("", |(_, data)| data),
        None => image,
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded.as_bytes())
        .map_err(|e| invalid("image", format!("`image` is not base64: {e}")))?;
    let mut chunks = png_text_chunks(&bytes).map_err(|e| {
        invalid(
            "image",
            format!("`image` is not a readable PNG ({e}); png-info reads PNG text chunks"),
        )
    })?;
    let info = chunks.remove("parameters").unwrap_or_default();
    let parameters = if info.is_empty() {
        Map::new()
    } else {
        parse_parameters(&info)
    };
    Ok(Json(json!({
        "info": info,
        "items": chunks,
        "parameters": parameters,
    })))
}

/// `GET /sdapi/v1/upscalers`: easel has no upscalers (no hires. fix, no
/// extras), so the list is empty.
#[utoipa::path(get, path = "/sdapi/v1/upscalers", tag = "a1111",
    responses((status = 200, description = "`[]`: easel has no upscalers", body = Vec<docs::UpscalerItem>),
              (status = 401, description = "Missing or wrong key", body = docs::HttpError)),
    security(("bearer" = []), ("basic" = [])))]
pub async fn upscalers() -> Json<Vec<Value>> {
    Json(Vec::new())
}

/// `GET /sdapi/v1/scripts`: easel runs no web UI scripts (`script_name`
/// is refused), so both lists are empty.
#[utoipa::path(get, path = "/sdapi/v1/scripts", tag = "a1111",
    responses((status = 200, description = "`{txt2img: [], img2img: []}`", body = docs::ScriptsList),
              (status = 401, description = "Missing or wrong key", body = docs::HttpError)),
    security(("bearer" = []), ("basic" = [])))]
pub async fn scripts() -> Json<Value> {
    Json(json!({"txt2img": [], "img2img": []}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_parse_as_the_web_ui_reads_them() {
        let text = "a cat, <lora:x:0.5>\nsecond line\nNegative prompt: blurry\n\
                    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 512x768, \
                    Model: \"tiny, sd\", Lora hashes: \"x: abc\"";
        let p = parse_parameters(text);
        assert_eq!(p["Prompt"], "a cat, <lora:x:0.5>\nsecond line");
        assert_eq!(p["Negative prompt"], "blurry");
        assert_eq!(p["Steps"], "20");
        assert_eq!(p["Sampler"], "Euler a");
        assert_eq!(p["CFG scale"], "7");
        assert_eq!(p["Size-1"], "512");
        assert_eq!(p["Size-2"], "768");
        assert_eq!(p["Model"], "tiny, sd");
        assert_eq!(p["Lora hashes"], "x: abc");
        assert!(!p.contains_key("Size"));
        // A last line with fewer than 3 pairs is part of the prompt.
        let p = parse_parameters("a dog\nStyle: x");
        assert_eq!(p["Prompt"], "a dog\nStyle: x");
        assert_eq!(p.len(), 2);
    }
}
