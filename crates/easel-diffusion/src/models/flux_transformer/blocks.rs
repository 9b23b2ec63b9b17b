//! The blocks of `FluxTransformer2DModel`, following diffusers'
//! `transformer_flux.py`: the double-stream `FluxTransformerBlock`, the
//! single-stream `FluxSingleTransformerBlock`, and their parts (q/k RMS
//! norms, parameter-free layer norms, adaLN modulation, feed-forward,
//! attention with rotary embeddings).

use candle_core::{DType, Device, Tensor, D};

use super::config::FluxTransformer2DConfig;
use super::embeddings::apply_rotary_emb;
use crate::error::Result;
use crate::models::layers::{
    merge_heads, on_device, scaled_dot_product_attention, split_heads, Activation, Linear,
};
use crate::models::weights::Weights;

/// Epsilon of the parameter-free layer norms and of the q/k RMS norms.
const NORM_EPS: f32 = 1e-6;

/// `torch.nn.RMSNorm` over the last dimension, with a weight.
struct RmsNorm {
    weight: Tensor,
}

impl RmsNorm {
    fn load(w: &Weights, dim: usize) -> Result<Self> {
        Ok(Self {
            weight: w.get(&[dim], "weight")?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(
            &x.contiguous()?,
            &*on_device(&self.weight, x.device())?,
            NORM_EPS,
        )?)
    }
}

/// `nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)`.
pub(super) struct PlainLayerNorm {
    ones: Tensor,
    zeros: Tensor,
}

impl PlainLayerNorm {
    pub(super) fn new(dim: usize, dtype: DType, device: &Device) -> Result<Self> {
        Ok(Self {
            ones: Tensor::ones(dim, dtype, device)?,
            zeros: Tensor::zeros(dim, dtype, device)?,
        })
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::layer_norm(
            &x.contiguous()?,
            &*on_device(&self.ones, x.device())?,
            &*on_device(&self.zeros, x.device())?,
            NORM_EPS,
        )?)
    }
}

/// `x · (1 + scale) + shift` with per-row `(batch, dim)` modulation.
pub(super) fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    Ok(x.broadcast_mul(&(scale.unsqueeze(1)? + 1.0)?)?
        .broadcast_add(&shift.unsqueeze(1)?)?)
}

/// `gate · x` with a per-row `(batch, dim)` gate.
fn gated(gate: &Tensor, x: &Tensor) -> Result<Tensor> {
    Ok(x.broadcast_mul(&gate.unsqueeze(1)?)?)
}

/// The `chunks` equal parts of `linear(silu(temb))` along the feature axis
/// (`AdaLayerNormZero` and friends).
pub(super) struct AdaModulation {
    linear: Linear,
    chunks: usize,
}

impl AdaModulation {
    pub(super) fn load(w: &Weights, dim: usize, chunks: usize) -> Result<Self> {
        Ok(Self {
            linear: Linear::load(&w.pp("linear"), dim, chunks * dim, true)?,
            chunks,
        })
    }

    pub(super) fn forward(&self, temb: &Tensor) -> Result<Vec<Tensor>> {
        let emb = self.linear.forward(&candle_nn::ops::silu(temb)?)?;
        Ok(emb.chunk(self.chunks, D::Minus1)?)
    }
}

/// `FeedForward(dim, activation_fn="gelu-approximate")`: `net.2(gelu_tanh(net.0.proj(x)))`.
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn load(w: &Weights, dim: usize) -> Result<Self> {
        Ok(Self {
            proj: Linear::load(&w.pp("net.0.proj"), dim, 4 * dim, true)?,
            out: Linear::load(&w.pp("net.2"), 4 * dim, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out
            .forward(&Activation::GeluTanh.forward(&self.proj.forward(x)?)?)
    }
}

/// Query, key and value of one stream, split into heads and q/k-normalised.
struct QkvProjection {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
}

impl QkvProjection {
    fn load(w: &Weights, dim: usize, head_dim: usize, names: [&str; 5]) -> Result<Self> {
        Ok(Self {
            to_q: Linear::load(&w.pp(names[0]), dim, dim, true)?,
            to_k: Linear::load(&w.pp(names[1]), dim, dim, true)?,
            to_v: Linear::load(&w.pp(names[2]), dim, dim, true)?,
            norm_q: RmsNorm::load(&w.pp(names[3]), head_dim)?,
            norm_k: RmsNorm::load(&w.pp(names[4]), head_dim)?,
        })
    }

    /// `x`: `(batch, tokens, dim)` → three `(batch, heads, tokens, head_dim)`.
    fn forward(&self, x: &Tensor, heads: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let q = self
            .norm_q
            .forward(&split_heads(&self.to_q.forward(x)?, heads)?)?;
        let k = self
            .norm_k
            .forward(&split_heads(&self.to_k.forward(x)?, heads)?)?;
        let v = split_heads(&self.to_v.forward(x)?, heads)?;
        Ok((q, k, v))
    }
}

/// Rotary embeddings for the joint (text, image) token sequence.
pub(super) struct Rope<'a> {
    pub(super) cos: &'a Tensor,
    pub(super) sin: &'a Tensor,
}

/// Attention over `(q, k, v)` `(batch, heads, tokens, head_dim)` with RoPE on
/// q and k → `(batch, tokens, heads · head_dim)`.
fn rope_attention(q: &Tensor, k: &Tensor, v: &Tensor, rope: &Rope<'_>) -> Result<Tensor> {
    let head_dim = q.dim(D::Minus1)?;
    let q = apply_rotary_emb(q, rope.cos, rope.sin)?;
    let k = apply_rotary_emb(k, rope.cos, rope.sin)?;
    let a = scaled_dot_product_attention(&q, &k, v, None, 1.0 / (head_dim as f64).sqrt())?;
    merge_heads(&a)
}

/// `FluxTransformerBlock`: the double-stream (MMDiT) block.
pub(super) struct FluxTransformerBlock {
    norm1: AdaModulation,
    norm1_context: AdaModulation,
    img_qkv: QkvProjection,
    txt_qkv: QkvProjection,
    to_out: Linear,
    to_add_out: Linear,
    norm: PlainLayerNorm,
    ff: FeedForward,
    ff_context: FeedForward,
    heads: usize,
}

impl FluxTransformerBlock {
    pub(super) fn load(
        w: &Weights,
        c: &FluxTransformer2DConfig,
        norm: PlainLayerNorm,
    ) -> Result<Self> {
        let dim = c.inner_dim();
        let hd = c.attention_head_dim;
        let attn = w.pp("attn");
        Ok(Self {
            norm1: AdaModulation::load(&w.pp("norm1"), dim, 6)?,
            norm1_context: AdaModulation::load(&w.pp("norm1_context"), dim, 6)?,
            img_qkv: QkvProjection::load(
                &attn,
                dim,
                hd,
                ["to_q", "to_k", "to_v", "norm_q", "norm_k"],
            )?,
            txt_qkv: QkvProjection::load(
                &attn,
                dim,
                hd,
                [
                    "add_q_proj",
                    "add_k_proj",
                    "add_v_proj",
                    "norm_added_q",
                    "norm_added_k",
                ],
            )?,
            to_out: Linear::load(&attn.pp("to_out.0"), dim, dim, true)?,
            to_add_out: Linear::load(&attn.pp("to_add_out"), dim, dim, true)?,
            norm,
            ff: FeedForward::load(&w.pp("ff"), dim)?,
            ff_context: FeedForward::load(&w.pp("ff_context"), dim)?,
            heads: c.num_attention_heads,
        })
    }

    /// `img`: `(batch, n_img, dim)`, `txt`: `(batch, n_txt, dim)` → both updated.
    pub(super) fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        temb: &Tensor,
        rope: &Rope<'_>,
    ) -> Result<(Tensor, Tensor)> {
        let m = self.norm1.forward(temb)?;
        let (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) =
            (&m[0], &m[1], &m[2], &m[3], &m[4], &m[5]);
        let c = self.norm1_context.forward(temb)?;
        let (c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp) =
            (&c[0], &c[1], &c[2], &c[3], &c[4], &c[5]);
        let norm_img = modulate(&self.norm.forward(img)?, shift_msa, scale_msa)?;
        let norm_txt = modulate(&self.norm.forward(txt)?, c_shift_msa, c_scale_msa)?;

        // Joint attention over [text, image] tokens.
        let (iq, ik, iv) = self.img_qkv.forward(&norm_img, self.heads)?;
        let (tq, tk, tv) = self.txt_qkv.forward(&norm_txt, self.heads)?;
        let q = Tensor::cat(&[&tq, &iq], 2)?;
        let k = Tensor::cat(&[&tk, &ik], 2)?;
        let v = Tensor::cat(&[&tv, &iv], 2)?;
        let a = rope_attention(&q, &k, &v, rope)?;
        let n_txt = txt.dim(1)?;
        let n_img = img.dim(1)?;
        let txt_attn = self.to_add_out.forward(&a.narrow(1, 0, n_txt)?)?;
        let img_attn = self.to_out.forward(&a.narrow(1, n_txt, n_img)?)?;

        let img = (img + gated(gate_msa, &img_attn)?)?;
        let h = modulate(&self.norm.forward(&img)?, shift_mlp, scale_mlp)?;
        let img = (&img + gated(gate_mlp, &self.ff.forward(&h)?)?)?;

        let txt = (txt + gated(c_gate_msa, &txt_attn)?)?;
        let h = modulate(&self.norm.forward(&txt)?, c_shift_mlp, c_scale_mlp)?;
        let txt = (&txt + gated(c_gate_mlp, &self.ff_context.forward(&h)?)?)?;
        Ok((img, txt))
    }
}

/// `FluxSingleTransformerBlock`: attention and MLP in parallel on the joint sequence.
pub(super) struct FluxSingleTransformerBlock {
    norm: AdaModulation,
    qkv: QkvProjection,
    proj_mlp: Linear,
    proj_out: Linear,
    layer_norm: PlainLayerNorm,
    heads: usize,
}

impl FluxSingleTransformerBlock {
    pub(super) fn load(
        w: &Weights,
        c: &FluxTransformer2DConfig,
        layer_norm: PlainLayerNorm,
    ) -> Result<Self> {
        let dim = c.inner_dim();
        let mlp = 4 * dim;
        Ok(Self {
            norm: AdaModulation::load(&w.pp("norm"), dim, 3)?,
            qkv: QkvProjection::load(
                &w.pp("attn"),
                dim,
                c.attention_head_dim,
                ["to_q", "to_k", "to_v", "norm_q", "norm_k"],
            )?,
            proj_mlp: Linear::load(&w.pp("proj_mlp"), dim, mlp, true)?,
            proj_out: Linear::load(&w.pp("proj_out"), dim + mlp, dim, true)?,
            layer_norm,
            heads: c.num_attention_heads,
        })
    }

    /// `x`: the joint `(batch, n_txt + n_img, dim)` sequence.
    pub(super) fn forward(&self, x: &Tensor, temb: &Tensor, rope: &Rope<'_>) -> Result<Tensor> {
        let m = self.norm.forward(temb)?;
        let h = modulate(&self.layer_norm.forward(x)?, &m[0], &m[1])?;
        let mlp = Activation::GeluTanh.forward(&self.proj_mlp.forward(&h)?)?;
        let (q, k, v) = self.qkv.forward(&h, self.heads)?;
        let a = rope_attention(&q, &k, &v, rope)?;
        let out = self.proj_out.forward(&Tensor::cat(&[&a, &mlp], 2)?)?;
        Ok((x + gated(&m[2], &out)?)?)
    }
}
