//! `--image`, `--mask` and `--lora` of `easel generate` (and the `image` and
//! `mask` of `easel flow run`'s image steps): reading image
//! sources (file path, `http(s)://` URL, `data:` URI), decoding them and
//! turning them into the engine's inputs, and parsing LoRA references.

use std::path::Path;

use anyhow::{bail, Context, Result};
use easel_core::{alpha_mask, decode_image, mask_luma, parse_data_uri, DecodedImage, InitImage};
use easel_diffusion::loader::ResolveOptions;
use easel_diffusion::lora::{resolve_lora, LoraSpec};
use easel_diffusion::pipelines::{ImageInput, MaskInput};

/// The largest input file read (path, URL or data URI), in bytes.
pub const MAX_INPUT_BYTES: u64 = 64 << 20;

/// The bytes an image source names: a `data:` URI, an `http(s)://` URL
/// (with the `http` feature) or a file path. `what` names the input in
/// errors as given (`--image`, `parameters.images[0].image`).
pub fn read_source(source: &str, what: &str) -> Result<Vec<u8>> {
    if source.starts_with("data:") {
        return parse_data_uri(source).with_context(|| what.to_string());
    }
    if source.starts_with("http://") || source.starts_with("https://") {
        return fetch_url(source).with_context(|| format!("{what}: fetching {source}"));
    }
    let path = Path::new(source);
    let meta = std::fs::metadata(path)
        .with_context(|| format!("{what}: cannot read {}", path.display()))?;
    if !meta.is_file() {
        bail!("{what}: {} is not a file", path.display());
    }
    if meta.len() > MAX_INPUT_BYTES {
        bail!(
            "{what}: {} is {} bytes, more than the {} allowed",
            path.display(),
            meta.len(),
            MAX_INPUT_BYTES
        );
    }
    std::fs::read(path).with_context(|| format!("{what}: cannot read {}", path.display()))
}

#[cfg(feature = "http")]
fn fetch_url(url: &str) -> Result<Vec<u8>> {
    use std::io::Read;
    let response = ureq::AgentBuilder::new()
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .get(url)
        .call()?;
    let mut bytes = Vec::new();
    response
        .into_reader()
        .take(MAX_INPUT_BYTES + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_INPUT_BYTES {
        bail!("more than {MAX_INPUT_BYTES} bytes");
    }
    Ok(bytes)
}

#[cfg(not(feature = "http"))]
fn fetch_url(_url: &str) -> Result<Vec<u8>> {
    bail!(
        "this build has no HTTP client (cargo feature `http`); download the file and pass its path"
    )
}

/// Decode an image source (PNG, JPEG or WebP); `what` names the input in
/// errors as given (`--image`, `parameters.images[0].image`).
pub fn decode_source(source: &str, what: &str) -> Result<DecodedImage> {
    let bytes = read_source(source, what)?;
    decode_image(&bytes).with_context(|| format!("{what}: {}", short(source)))
}

/// A source for messages: data URIs are cut short.
fn short(source: &str) -> String {
    if source.starts_with("data:") && source.len() > 40 {
        format!("{}...", &source[..40])
    } else {
        source.to_string()
    }
}

/// The init image and mask of `easel generate --image/--mask`. `mask` may
/// be `alpha`: the init image's alpha channel is the mask (transparent
/// repaints). The bool tells whether the image had an alpha channel (then
/// composited on white).
pub fn load_image_and_mask(
    image: &str,
    mask: Option<&str>,
) -> Result<(ImageInput, Option<MaskInput>, bool)> {
    load_image_and_mask_as(image, mask, "--image", "--mask")
}

/// [`load_image_and_mask`] with the inputs named `image_label` and
/// `mask_label` in errors (a flow step's `parameters.images[0].image`).
pub fn load_image_and_mask_as(
    image: &str,
    mask: Option<&str>,
    image_label: &str,
    mask_label: &str,
) -> Result<(ImageInput, Option<MaskInput>, bool)> {
    let decoded = decode_source(image, image_label)?;
    let init = InitImage::from_decoded(&decoded);
    let input = ImageInput {
        width: init.width as usize,
        height: init.height as usize,
        rgb: init.rgb,
    };
    let mask = match mask {
        None => None,
        Some("alpha") => Some(MaskInput {
            width: input.width,
            height: input.height,
            luma: alpha_mask(&decoded).with_context(|| format!("{mask_label} alpha"))?,
        }),
        Some(source) => {
            let m = decode_source(source, mask_label)?;
            Some(MaskInput {
                width: m.width as usize,
                height: m.height as usize,
                luma: mask_luma(&m),
            })
        }
    };
    Ok((input, mask, init.had_alpha))
}

/// The default LoRA scale when `--lora` names none (diffusers' default).
pub const DEFAULT_LORA_SCALE: f64 = 1.0;

/// Parse `REF[:SCALE]`: the scale is what follows the last `:` when it is a
/// number; the reference is a file, a folder, a LoRA file name in the model
/// folders, or a repo id (`org/name[@rev]`).
pub fn parse_lora_arg(arg: &str) -> Result<(String, f64)> {
    let (reference, scale) = match arg.rsplit_once(':') {
        Some(("", _)) => bail!("--lora {arg}: no file or repo given (use PATH_OR_REPO[:SCALE])"),
        Some((r, s)) => match s.trim().parse::<f64>() {
            Ok(v) => (r.to_string(), v),
            Err(_) if Path::new(arg).exists() => (arg.to_string(), DEFAULT_LORA_SCALE),
            Err(_) => bail!("--lora {arg}: `{s}` is not a number (use PATH_OR_REPO[:SCALE])"),
        },
        None => (arg.to_string(), DEFAULT_LORA_SCALE),
    };
    if !scale.is_finite() || !(-1.0..=3.0).contains(&scale) {
        bail!("--lora {arg}: scale {scale} is out of range (allowed: -1 to 3)");
    }
    if reference.trim().is_empty() {
        bail!("--lora {arg}: no file or repo given");
    }
    Ok((reference, scale))
}

/// Resolve `--lora` arguments to files (without loading them); names are
/// looked up in the LoRA folders of `model_dirs` (`--models-dir`).
pub fn resolve_loras(
    args: &[String],
    offline: bool,
    model_dirs: &[std::path::PathBuf],
) -> Result<Vec<LoraSpec>> {
    let options = ResolveOptions {
        offline,
        progress: true,
        model_dirs: model_dirs.to_vec(),
        ..ResolveOptions::default()
    };
    args.iter()
        .map(|arg| {
            let (reference, scale) = parse_lora_arg(arg)?;
            let path =
                resolve_lora(&reference, &options).with_context(|| format!("--lora {arg}"))?;
            Ok(LoraSpec::new(path, scale))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_args() {
        assert_eq!(parse_lora_arg("a/b").unwrap(), ("a/b".into(), 1.0));
        assert_eq!(
            parse_lora_arg("x.safetensors:0.7").unwrap(),
            ("x.safetensors".into(), 0.7)
        );
        assert_eq!(
            parse_lora_arg("org/name@main:-0.5").unwrap(),
            ("org/name@main".into(), -0.5)
        );
        assert!(parse_lora_arg("x:4")
            .unwrap_err()
            .to_string()
            .contains("-1 to 3"));
        assert!(parse_lora_arg("x:abc").is_err());
        assert!(parse_lora_arg(":0.5").is_err());
    }
}
