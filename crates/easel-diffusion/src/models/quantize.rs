//! Quantizing a model's weights as it loads (`--quantize q8_0 | q4_0 |
//! fp8`): a user with the original bf16 / f16 weights runs the big
//! components (the UNet or FLUX.1 transformer, and FLUX's T5 encoder) in a
//! half to a third of the memory.
//!
//! Every linear weight (`(out, in)`, `in` a multiple of 32) inside the
//! repeated blocks of a quantized component (see
//! [`Quantization::applies`]) is converted once, when the model asks for
//! it, to:
//! - `q8_0`: ggml's Q8_0 (blocks of 32 int8 values with an f16 scale
//!   `d = amax / 127`; 8.5 bits per weight), as llama.cpp's
//!   `quantize_row_q8_0` (candle's `k_quants`);
//! - `q4_0`: ggml's Q4_0 (blocks of 32 4-bit values, `d = max / -8`; 4.5
//!   bits per weight), as `quantize_row_q4_0`;
//! - `fp8`: `float8_e4m3fn` with a per-tensor scale `amax / 448`
//!   (ComfyUI's scaled-fp8 layout; 8 bits per weight).
//!
//! The layers outside the blocks (FLUX's `x_embedder`, `context_embedder`,
//! time / guidance / text embedders, `norm_out` and `proj_out`; the UNet's
//! `time_embedding`, `add_embedding`, `conv_in` / `conv_out`), convolution
//! weights, biases, norms and embedding tables keep their stored precision,
//! as city96's GGUF files and stable-diffusion.cpp's converter leave them
//! (they are a small share of the weights and the most sensitive to
//! rounding), and so does a weight already quantized in its file. The
//! kernels widen each weight per layer ([`super::stored::StoredTensor`]),
//! so the activations and products stay f32.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use super::stored::{Fp8Format, Fp8Tensor, StoredTensor};
use super::weights::TensorSource;
use crate::error::{Error, Result};

/// The quantizations `--quantize` applies at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Quantization {
    /// ggml Q8_0 (8.5 bits per weight).
    Q8_0,
    /// ggml Q4_0 (4.5 bits per weight).
    Q4_0,
    /// `float8_e4m3fn` with a per-tensor scale (8 bits per weight).
    Fp8,
}

impl Quantization {
    /// The allowed names, for messages.
    pub const NAMES: &'static str = "q8_0, q4_0, fp8";

    /// The name (`q8_0`, `q4_0`, `fp8`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
            Self::Fp8 => "fp8",
        }
    }

    /// Bytes a quantized `(rows, cols)` weight holds.
    pub fn bytes(self, rows: usize, cols: usize) -> u64 {
        let n = (rows * cols) as u64;
        match self {
            Self::Q8_0 => n / 32 * 34,
            Self::Q4_0 => n / 32 * 18,
            Self::Fp8 => n,
        }
    }

    /// Whether a weight of `shape` named `name` (its diffusers /
    /// transformers key) is quantized: a 2-D `*.weight` with rows a
    /// multiple of 32 values, inside a repeated block ([`BLOCK_PREFIXES`]:
    /// FLUX `transformer_blocks.*` / `single_transformer_blocks.*`, UNet
    /// `down_blocks.*` / `mid_block.*` / `up_blocks.*`, T5 `encoder.block.*`),
    /// and not an embedding table ([`is_embedding_table`]); or T5's token
    /// table ([`is_t5_token_table`]: 32128 x 4096 in T5-XXL, 0.25 GiB in
    /// f16; its looked-up rows are widened, as city96's T5 GGUF files keep
    /// `token_embd` quantized).
    pub fn applies(name: &str, shape: &[usize]) -> bool {
        matches!(shape, [_, cols] if cols % 32 == 0 && *cols > 0)
            && name.ends_with(".weight")
            && ((BLOCK_PREFIXES.iter().any(|p| name.starts_with(p)) && !is_embedding_table(name))
                || is_t5_token_table(name))
    }

    /// `t` (2-D) in this quantization.
    ///
    /// Errors: `t` is not 2-D with rows a multiple of 32 values.
    pub fn quantize(self, t: &Tensor) -> Result<StoredTensor> {
        // A compact copy: candle's `QTensor::quantize` reads the source's
        // whole storage, whatever part of it a view (a row slice) covers.
        let values = t
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let t = Tensor::from_vec(values, t.dims(), &Device::Cpu)?;
        Ok(match self {
            Self::Q8_0 => {
                StoredTensor::Quantized(Arc::new(QTensor::quantize(&t, GgmlDType::Q8_0)?))
            }
            Self::Q4_0 => {
                StoredTensor::Quantized(Arc::new(QTensor::quantize(&t, GgmlDType::Q4_0)?))
            }
            Self::Fp8 => {
                let values = t.flatten_all()?.to_vec1::<f32>()?;
                StoredTensor::Fp8(Arc::new(Fp8Tensor::quantize(
                    &values,
                    t.dims(),
                    Fp8Format::E4M3Fn,
                )?))
            }
        })
    }
}

impl FromStr for Quantization {
    type Err = Error;

    /// `q8_0`, `q4_0` or `fp8` (case-insensitive).
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "q8_0" => Ok(Self::Q8_0),
            "q4_0" => Ok(Self::Q4_0),
            "fp8" => Ok(Self::Fp8),
            _ => Err(Error::invalid(
                "quantize",
                format!("`{s}` is not a quantization; allowed: {}", Self::NAMES),
            )),
        }
    }
}

/// The key prefixes of the repeated blocks whose linear weights
/// `--quantize` converts ([`Quantization::applies`]).
pub const BLOCK_PREFIXES: [&str; 6] = [
    "transformer_blocks.",
    "single_transformer_blocks.",
    "down_blocks.",
    "mid_block.",
    "up_blocks.",
    "encoder.block.",
];

/// Whether a tensor is an embedding table (looked up by index, never a
/// matrix product), by the checkpoint names of CLIP
/// (`token_embedding.weight`, `position_embedding.weight`) and T5
/// (`shared.weight`, `embed_tokens.weight`,
/// `relative_attention_bias.weight`).
pub fn is_embedding_table(name: &str) -> bool {
    name.ends_with("embedding.weight")
        || name.ends_with("embed_tokens.weight")
        || name.ends_with("relative_attention_bias.weight")
        || name == "shared.weight"
}

/// Whether a tensor is T5's token embedding table (`shared.weight`, or
/// `encoder.embed_tokens.weight` in checkpoints that store only the tied
/// copy): the one embedding table `--quantize` converts, since T5 looks up
/// its rows one token at a time ([`crate::models::t5`]) and it is the
/// largest tensor of FLUX's text encoders.
pub fn is_t5_token_table(name: &str) -> bool {
    name == "shared.weight" || name == "encoder.embed_tokens.weight"
}

/// A [`TensorSource`] that hands out `base`'s linear weights quantized
/// ([`Quantization::applies`]); everything else as `base` stores it.
pub struct QuantizingSource {
    base: Arc<dyn TensorSource>,
    quantization: Quantization,
}

impl QuantizingSource {
    /// `base` with its linear weights in `quantization`.
    pub fn new(base: Arc<dyn TensorSource>, quantization: Quantization) -> Self {
        Self { base, quantization }
    }
}

impl TensorSource for QuantizingSource {
    fn tensor(&self, name: &str, shape: &[usize], device: &Device) -> Result<Option<Tensor>> {
        self.stored(name, shape, device)?
            .map(|t| t.to_dense(device))
            .transpose()
    }

    fn stored(&self, name: &str, shape: &[usize], device: &Device) -> Result<Option<StoredTensor>> {
        let Some(t) = self.base.stored(name, shape, device)? else {
            return Ok(None);
        };
        Ok(Some(match t {
            StoredTensor::Dense(d) if device.is_cpu() && Quantization::applies(name, d.dims()) => {
                self.quantization.quantize(&d)?
            }
            other => other,
        }))
    }

    fn contains(&self, name: &str) -> bool {
        self.base.contains(name)
    }

    fn origin(&self) -> PathBuf {
        self.base.origin()
    }

    fn keys(&self) -> Vec<String> {
        self.base.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::weights::RandomSource;

    #[test]
    fn names_parse_and_bad_ones_list_the_allowed() {
        assert_eq!("Q8_0".parse::<Quantization>().unwrap(), Quantization::Q8_0);
        assert_eq!("q4_0".parse::<Quantization>().unwrap(), Quantization::Q4_0);
        assert_eq!("fp8".parse::<Quantization>().unwrap(), Quantization::Fp8);
        let err = "int4".parse::<Quantization>().unwrap_err().to_string();
        assert!(
            err.contains("quantize") && err.contains("q8_0, q4_0, fp8"),
            "{err}"
        );
    }

    /// Linear weights come out quantized and close to the source; other
    /// tensors untouched.
    #[test]
    fn linear_weights_are_quantized_others_kept() {
        let base: Arc<dyn TensorSource> = Arc::new(RandomSource::new(DType::F16));
        let dev = Device::Cpu;
        for (q, tol) in [
            (Quantization::Q8_0, 0.01),
            (Quantization::Q4_0, 0.15),
            (Quantization::Fp8, 0.07),
        ] {
            let src = QuantizingSource::new(base.clone(), q);
            let w = src
                .stored("transformer_blocks.0.attn.to_q.weight", &[64, 96], &dev)
                .unwrap()
                .unwrap();
            assert!(!matches!(w, StoredTensor::Dense(_)), "{q:?}");
            let want = base
                .tensor("transformer_blocks.0.attn.to_q.weight", &[64, 96], &dev)
                .unwrap()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let got = w.to_dense(&dev).unwrap();
            let err = ((got - &want)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                / want
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap())
            .sqrt();
            assert!(err < tol, "{q:?}: relative error {err}");
            for (name, shape) in [
                ("transformer_blocks.0.attn.to_q.bias", vec![64]),
                ("conv_in.weight", vec![32, 4, 3, 3]),
                ("down_blocks.0.resnets.0.conv1.weight", vec![32, 32, 3, 3]),
                (
                    "text_model.embeddings.token_embedding.weight",
                    vec![100, 64],
                ),
                (
                    "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                    vec![32, 64],
                ),
                ("x_embedder.weight", vec![64, 64]),
                ("transformer_blocks.0.proj.weight", vec![8, 20]),
            ] {
                let t = src.stored(name, &shape, &dev).unwrap().unwrap();
                assert!(matches!(t, StoredTensor::Dense(_)), "{q:?} {name}");
            }
            // T5's token table (either name) is the one embedding table
            // converted.
            for name in ["shared.weight", "encoder.embed_tokens.weight"] {
                let t = src.stored(name, &[100, 64], &dev).unwrap().unwrap();
                assert!(!matches!(t, StoredTensor::Dense(_)), "{q:?} {name}");
            }
        }
    }
}
