//! The T5 encoder (`T5EncoderModel`), FLUX.1's `text_encoder_2`, following
//! transformers' `modeling_t5.py` (Raffel et al. 2020, arXiv:1910.10683).
//!
//! Pre-norm blocks with T5's scale-only RMS layer norm, unscaled attention
//! with a learned, bucketed relative position bias (computed by the first
//! block and shared by all), and a feed-forward that is either `relu`-style
//! (`wi`, `wo`) or gated (`wi_0`, `wi_1`, `wo`; T5 v1.1 / FLUX use
//! `gated-gelu`). Keys follow the published layout
//! (`encoder.block.N.layer.0.SelfAttention.q.weight`, `shared.weight`).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::layers::{
    merge_heads, on_device, scaled_dot_product_attention, split_heads, Activation, Linear,
};
use super::stored::StoredTensor;
use super::weights::Weights;
use crate::error::{Error, Result};

/// The fields of a transformers `T5Config` the encoder uses.
#[derive(Debug, Clone, Deserialize)]
pub struct T5Config {
    /// Token vocabulary size (32128 for T5 v1.1).
    pub vocab_size: usize,
    /// Width of the residual stream (4096 for T5-XXL).
    pub d_model: usize,
    /// Width of each attention head.
    pub d_kv: usize,
    /// Width of the feed-forward layer.
    pub d_ff: usize,
    /// Encoder blocks.
    pub num_layers: usize,
    /// Attention heads per block.
    pub num_heads: usize,
    /// Relative position buckets (default 32).
    #[serde(default = "d_buckets")]
    pub relative_attention_num_buckets: usize,
    /// Distance beyond which relative positions share a bucket (default 128).
    #[serde(default = "d_max_distance")]
    pub relative_attention_max_distance: usize,
    /// Epsilon of the RMS layer norms (default 1e-6).
    #[serde(default = "d_eps")]
    pub layer_norm_epsilon: f64,
    /// `{ACT}` or `gated-{ACT}` (default `relu`); `gated-gelu` means the tanh
    /// approximation of GELU (`gelu_new`), as transformers' `T5Config` says.
    #[serde(default = "d_ff_proj")]
    pub feed_forward_proj: String,
}

fn d_buckets() -> usize {
    32
}
fn d_max_distance() -> usize {
    128
}
fn d_eps() -> f64 {
    1e-6
}
fn d_ff_proj() -> String {
    "relu".into()
}

/// The feed-forward activation a `feed_forward_proj` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FfActivation {
    Relu,
    Other(Activation),
}

impl FfActivation {
    fn forward(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Relu => Ok(x.relu()?),
            Self::Other(a) => a.forward(x),
        }
    }
}

impl T5Config {
    /// Read a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::models::read_config(path)
    }

    /// `(gated, activation)` from `feed_forward_proj`, as `T5Config.__post_init__`.
    fn feed_forward(&self) -> Result<(bool, FfActivation)> {
        let parts: Vec<&str> = self.feed_forward_proj.split('-').collect();
        let (gated, name) = match parts.as_slice() {
            [act] => (false, *act),
            ["gated", act] => (true, *act),
            _ => {
                return Err(Error::config(
                    "text_encoder_2",
                    format!(
                        "feed_forward_proj `{}` is not of the form `ACT` or `gated-ACT`",
                        self.feed_forward_proj
                    ),
                ))
            }
        };
        let act = match (gated, name) {
            (_, "relu") => FfActivation::Relu,
            (true, "gelu") => FfActivation::Other(Activation::GeluTanh),
            (_, other) => FfActivation::Other(Activation::from_name("text_encoder_2", other)?),
        };
        Ok((gated, act))
    }

    fn check(&self) -> Result<()> {
        for (name, v) in [
            ("d_model", self.d_model),
            ("d_kv", self.d_kv),
            ("d_ff", self.d_ff),
            ("num_heads", self.num_heads),
            ("num_layers", self.num_layers),
            ("vocab_size", self.vocab_size),
        ] {
            if v == 0 {
                return Err(Error::config("text_encoder_2", format!("{name} is 0")));
            }
        }
        if self.relative_attention_num_buckets < 4 {
            return Err(Error::config(
                "text_encoder_2",
                format!(
                    "relative_attention_num_buckets = {} (at least 4 are needed)",
                    self.relative_attention_num_buckets
                ),
            ));
        }
        Ok(())
    }
}

/// The bucket of a relative position `memory − query` in a bidirectional
/// (encoder) T5 attention, as transformers' `_relative_position_bucket`:
/// half the buckets per direction, exact for small distances, logarithmic up
/// to `max_distance` (float32 arithmetic, truncated, as torch computes it).
pub fn relative_position_bucket(
    relative_position: i64,
    num_buckets: usize,
    max_distance: usize,
) -> usize {
    let half = (num_buckets / 2) as i64;
    let mut bucket = if relative_position > 0 { half } else { 0 };
    let n = relative_position.abs();
    let max_exact = half / 2;
    if n < max_exact {
        bucket += n;
    } else {
        let scale = ((max_distance as f64) / (max_exact as f64)).ln() as f32;
        let large = ((n as f32 / max_exact as f32).ln() / scale * (half - max_exact) as f32) as i64;
        bucket += (max_exact + large).min(half - 1);
    }
    bucket as usize
}

/// T5's layer norm: `weight * x / sqrt(mean(x²) + eps)` (no mean, no bias).
struct T5LayerNorm {
    weight: Tensor,
    eps: f32,
}

impl T5LayerNorm {
    fn load(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.get(&[dim], "weight")?,
            eps: eps as f32,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(
            &x.contiguous()?,
            &*on_device(&self.weight, x.device())?,
            self.eps,
        )?)
    }
}

struct SelfAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
}

impl SelfAttention {
    fn load(w: &Weights, c: &T5Config) -> Result<Self> {
        let inner = c.num_heads * c.d_kv;
        Ok(Self {
            q: Linear::load(&w.pp("q"), c.d_model, inner, false)?,
            k: Linear::load(&w.pp("k"), c.d_model, inner, false)?,
            v: Linear::load(&w.pp("v"), c.d_model, inner, false)?,
            o: Linear::load(&w.pp("o"), inner, c.d_model, false)?,
            heads: c.num_heads,
        })
    }

    /// `x`: `(batch, seq, d_model)`, `bias`: `(1, heads, seq, seq)`.
    fn forward(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let q = split_heads(&self.q.forward(x)?, self.heads)?;
        let k = split_heads(&self.k.forward(x)?, self.heads)?;
        let v = split_heads(&self.v.forward(x)?, self.heads)?;
        // T5 folds the scale into its weights: the dot products are not scaled.
        let a = scaled_dot_product_attention(&q, &k, &v, Some(bias), 1.0)?;
        self.o.forward(&merge_heads(&a)?)
    }
}

enum DenseReluDense {
    Plain {
        wi: Linear,
        wo: Linear,
    },
    Gated {
        wi_0: Linear,
        wi_1: Linear,
        wo: Linear,
    },
}

struct Block {
    attn_norm: T5LayerNorm,
    attn: SelfAttention,
    ff_norm: T5LayerNorm,
    ff: DenseReluDense,
    act: FfActivation,
}

impl Block {
    fn load(w: &Weights, c: &T5Config, gated: bool, act: FfActivation) -> Result<Self> {
        let l0 = w.pp("layer.0");
        let l1 = w.pp("layer.1");
        let dense = l1.pp("DenseReluDense");
        let ff = if gated {
            DenseReluDense::Gated {
                wi_0: Linear::load(&dense.pp("wi_0"), c.d_model, c.d_ff, false)?,
                wi_1: Linear::load(&dense.pp("wi_1"), c.d_model, c.d_ff, false)?,
                wo: Linear::load(&dense.pp("wo"), c.d_ff, c.d_model, false)?,
            }
        } else {
            DenseReluDense::Plain {
                wi: Linear::load(&dense.pp("wi"), c.d_model, c.d_ff, false)?,
                wo: Linear::load(&dense.pp("wo"), c.d_ff, c.d_model, false)?,
            }
        };
        Ok(Self {
            attn_norm: T5LayerNorm::load(&l0.pp("layer_norm"), c.d_model, c.layer_norm_epsilon)?,
            attn: SelfAttention::load(&l0.pp("SelfAttention"), c)?,
            ff_norm: T5LayerNorm::load(&l1.pp("layer_norm"), c.d_model, c.layer_norm_epsilon)?,
            ff,
            act,
        })
    }

    fn forward(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let x = (x + self.attn.forward(&self.attn_norm.forward(x)?, bias)?)?;
        let h = self.ff_norm.forward(&x)?;
        let h = match &self.ff {
            DenseReluDense::Plain { wi, wo } => wo.forward(&self.act.forward(&wi.forward(&h)?)?)?,
            DenseReluDense::Gated { wi_0, wi_1, wo } => {
                let g = self.act.forward(&wi_0.forward(&h)?)?;
                wo.forward(&(g * wi_1.forward(&h)?)?)?
            }
        };
        Ok((x + h)?)
    }
}

/// A loaded T5 encoder.
pub struct T5EncoderModel {
    config: T5Config,
    /// The token embedding table `(vocab, d_model)` in its stored
    /// precision (f16 / bf16 stay half size, GGML blocks and fp8 stay
    /// quantized: T5-XXL's is 32128 x 4096); looked-up rows are widened to
    /// `dtype`.
    shared: StoredTensor,
    dtype: DType,
    relative_attention_bias: Tensor,
    blocks: Vec<Block>,
    final_layer_norm: T5LayerNorm,
}

impl T5EncoderModel {
    /// Build from `config` and the `text_encoder_2` weights. The token
    /// embedding is `shared.weight` (or `encoder.embed_tokens.weight` in
    /// checkpoints that store only the tied copy).
    ///
    /// Errors: an unsupported `feed_forward_proj` or a zero size
    /// ([`Error::Config`]), missing or misshapen weights.
    pub fn load(w: &Weights, config: &T5Config) -> Result<Self> {
        config.check()?;
        let (gated, act) = config.feed_forward()?;
        let emb_shape = [config.vocab_size, config.d_model];
        let name = if w.contains("shared.weight") {
            "shared.weight"
        } else {
            "encoder.embed_tokens.weight"
        };
        let shared = w.get_stored(&emb_shape, name)?;
        let enc = w.pp("encoder");
        let relative_attention_bias = enc.get(
            &[config.relative_attention_num_buckets, config.num_heads],
            "block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        )?;
        let blocks = (0..config.num_layers)
            .map(|i| Block::load(&enc.pp(format!("block.{i}")), config, gated, act))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config: config.clone(),
            shared,
            dtype: w.dtype(),
            relative_attention_bias,
            blocks,
            final_layer_norm: T5LayerNorm::load(
                &enc.pp("final_layer_norm"),
                config.d_model,
                config.layer_norm_epsilon,
            )?,
        })
    }

    /// The rows of the token table for `flat` (the same ids as `ids`):
    /// `(tokens, d_model)`, in the table's dtype when it is dense, else
    /// widened to f32 one row at a time (a quantized table is never widened
    /// whole).
    fn token_embeddings(&self, flat: &[u32], ids: &Tensor, device: &Device) -> Result<Tensor> {
        if let StoredTensor::Dense(table) = &self.shared {
            return Ok(on_device(table, device)?.embedding(ids)?);
        }
        let rows = flat
            .iter()
            .map(|&id| self.shared.narrow_rows(id as usize, 1)?.to_dense(device))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&rows, 0)?)
    }

    /// The config the model was built from.
    pub fn config(&self) -> &T5Config {
        &self.config
    }

    /// `(1, heads, seq, seq)`: the relative position bias of the first block.
    fn position_bias(&self, seq: usize, device: &Device) -> Result<Tensor> {
        let c = &self.config;
        let buckets: Vec<u32> = (0..seq as i64)
            .flat_map(|q| (0..seq as i64).map(move |k| (q, k)))
            .map(|(q, k)| {
                relative_position_bucket(
                    k - q,
                    c.relative_attention_num_buckets,
                    c.relative_attention_max_distance,
                ) as u32
            })
            .collect();
        let ids = Tensor::from_vec(buckets, seq * seq, device)?;
        let values = on_device(&self.relative_attention_bias, device)?.embedding(&ids)?; // (seq², heads)
        Ok(values
            .reshape((seq, seq, c.num_heads))?
            .permute((2, 0, 1))?
            .unsqueeze(0)?
            .contiguous()?)
    }

    /// Encode `input_ids` (equal-length rows, no attention mask, as FLUX
    /// calls it) to the last hidden state `(batch, seq, d_model)` after the
    /// final layer norm.
    ///
    /// Errors: an empty batch, rows of different lengths, or an id outside
    /// the vocabulary ([`Error::InvalidArgument`]).
    pub fn forward(&self, input_ids: &[Vec<u32>], device: &Device) -> Result<Tensor> {
        let batch = input_ids.len();
        let seq = input_ids.first().map(Vec::len).unwrap_or(0);
        if batch == 0 || seq == 0 || input_ids.iter().any(|r| r.len() != seq) {
            return Err(Error::invalid(
                "input_ids",
                "expected a non-empty batch of equal-length token sequences",
            ));
        }
        if let Some(&bad) = input_ids
            .iter()
            .flatten()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            return Err(Error::invalid(
                "input_ids",
                format!(
                    "token id {bad} is outside the vocabulary of {}",
                    self.config.vocab_size
                ),
            ));
        }
        let flat: Vec<u32> = input_ids.iter().flatten().copied().collect();
        let ids = Tensor::from_slice(&flat, batch * seq, device)?;
        let mut x = self
            .token_embeddings(&flat, &ids, device)?
            .to_dtype(self.dtype)?
            .reshape((batch, seq, ()))?;
        let bias = self.position_bias(seq, device)?;
        for block in &self.blocks {
            x = block.forward(&x, &bias)?;
        }
        self.final_layer_norm.forward(&x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_match_transformers_spot_values() {
        // transformers T5Attention._relative_position_bucket(rp, True, 32, 128)
        let cases = [
            (0, 0),
            (1, 17),
            (-1, 1),
            (7, 23),
            (8, 24),
            (-8, 8),
            (15, 25),
            (16, 26),
            (-16, 10),
            (127, 31),
            (-200, 15),
        ];
        for (rp, want) in cases {
            assert_eq!(relative_position_bucket(rp, 32, 128), want, "rp {rp}");
        }
    }

    /// Under `--quantize` the token table stays quantized (never widened
    /// whole) and its looked-up rows are exactly the widened table's rows.
    #[test]
    fn quantized_token_table_is_kept_quantized_and_rows_are_exact() {
        use crate::models::quantize::{Quantization, QuantizingSource};
        use crate::models::weights::RandomSource;
        use std::sync::Arc;

        let config = T5Config {
            vocab_size: 16,
            d_model: 32,
            d_kv: 8,
            d_ff: 64,
            num_layers: 1,
            num_heads: 4,
            relative_attention_num_buckets: 8,
            relative_attention_max_distance: 16,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "gated-gelu".into(),
        };
        let dev = Device::Cpu;
        let base: Arc<dyn super::super::weights::TensorSource> =
            Arc::new(RandomSource::new(DType::F16));
        for q in [Quantization::Q8_0, Quantization::Q4_0, Quantization::Fp8] {
            let source = Arc::new(QuantizingSource::new(base.clone(), q));
            let w = Weights::new(source, "text_encoder_2", DType::F32, &dev);
            let model = T5EncoderModel::load(&w, &config).unwrap();
            assert!(
                !matches!(model.shared, StoredTensor::Dense(_)),
                "{q:?}: the table was widened at load"
            );
            let flat = [3u32, 0, 15, 3, 7];
            let ids = Tensor::new(&flat[..], &dev).unwrap();
            let got = model.token_embeddings(&flat, &ids, &dev).unwrap();
            let want = model
                .shared
                .to_dense(&dev)
                .unwrap()
                .embedding(&ids)
                .unwrap();
            assert_eq!(got.dims(), &[5, 32]);
            assert_eq!(
                got.to_vec2::<f32>().unwrap(),
                want.to_vec2::<f32>().unwrap(),
                "{q:?}"
            );
            model.forward(&[flat.to_vec()], &dev).unwrap();
        }
    }

    #[test]
    fn feed_forward_proj_is_parsed_as_transformers_does() {
        let cfg = |s: &str| T5Config {
            vocab_size: 4,
            d_model: 8,
            d_kv: 2,
            d_ff: 8,
            num_layers: 1,
            num_heads: 4,
            relative_attention_num_buckets: 8,
            relative_attention_max_distance: 16,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: s.into(),
        };
        assert_eq!(
            cfg("gated-gelu").feed_forward().unwrap(),
            (true, FfActivation::Other(Activation::GeluTanh))
        );
        assert_eq!(
            cfg("gelu").feed_forward().unwrap(),
            (false, FfActivation::Other(Activation::Gelu))
        );
        assert_eq!(
            cfg("relu").feed_forward().unwrap(),
            (false, FfActivation::Relu)
        );
        assert!(cfg("gated-gelu-x").feed_forward().is_err());
        assert!(cfg("mish").feed_forward().is_err());
    }
}
