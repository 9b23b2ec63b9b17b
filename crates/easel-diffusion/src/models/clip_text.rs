//! The CLIP text encoder (`CLIPTextModel` and `CLIPTextModelWithProjection`),
//! following transformers' `modeling_clip.py` (Radford et al. 2021,
//! arXiv:2103.00020). Configured from the component's `config.json`; keys
//! follow the published layout (`text_model.encoder.layers.N...`).

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use serde::Deserialize;

use super::layers::{
    merge_heads, on_device, scaled_dot_product_attention, split_heads, Activation, LayerNorm,
    Linear,
};
use super::weights::Weights;
use crate::error::{Error, Result};

/// The fields of a transformers `CLIPTextConfig` the encoder uses.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    /// Token vocabulary size (49408 for OpenAI CLIP).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Transformer layers.
    pub num_hidden_layers: usize,
    /// Maximum sequence length (77).
    pub max_position_embeddings: usize,
    /// `quick_gelu` (ViT-L / SD 1.x) or `gelu` (OpenCLIP ViT-H / bigG).
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Output width of `text_projection` (with-projection models).
    #[serde(default)]
    pub projection_dim: Option<usize>,
    /// End-of-text token id; the legacy value 2 means "the largest id".
    #[serde(default = "default_eos")]
    pub eos_token_id: i64,
    /// `["CLIPTextModelWithProjection"]` when the checkpoint has `text_projection`.
    #[serde(default)]
    pub architectures: Vec<String>,
}

fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_eos() -> i64 {
    2
}

impl ClipTextConfig {
    /// Read a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::models::read_config(path)
    }
}

struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    act: Activation,
}

impl EncoderLayer {
    fn load(w: &Weights, cfg: &ClipTextConfig, act: Activation) -> Result<Self> {
        let h = cfg.hidden_size;
        let attn = w.pp("self_attn");
        Ok(Self {
            layer_norm1: LayerNorm::load(&w.pp("layer_norm1"), h, cfg.layer_norm_eps)?,
            q_proj: Linear::load(&attn.pp("q_proj"), h, h, true)?,
            k_proj: Linear::load(&attn.pp("k_proj"), h, h, true)?,
            v_proj: Linear::load(&attn.pp("v_proj"), h, h, true)?,
            out_proj: Linear::load(&attn.pp("out_proj"), h, h, true)?,
            layer_norm2: LayerNorm::load(&w.pp("layer_norm2"), h, cfg.layer_norm_eps)?,
            fc1: Linear::load(&w.pp("mlp.fc1"), h, cfg.intermediate_size, true)?,
            fc2: Linear::load(&w.pp("mlp.fc2"), cfg.intermediate_size, h, true)?,
            heads: cfg.num_attention_heads,
            act,
        })
    }

    fn forward(&self, x: &Tensor, causal_mask: &Tensor) -> Result<Tensor> {
        let h = self.layer_norm1.forward(x)?;
        let q = split_heads(&self.q_proj.forward(&h)?, self.heads)?;
        let k = split_heads(&self.k_proj.forward(&h)?, self.heads)?;
        let v = split_heads(&self.v_proj.forward(&h)?, self.heads)?;
        let head_dim = q.dim(D::Minus1)?;
        let a = scaled_dot_product_attention(
            &q,
            &k,
            &v,
            Some(causal_mask),
            1.0 / (head_dim as f64).sqrt(),
        )?;
        let x = (x + self.out_proj.forward(&merge_heads(&a)?)?)?;
        let h = self.layer_norm2.forward(&x)?;
        let h = self
            .fc2
            .forward(&self.act.forward(&self.fc1.forward(&h)?)?)?;
        Ok((x + h)?)
    }
}

/// What the text encoder returns for a batch of token ids.
pub struct ClipTextOutput {
    /// `(batch, seq, hidden)`: the last layer after `final_layer_norm`.
    pub last_hidden_state: Tensor,
    /// `hidden_states[0]` is the embedding output, `hidden_states[i]` the
    /// output of layer `i` (before the final norm), as transformers'
    /// `output_hidden_states=True`; each `(batch, seq, hidden)`.
    pub hidden_states: Vec<Tensor>,
    /// `(batch, hidden)`: `last_hidden_state` at each sequence's end token.
    pub pooled_output: Tensor,
    /// `(batch, projection_dim)`: `text_projection(pooled_output)`, for
    /// `CLIPTextModelWithProjection` checkpoints.
    pub text_embeds: Option<Tensor>,
}

/// A loaded CLIP text encoder.
pub struct ClipTextModel {
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
    config: ClipTextConfig,
}

impl ClipTextModel {
    /// Build from `config` and the weights of the `text_encoder` component
    /// (keys `text_model.*` and, with projection, `text_projection.weight`).
    pub fn load(w: &Weights, config: &ClipTextConfig) -> Result<Self> {
        let act = Activation::from_name("text_encoder", &config.hidden_act)?;
        if config.num_attention_heads == 0 || config.hidden_size % config.num_attention_heads != 0 {
            return Err(Error::config(
                "text_encoder",
                format!(
                    "hidden_size {} is not divisible by num_attention_heads {}",
                    config.hidden_size, config.num_attention_heads
                ),
            ));
        }
        let tm = w.pp("text_model");
        let emb = tm.pp("embeddings");
        let token_embedding = emb.get(
            &[config.vocab_size, config.hidden_size],
            "token_embedding.weight",
        )?;
        let position_embedding = emb.get(
            &[config.max_position_embeddings, config.hidden_size],
            "position_embedding.weight",
        )?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| EncoderLayer::load(&tm.pp(format!("encoder.layers.{i}")), config, act))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::load(
            &tm.pp("final_layer_norm"),
            config.hidden_size,
            config.layer_norm_eps,
        )?;
        let with_projection = config
            .architectures
            .iter()
            .any(|a| a == "CLIPTextModelWithProjection")
            || w.contains("text_projection.weight");
        let text_projection = if with_projection {
            let dim = config.projection_dim.unwrap_or(config.hidden_size);
            Some(Linear::load(
                &w.pp("text_projection"),
                config.hidden_size,
                dim,
                false,
            )?)
        } else {
            None
        };
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
            config: config.clone(),
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// Encode `input_ids`, each row of length at most `max_position_embeddings`.
    ///
    /// Each row is encoded on its own and the results are stacked, so a
    /// prompt's embedding never depends on the other prompts of the batch
    /// (a batched matmul with more rows may round differently): a request's
    /// image definitions run as one batch and each image still equals the
    /// one its definition gives alone.
    pub fn forward(&self, input_ids: &[Vec<u32>], device: &Device) -> Result<ClipTextOutput> {
        if input_ids.len() <= 1 {
            return self.forward_rows(input_ids, device);
        }
        let outputs = input_ids
            .iter()
            .map(|row| self.forward_rows(std::slice::from_ref(row), device))
            .collect::<Result<Vec<_>>>()?;
        let cat = |f: &dyn Fn(&ClipTextOutput) -> &Tensor| -> Result<Tensor> {
            let parts: Vec<&Tensor> = outputs.iter().map(f).collect();
            Ok(Tensor::cat(&parts, 0)?)
        };
        let layers = outputs[0].hidden_states.len();
        Ok(ClipTextOutput {
            last_hidden_state: cat(&|o| &o.last_hidden_state)?,
            hidden_states: (0..layers)
                .map(|i| cat(&|o| &o.hidden_states[i]))
                .collect::<Result<Vec<_>>>()?,
            pooled_output: cat(&|o| &o.pooled_output)?,
            text_embeds: match outputs[0].text_embeds {
                Some(_) => Some(cat(&|o| {
                    o.text_embeds.as_ref().expect("every row projects")
                })?),
                None => None,
            },
        })
    }

    fn forward_rows(&self, input_ids: &[Vec<u32>], device: &Device) -> Result<ClipTextOutput> {
        let batch = input_ids.len();
        let seq = input_ids.first().map(Vec::len).unwrap_or(0);
        if batch == 0 || seq == 0 || input_ids.iter().any(|r| r.len() != seq) {
            return Err(Error::invalid(
                "input_ids",
                "expected a non-empty batch of equal-length token sequences",
            ));
        }
        if seq > self.config.max_position_embeddings {
            return Err(Error::invalid(
                "input_ids",
                format!(
                    "{seq} tokens exceed the encoder's {} positions",
                    self.config.max_position_embeddings
                ),
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
        let ids = Tensor::from_vec(flat, (batch, seq), device)?;
        let tokens = on_device(&self.token_embedding, device)?
            .embedding(&ids.flatten_all()?)?
            .reshape((batch, seq, ()))?;
        let positions = on_device(&self.position_embedding, device)?
            .narrow(0, 0, seq)?
            .unsqueeze(0)?;
        let mut x = tokens.broadcast_add(&positions)?;
        let mask = causal_mask(seq, x.dtype(), device)?;
        let mut hidden_states = vec![x.clone()];
        for layer in &self.layers {
            x = layer.forward(&x, &mask)?;
            hidden_states.push(x.clone());
        }
        let last_hidden_state = self.final_layer_norm.forward(&x)?;

        // transformers: with the legacy eos_token_id 2 the end token is the
        // largest id (49407); otherwise the first occurrence of eos_token_id.
        let eos_positions: Vec<u32> = input_ids
            .iter()
            .map(|row| {
                let pos = if self.config.eos_token_id == 2 {
                    let max = row.iter().copied().max().unwrap_or(0);
                    row.iter().position(|&t| t == max)
                } else {
                    row.iter()
                        .position(|&t| t as i64 == self.config.eos_token_id)
                };
                pos.unwrap_or(0) as u32
            })
            .collect();
        let rows = (0..batch)
            .map(|b| last_hidden_state.get(b)?.get(eos_positions[b] as usize))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let pooled_output = Tensor::stack(&rows, 0)?;
        let text_embeds = match &self.text_projection {
            Some(p) => Some(p.forward(&pooled_output)?),
            None => None,
        };
        Ok(ClipTextOutput {
            last_hidden_state,
            hidden_states,
            pooled_output,
            text_embeds,
        })
    }
}

/// `(1, 1, seq, seq)` additive mask: 0 on and below the diagonal, -inf above.
fn causal_mask(seq: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..seq)
        .flat_map(|i| (0..seq).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(data, (1, 1, seq, seq), device)?.to_dtype(dtype)?)
}
