//! The Gemma 3 decoder, written on candle's tensor and quantized-matmul ops.
//!
//! Why not candle's published `quantized_gemma3`: it allocates RoPE tables for 131,072 positions
//! in every layer (3.6 GB RSS), fails on a multi-token forward at a position > 0, applies the
//! sliding window only in prefill, and uses SiLU where Gemma 3 uses tanh-approximated GELU.
//! Here: one RoPE table per base (local and global) shared by all layers and sized to the
//! configured context; a KV cache that keeps only the window for sliding layers; the sliding mask
//! applied in prefill and decode alike; and any number of new tokens at any position, so a
//! prompt can be extended without recomputing it.
//!
//! Architecture facts (from the GGUF metadata and llama.cpp's gemma3 graph): embeddings scaled by
//! sqrt(hidden); per layer RMSNorm → attention (q/k RMSNorm per head, RoPE, grouped-query) →
//! RMSNorm → residual; RMSNorm → GELU-gated MLP → RMSNorm → residual. Every sixth layer is global
//! (RoPE base `rope.freq_base`), the others attend to a window of `attention.sliding_window`
//! positions (RoPE base 10,000). The output projection is tied to the embedding table. The GGUF
//! stores norm weights with Gemma's "+1" already applied, so norms are plain RMSNorm.

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};

use super::gguf::{GgufError, Metadata};
use super::linear::Linear;

/// Local (sliding-window) layers' RoPE base (llama.cpp's and Hugging Face's default for Gemma 3).
const LOCAL_ROPE_BASE: f32 = 10_000.0;
/// Every n-th layer is global (Gemma 3's published layer pattern, 5 local : 1 global).
const DEFAULT_GLOBAL_EVERY: usize = 6;

/// Errors loading or running the model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Metadata missing or malformed.
    #[error(transparent)]
    Metadata(#[from] GgufError),
    /// A tensor is missing or has the wrong shape.
    #[error("tensor `{name}`: {detail}")]
    Tensor {
        /// Tensor name.
        name: String,
        /// What is wrong.
        detail: String,
    },
    /// The request does not fit the model.
    #[error("{0}")]
    Limit(String),
    /// candle failed.
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Shape and constants of a Gemma 3 model.
#[derive(Debug, Clone, PartialEq)]
pub struct Gemma3Config {
    /// Hidden size.
    pub hidden: usize,
    /// Number of decoder layers.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub eps: f64,
    /// Sliding window of local layers, in positions.
    pub window: usize,
    /// Every n-th layer is global.
    pub global_every: usize,
    /// RoPE base of global layers.
    pub rope_global: f32,
    /// RoPE base of local layers.
    pub rope_local: f32,
    /// Context length the model was trained for.
    pub trained_context: usize,
    /// Positions this instance supports (RoPE table size): min(configured, trained).
    pub max_positions: usize,
}

impl Gemma3Config {
    /// Reads the configuration from GGUF metadata; `max_positions` caps the context.
    pub fn from_gguf(content: &Content, max_positions: usize) -> Result<Self, ModelError> {
        let meta = Metadata(&content.metadata);
        let arch = meta.string("general.architecture")?;
        if arch != "gemma3" {
            return Err(GgufError::Invalid {
                key: "general.architecture".to_owned(),
                detail: format!("\"{arch}\" is not gemma3"),
            }
            .into());
        }
        let key = |k: &str| format!("gemma3.{k}");
        let trained_context = meta.u32(&key("context_length"))? as usize;
        Ok(Self {
            hidden: meta.u32(&key("embedding_length"))? as usize,
            layers: meta.u32(&key("block_count"))? as usize,
            heads: meta.u32(&key("attention.head_count"))? as usize,
            kv_heads: meta.u32(&key("attention.head_count_kv"))? as usize,
            head_dim: meta.u32(&key("attention.key_length"))? as usize,
            eps: f64::from(meta.f32(&key("attention.layer_norm_rms_epsilon"))?),
            window: meta.u32(&key("attention.sliding_window"))? as usize,
            global_every: meta
                .u32(&key("attention.sliding_window_type"))
                .map_or(DEFAULT_GLOBAL_EVERY, |v| v as usize),
            rope_global: meta.f32(&key("rope.freq_base"))?,
            rope_local: meta
                .f32(&key("rope.local_freq_base"))
                .unwrap_or(LOCAL_ROPE_BASE),
            trained_context,
            max_positions: max_positions.min(trained_context).max(1),
        })
    }

    fn is_global(&self, layer: usize) -> bool {
        (layer + 1).is_multiple_of(self.global_every.max(1))
    }
}

/// Cosine and sine tables for one RoPE base.
pub(super) struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    pub(super) fn new(
        base: f32,
        head_dim: usize,
        positions: usize,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let inv_freq: Vec<f32> = (0..head_dim / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, head_dim / 2), device)?;
        let t = Tensor::arange(0u32, positions as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((positions, 1))?;
        let freqs = t.matmul(&inv_freq)?;
        Ok(Self {
            cos: freqs.cos()?,
            sin: freqs.sin()?,
        })
    }

    /// Rotates `x` of shape (batch, heads, n, head_dim) for positions `pos..pos + n`, pairing
    /// dimension i with i + head_dim / 2 (GPT-NeoX style: Gemma, Qwen).
    pub(super) fn apply(&self, x: &Tensor, pos: usize) -> candle_core::Result<Tensor> {
        let n = x.dim(2)?;
        let cos = self.cos.narrow(0, pos, n)?;
        let sin = self.sin.narrow(0, pos, n)?;
        candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)
    }

    /// As [`Rope::apply`], pairing adjacent dimensions (2i, 2i + 1): Llama in GGUF, whose
    /// converter permutes the q/k weights for this form.
    pub(super) fn apply_interleaved(&self, x: &Tensor, pos: usize) -> candle_core::Result<Tensor> {
        let n = x.dim(2)?;
        let cos = self.cos.narrow(0, pos, n)?;
        let sin = self.sin.narrow(0, pos, n)?;
        candle_nn::rotary_emb::rope_i(&x.contiguous()?, &cos, &sin)
    }
}

pub(super) struct RmsNorm {
    pub(super) weight: Tensor,
    pub(super) eps: f32,
}

impl RmsNorm {
    pub(super) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)
    }
}

struct Layer {
    attn_norm: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    post_attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
    post_ffn_norm: RmsNorm,
    global: bool,
}

/// Keys and values of one layer for one sequence.
#[derive(Default)]
struct LayerCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
}

/// The per-sequence state: cached keys and values, and how many positions they cover.
pub struct Cache {
    layers: Vec<LayerCache>,
    pos: usize,
}

impl Cache {
    /// Positions processed so far.
    pub fn position(&self) -> usize {
        self.pos
    }
}

/// A loaded Gemma 3 model; shareable across threads, each sequence has its own [`Cache`].
pub struct Gemma3 {
    cfg: Gemma3Config,
    /// The embedding table; `None` when the output projection is tied to it.
    embed: Option<Linear>,
    lm_head: Linear,
    layers: Vec<Layer>,
    final_norm: RmsNorm,
    rope_local: Rope,
    rope_global: Rope,
    device: Device,
}

impl Gemma3 {
    /// Loads the weights named in `content` from `reader`.
    pub fn load<R: std::io::Read + std::io::Seek>(
        content: &Content,
        reader: &mut R,
        max_positions: usize,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let cfg = Gemma3Config::from_gguf(content, max_positions)?;
        let norm = |reader: &mut R, name: &str| -> Result<RmsNorm, ModelError> {
            let t: QTensor =
                content
                    .tensor(reader, name, device)
                    .map_err(|e| ModelError::Tensor {
                        name: name.to_owned(),
                        detail: e.to_string(),
                    })?;
            Ok(RmsNorm {
                weight: t.dequantize(device)?,
                eps: cfg.eps as f32,
            })
        };
        let linear = |reader: &mut R, name: &str| Linear::load(content, reader, name, device);
        let table = linear(reader, "token_embd.weight")?;
        let (vocab, hidden) = (table.out_features()?, table.in_features()?);
        if hidden != cfg.hidden {
            return Err(ModelError::Tensor {
                name: "token_embd.weight".to_owned(),
                detail: format!("width {hidden}, metadata says {}", cfg.hidden),
            });
        }
        let (embed, lm_head) = if content.tensor_infos.contains_key("output.weight") {
            (Some(table), linear(reader, "output.weight")?)
        } else {
            (None, table)
        };
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let p = |n: &str| format!("blk.{i}.{n}.weight");
            layers.push(Layer {
                attn_norm: norm(reader, &p("attn_norm"))?,
                q: linear(reader, &p("attn_q"))?,
                k: linear(reader, &p("attn_k"))?,
                v: linear(reader, &p("attn_v"))?,
                o: linear(reader, &p("attn_output"))?,
                q_norm: norm(reader, &p("attn_q_norm"))?,
                k_norm: norm(reader, &p("attn_k_norm"))?,
                post_attn_norm: norm(reader, &p("post_attention_norm"))?,
                ffn_norm: norm(reader, &p("ffn_norm"))?,
                gate: linear(reader, &p("ffn_gate"))?,
                up: linear(reader, &p("ffn_up"))?,
                down: linear(reader, &p("ffn_down"))?,
                post_ffn_norm: norm(reader, &p("post_ffw_norm"))?,
                global: cfg.is_global(i),
            });
        }
        let final_norm = norm(reader, "output_norm.weight")?;
        let rope_local = Rope::new(cfg.rope_local, cfg.head_dim, cfg.max_positions, device)?;
        let rope_global = Rope::new(cfg.rope_global, cfg.head_dim, cfg.max_positions, device)?;
        tracing::debug!(vocab, layers = cfg.layers, "gemma3 loaded");
        Ok(Self {
            cfg,
            embed,
            lm_head,
            layers,
            final_norm,
            rope_local,
            rope_global,
            device: device.clone(),
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &Gemma3Config {
        &self.cfg
    }

    /// A fresh cache for a new sequence.
    pub fn new_cache(&self) -> Cache {
        Cache {
            layers: (0..self.cfg.layers)
                .map(|_| LayerCache::default())
                .collect(),
            pos: 0,
        }
    }

    /// Runs `tokens` at the cache's position and returns the logits after the last one.
    pub fn forward(&self, tokens: &[u32], cache: &mut Cache) -> Result<Vec<f32>, ModelError> {
        let (n, pos) = (tokens.len(), cache.pos);
        check_fits(n, pos, self.cfg.max_positions)?;
        let mut x = (self.embed_tokens(tokens)? * (self.cfg.hidden as f64).sqrt())?;
        for (layer, lc) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let h = layer.attn_norm.forward(&x)?;
            let h = self.attention(layer, &h, lc, pos)?;
            let h = layer.post_attn_norm.forward(&h)?;
            x = (x + h)?;
            let h = layer.ffn_norm.forward(&x)?;
            let [gate, up] = shared::<2>(&[&layer.gate, &layer.up], &h)?;
            let h = layer.down.forward(&(gate.gelu()? * up)?)?;
            let h = layer.post_ffn_norm.forward(&h)?;
            x = (x + h)?;
        }
        cache.pos += n;
        last_logits(&x, n, &self.final_norm, &self.lm_head)
    }

    /// Embedding rows for `tokens`, dequantized one row at a time so the 262k-row table stays
    /// quantized in memory.
    fn embed_tokens(&self, tokens: &[u32]) -> Result<Tensor, ModelError> {
        let table = self.embed.as_ref().unwrap_or(&self.lm_head);
        Ok(table.rows(tokens, &self.device)?.unsqueeze(0)?)
    }

    fn attention(
        &self,
        layer: &Layer,
        x: &Tensor,
        lc: &mut LayerCache,
        pos: usize,
    ) -> Result<Tensor, ModelError> {
        let cfg = &self.cfg;
        let (b, n, _) = x.dims3()?;
        let (heads, kv_heads, d) = (cfg.heads, cfg.kv_heads, cfg.head_dim);
        let [q, k, v] = shared::<3>(&[&layer.q, &layer.k, &layer.v], x)?;
        let q = q.reshape((b, n, heads, d))?.transpose(1, 2)?;
        let k = k.reshape((b, n, kv_heads, d))?.transpose(1, 2)?;
        let v = v.reshape((b, n, kv_heads, d))?.transpose(1, 2)?;
        let q = layer.q_norm.forward(&q)?;
        let k = layer.k_norm.forward(&k)?;
        let rope = if layer.global {
            &self.rope_global
        } else {
            &self.rope_local
        };
        let q = rope.apply(&q, pos)?;
        let k = rope.apply(&k, pos)?;

        // Keys and values in position order: cached ones, then the new ones.
        let (k_all, v_all) = match (&lc.k, &lc.v) {
            (Some(ck), Some(cv)) => (
                Tensor::cat(&[ck, &k], 2)?,
                Tensor::cat(&[cv, &v.contiguous()?], 2)?,
            ),
            _ => (k.contiguous()?, v.contiguous()?),
        };
        let m = k_all.dim(2)?;
        let first = pos + n - m; // absolute position of k_all's first row

        // Grouped-query attention without copying keys: fold each group's heads into rows.
        let group = heads / kv_heads;
        let q = q.contiguous()?.reshape((b, kv_heads, group * n, d))?;
        let scale = 1.0 / (d as f64).sqrt();
        let mut scores = (q.matmul(&k_all.t()?)? * scale)?;
        if let Some(mask) = self.mask(layer.global, pos, n, first, m, group)? {
            scores = scores.broadcast_add(&mask)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v_all)?; // (b, kv_heads, group * n, d)
        let out = out
            .reshape((b, heads, n, d))?
            .transpose(1, 2)?
            .reshape((b, n, heads * d))?;

        // Keep what later positions can still see: everything for global layers, the last
        // window - 1 positions for local ones.
        let keep = if layer.global {
            m
        } else {
            m.min(cfg.window.saturating_sub(1))
        };
        lc.k = Some(k_all.narrow(2, m - keep, keep)?.contiguous()?);
        lc.v = Some(v_all.narrow(2, m - keep, keep)?.contiguous()?);
        Ok(layer.o.forward(&out)?)
    }

    /// The additive mask for `n` queries at `pos..` over `m` keys at `first..`: causal, and for
    /// local layers limited to the window. `None` when nothing is masked (single-token decode).
    fn mask(
        &self,
        global: bool,
        pos: usize,
        n: usize,
        first: usize,
        m: usize,
        group: usize,
    ) -> Result<Option<Tensor>, ModelError> {
        let window = self.cfg.window;
        let allowed =
            |q_abs: usize, k_abs: usize| k_abs <= q_abs && (global || q_abs - k_abs < window);
        if n == 1 && (0..m).all(|j| allowed(pos, first + j)) {
            return Ok(None);
        }
        let mut mask = Vec::with_capacity(group * n * m);
        for _ in 0..group {
            for i in 0..n {
                for j in 0..m {
                    mask.push(if allowed(pos + i, first + j) {
                        0.0f32
                    } else {
                        f32::NEG_INFINITY
                    });
                }
            }
        }
        Ok(Some(Tensor::from_vec(mask, (group * n, m), &self.device)?))
    }
}

/// Checks that `n` new tokens at position `pos` fit the usable context.
pub(super) fn check_fits(n: usize, pos: usize, max_positions: usize) -> Result<(), ModelError> {
    if n == 0 {
        return Err(ModelError::Limit(
            "forward needs at least one token".to_owned(),
        ));
    }
    if pos + n > max_positions {
        return Err(ModelError::Limit(format!(
            "{} positions exceed the model's usable context of {max_positions}",
            pos + n
        )));
    }
    Ok(())
}

/// The logits after the last of the `n` positions of `x` (batch, n, hidden).
pub(super) fn last_logits(
    x: &Tensor,
    n: usize,
    norm: &RmsNorm,
    head: &Linear,
) -> Result<Vec<f32>, ModelError> {
    let last = x.narrow(1, n - 1, 1)?;
    let logits = head.forward(&norm.forward(&last)?)?;
    Ok(logits
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?)
}

/// `N` projections of the same input (see [`Linear::forward_shared`]).
pub(super) fn shared<const N: usize>(
    parts: &[&Linear; N],
    x: &Tensor,
) -> Result<[Tensor; N], ModelError> {
    Linear::forward_shared(parts, x)?
        .try_into()
        .map_err(|_| ModelError::Limit(format!("expected {N} projections")))
}

/// Index of the largest logit (greedy decoding).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}
