//! The Llama, Qwen2 and Qwen3 families: one pre-norm decoder with grouped-query attention,
//! RoPE and a SiLU-gated MLP, differing only in details read from the GGUF file.
//!
//! Written on the same pieces as [`super::gemma3`] (our CPU kernels through [`Linear`], one RoPE
//! table sized to the configured context, a KV cache that accepts any number of new tokens at any
//! position) rather than candle-transformers' modules, which would bring their fixed 4,096-entry
//! RoPE tables and candle's slow CPU path for Q5_0 / narrow Q8_0 matrices.
//!
//! Family differences (from llama.cpp's graphs for these architectures):
//! - llama: RoPE on adjacent pairs (the GGUF converter permutes q/k for it);
//! - qwen2: GPT-NeoX RoPE, biases on q, k and v;
//! - qwen3: GPT-NeoX RoPE, RMSNorm on each head of q and k.

use candle_core::quantized::gguf_file::Content;
use candle_core::{Device, Tensor};

use super::gemma3::{
    attend_steps, batch_tokens, row_positions, shared, step_logits, ModelError, RmsNorm, Rope, Step,
};
use super::gguf::{GgufError, Metadata};
use super::linear::Linear;
use wattgate_kernels::attention::{Geometry, KvRows};

/// RoPE base when the file names none (Llama 2's).
const DEFAULT_ROPE_BASE: f32 = 10_000.0;

/// Which member of the family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `general.architecture = "llama"` (Llama 2/3, Mistral, SmolLM, TinyLlama...).
    Llama,
    /// `"qwen2"` (Qwen2, Qwen2.5).
    Qwen2,
    /// `"qwen3"`.
    Qwen3,
}

impl Family {
    /// The family of a GGUF `general.architecture`, if it is one of these.
    pub fn from_architecture(arch: &str) -> Option<Self> {
        match arch {
            "llama" => Some(Self::Llama),
            "qwen2" => Some(Self::Qwen2),
            "qwen3" => Some(Self::Qwen3),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
        }
    }
}

/// Shape and constants read from the GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    /// The family.
    pub family: Family,
    /// Hidden size.
    pub hidden: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub eps: f64,
    /// RoPE base.
    pub rope_base: f32,
    /// Context the model was trained for.
    pub trained_context: usize,
    /// Positions this instance supports: min(configured, trained).
    pub max_positions: usize,
}

impl DecoderConfig {
    /// Reads the configuration of `family` from GGUF metadata; `max_positions` caps the context.
    pub fn from_gguf(
        content: &Content,
        family: Family,
        max_positions: usize,
    ) -> Result<Self, ModelError> {
        let meta = Metadata(&content.metadata);
        let key = |k: &str| format!("{}.{k}", family.name());
        let hidden = meta.u32(&key("embedding_length"))? as usize;
        let heads = meta.u32(&key("attention.head_count"))? as usize;
        if heads == 0 {
            return Err(GgufError::Invalid {
                key: key("attention.head_count"),
                detail: "0 heads".to_owned(),
            }
            .into());
        }
        let kv_heads = meta
            .u32(&key("attention.head_count_kv"))
            .map_or(heads, |v| v as usize);
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(GgufError::Invalid {
                key: key("attention.head_count_kv"),
                detail: format!("{kv_heads} does not divide {heads} query heads"),
            }
            .into());
        }
        let trained_context = meta.u32(&key("context_length"))? as usize;
        Ok(Self {
            family,
            hidden,
            layers: meta.u32(&key("block_count"))? as usize,
            heads,
            kv_heads,
            head_dim: meta
                .u32(&key("attention.key_length"))
                .map_or(hidden / heads, |v| v as usize),
            eps: f64::from(meta.f32(&key("attention.layer_norm_rms_epsilon"))?),
            rope_base: meta
                .f32(&key("rope.freq_base"))
                .unwrap_or(DEFAULT_ROPE_BASE),
            trained_context,
            max_positions: max_positions.min(trained_context).max(1),
        })
    }
}

struct Layer {
    attn_norm: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    /// Qwen2's q/k/v biases.
    qkv_bias: Option<[Tensor; 3]>,
    /// Qwen3's per-head q/k norms.
    qk_norm: Option<[RmsNorm; 2]>,
    o: Linear,
    ffn_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// Keys and values of every layer for one sequence.
#[derive(Clone)]
pub struct DecoderCache {
    layers: Vec<KvRows>,
    pos: usize,
}

impl DecoderCache {
    /// Positions in the cache.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// The state after the first `pos` positions (every layer keeps every position).
    pub fn truncated(&self, pos: usize) -> Option<DecoderCache> {
        if pos > self.pos {
            return None;
        }
        let layers = self
            .layers
            .iter()
            .map(|kv| kv.truncated(0, pos))
            .collect::<Option<Vec<_>>>()?;
        Some(DecoderCache { layers, pos })
    }
}

/// A loaded Llama / Qwen2 / Qwen3 model; each sequence has its own [`DecoderCache`].
pub struct Decoder {
    cfg: DecoderConfig,
    embed: Option<Linear>,
    lm_head: Linear,
    layers: Vec<Layer>,
    final_norm: RmsNorm,
    rope: Rope,
    device: Device,
}

impl Decoder {
    /// Loads the weights named in `content` from `reader`.
    pub fn load<R: std::io::Read + std::io::Seek>(
        content: &Content,
        reader: &mut R,
        family: Family,
        max_positions: usize,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let cfg = DecoderConfig::from_gguf(content, family, max_positions)?;
        let plain = |reader: &mut R, name: &str| -> Result<Tensor, ModelError> {
            let t = content
                .tensor(reader, name, device)
                .map_err(|e| ModelError::Tensor {
                    name: name.to_owned(),
                    detail: e.to_string(),
                })?;
            Ok(t.dequantize(device)?)
        };
        let norm = |reader: &mut R, name: &str| -> Result<RmsNorm, ModelError> {
            Ok(RmsNorm {
                weight: plain(reader, name)?,
                eps: cfg.eps as f32,
            })
        };
        let linear = |reader: &mut R, name: &str| Linear::load(content, reader, name, device);
        let table = linear(reader, "token_embd.weight")?;
        if table.in_features()? != cfg.hidden {
            return Err(ModelError::Tensor {
                name: "token_embd.weight".to_owned(),
                detail: format!(
                    "width {}, metadata says {}",
                    table.in_features()?,
                    cfg.hidden
                ),
            });
        }
        let (embed, lm_head) = if content.tensor_infos.contains_key("output.weight") {
            (Some(table), linear(reader, "output.weight")?)
        } else {
            (None, table)
        };
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let p = |n: &str| format!("blk.{i}.{n}");
            let qkv_bias = match family {
                Family::Qwen2 => Some([
                    plain(reader, &p("attn_q.bias"))?,
                    plain(reader, &p("attn_k.bias"))?,
                    plain(reader, &p("attn_v.bias"))?,
                ]),
                _ => None,
            };
            let qk_norm = match family {
                Family::Qwen3 => Some([
                    norm(reader, &p("attn_q_norm.weight"))?,
                    norm(reader, &p("attn_k_norm.weight"))?,
                ]),
                _ => None,
            };
            layers.push(Layer {
                attn_norm: norm(reader, &p("attn_norm.weight"))?,
                q: linear(reader, &p("attn_q.weight"))?,
                k: linear(reader, &p("attn_k.weight"))?,
                v: linear(reader, &p("attn_v.weight"))?,
                qkv_bias,
                qk_norm,
                o: linear(reader, &p("attn_output.weight"))?,
                ffn_norm: norm(reader, &p("ffn_norm.weight"))?,
                gate: linear(reader, &p("ffn_gate.weight"))?,
                up: linear(reader, &p("ffn_up.weight"))?,
                down: linear(reader, &p("ffn_down.weight"))?,
            });
        }
        let final_norm = norm(reader, "output_norm.weight")?;
        let rope = Rope::new(cfg.rope_base, cfg.head_dim, cfg.max_positions, device)?;
        Ok(Self {
            cfg,
            embed,
            lm_head,
            layers,
            final_norm,
            rope,
            device: device.clone(),
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &DecoderConfig {
        &self.cfg
    }

    /// A fresh cache for a new sequence.
    pub fn new_cache(&self) -> DecoderCache {
        DecoderCache {
            layers: (0..self.cfg.layers)
                .map(|_| KvRows::new(self.cfg.kv_heads * self.cfg.head_dim))
                .collect(),
            pos: 0,
        }
    }

    /// One step over several sequences (see [`super::gemma3::Gemma3::forward_batch`]).
    pub fn forward_batch(
        &self,
        steps: &mut [Step<'_, DecoderCache>],
    ) -> Result<Vec<Option<Vec<f32>>>, ModelError> {
        let cfg = &self.cfg;
        let tokens = batch_tokens(steps, |c| c.pos, cfg.max_positions)?;
        let n = tokens.len();
        let (cos, sin) = self
            .rope
            .rows(&row_positions(steps, |c| c.pos, &self.device)?)?;
        let table = self.embed.as_ref().unwrap_or(&self.lm_head);
        let mut x = table.rows(&tokens, &self.device)?.unsqueeze(0)?;
        let geometry = Geometry {
            heads: cfg.heads,
            kv_heads: cfg.kv_heads,
            head_dim: cfg.head_dim,
            window: None,
            scale: 1.0 / (cfg.head_dim as f32).sqrt(),
        };
        for (l, layer) in self.layers.iter().enumerate() {
            let h = layer.attn_norm.forward(&x)?;
            let [mut q, mut k, mut v] = shared::<3>(&[&layer.q, &layer.k, &layer.v], &h)?;
            if let Some([bq, bk, bv]) = &layer.qkv_bias {
                q = q.broadcast_add(bq)?;
                k = k.broadcast_add(bk)?;
                v = v.broadcast_add(bv)?;
            }
            let mut q = q.reshape((1, n, cfg.heads, cfg.head_dim))?;
            let mut k = k.reshape((1, n, cfg.kv_heads, cfg.head_dim))?;
            if let Some([qn, kn]) = &layer.qk_norm {
                q = qn.forward(&q)?;
                k = kn.forward(&k)?;
            }
            // Each row at its own position: (1, rows, heads, dim) for NeoX RoPE; Llama's
            // adjacent-pair form takes (1, heads, rows, dim).
            let rotate = |t: &Tensor| -> candle_core::Result<Tensor> {
                match cfg.family {
                    Family::Llama => {
                        let t = t.transpose(1, 2)?.contiguous()?;
                        candle_nn::rotary_emb::rope_i(&t, &cos, &sin)?
                            .transpose(1, 2)?
                            .contiguous()
                    }
                    Family::Qwen2 | Family::Qwen3 => {
                        candle_nn::rotary_emb::rope_thd(&t.contiguous()?, &cos, &sin)
                    }
                }
            };
            let (q, k) = (rotate(&q)?, rotate(&k)?);
            let out = attend_steps(
                steps,
                |c| c.layers.get_mut(l),
                |c| c.pos,
                &geometry,
                [&q, &k, &v],
            )?;
            x = (x + layer.o.forward(&out)?)?;
            let h = layer.ffn_norm.forward(&x)?;
            let [gate, up] = shared::<2>(&[&layer.gate, &layer.up], &h)?;
            x = (x + layer.down.forward(&(candle_nn::ops::silu(&gate)? * up)?)?)?;
        }
        for step in steps.iter_mut() {
            step.cache.pos += step.tokens.len();
        }
        step_logits(&x, steps, &self.final_norm, &self.lm_head)
    }
}
