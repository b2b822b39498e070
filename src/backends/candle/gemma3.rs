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
use wattgate_kernels::attention::{attend, Geometry, KvRows, Queries};

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

    /// Whether `layer` attends to every position (the others to the sliding window).
    pub fn is_global(&self, layer: usize) -> bool {
        (layer + 1).is_multiple_of(self.global_every.max(1))
    }

    /// The first position `layer` still needs once `end` positions are processed.
    fn keep_from(&self, layer: usize, end: usize) -> usize {
        if self.is_global(layer) {
            0
        } else {
            end.saturating_sub(self.window.saturating_sub(1))
        }
    }

    /// How `layer` attends.
    fn geometry(&self, layer: usize) -> Geometry {
        Geometry {
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            window: (!self.is_global(layer)).then_some(self.window),
            scale: 1.0 / (self.head_dim as f32).sqrt(),
        }
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

    /// The cosine and sine rows of the given positions (one per token row of a step).
    pub(super) fn rows(&self, positions: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((
            self.cos.index_select(positions, 0)?,
            self.sin.index_select(positions, 0)?,
        ))
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

/// The per-sequence state: each layer's keys and values, and how many positions they cover.
#[derive(Clone)]
pub struct Cache {
    layers: Vec<KvRows>,
    pos: usize,
}

impl Cache {
    /// Positions processed so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Bytes of keys and values held.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(KvRows::bytes).sum()
    }

    /// The state this cache had after its first `pos` positions, or `None` when that state
    /// cannot be recovered: a global layer keeps every position, but a sliding-window layer
    /// forgets those its window has passed, so going back is possible only while the
    /// positions the window at `pos` covers are still held (always while the sequence is
    /// within the window, the common case for chat).
    pub fn truncated(&self, pos: usize, cfg: &Gemma3Config) -> Option<Cache> {
        if pos > self.pos {
            return None;
        }
        let layers = self
            .layers
            .iter()
            .enumerate()
            .map(|(l, kv)| kv.truncated(cfg.keep_from(l, pos), pos))
            .collect::<Option<Vec<_>>>()?;
        Some(Cache { layers, pos })
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
                .map(|_| KvRows::new(self.cfg.kv_heads * self.cfg.head_dim))
                .collect(),
            pos: 0,
        }
    }

    /// Runs `tokens` at the cache's position and returns the logits after the last one.
    pub fn forward(&self, tokens: &[u32], cache: &mut Cache) -> Result<Vec<f32>, ModelError> {
        let mut step = [Step {
            tokens,
            cache,
            logits: true,
        }];
        one_logits(self.forward_batch(&mut step)?)
    }

    /// One step over several sequences at once: each runs its own `tokens` (one for a decode
    /// step, a chunk of its prompt for prefill) at its own cache's position. Every projection
    /// and the MLP run once over all the rows, so the weights are read once per step however
    /// many sequences share it; attention runs per sequence on its own cache. Returns, per
    /// step, the logits after its last token when it asked for them.
    pub fn forward_batch(
        &self,
        steps: &mut [Step<'_, Cache>],
    ) -> Result<Vec<Option<Vec<f32>>>, ModelError> {
        let cfg = &self.cfg;
        let tokens = batch_tokens(steps, |c| c.pos, cfg.max_positions)?;
        let n = tokens.len();
        let positions = row_positions(steps, |c| c.pos, &self.device)?;
        let local = self.rope_local.rows(&positions)?;
        let global = self.rope_global.rows(&positions)?;
        let mut x = (self.embed_tokens(&tokens)? * (cfg.hidden as f64).sqrt())?;
        for (l, layer) in self.layers.iter().enumerate() {
            let h = layer.attn_norm.forward(&x)?;
            let [q, k, v] = shared::<3>(&[&layer.q, &layer.k, &layer.v], &h)?;
            // Per-head norms and RoPE on every row at once, each row at its own position.
            let q = layer
                .q_norm
                .forward(&q.reshape((1, n, cfg.heads, cfg.head_dim))?)?;
            let k = layer
                .k_norm
                .forward(&k.reshape((1, n, cfg.kv_heads, cfg.head_dim))?)?;
            let (cos, sin) = if layer.global { &global } else { &local };
            let q = candle_nn::rotary_emb::rope_thd(&q, cos, sin)?;
            let k = candle_nn::rotary_emb::rope_thd(&k, cos, sin)?;
            let geometry = cfg.geometry(l);
            let out = attend_steps(
                steps,
                |c| c.layers.get_mut(l),
                |c| c.pos,
                &geometry,
                [&q, &k, &v],
            )?;
            for step in steps.iter_mut() {
                let end = step.cache.pos + step.tokens.len();
                if let Some(kv) = step.cache.layers.get_mut(l) {
                    kv.forget_before(cfg.keep_from(l, end));
                }
            }
            let h = layer.o.forward(&out)?;
            let h = layer.post_attn_norm.forward(&h)?;
            x = (x + h)?;
            let h = layer.ffn_norm.forward(&x)?;
            let [gate, up] = shared::<2>(&[&layer.gate, &layer.up], &h)?;
            let h = layer.down.forward(&(gate.gelu()? * up)?)?;
            let h = layer.post_ffn_norm.forward(&h)?;
            x = (x + h)?;
        }
        for step in steps.iter_mut() {
            step.cache.pos += step.tokens.len();
        }
        step_logits(&x, steps, &self.final_norm, &self.lm_head)
    }

    /// Embedding rows for `tokens`, dequantized one row at a time so the 262k-row table stays
    /// quantized in memory.
    fn embed_tokens(&self, tokens: &[u32]) -> Result<Tensor, ModelError> {
        let table = self.embed.as_ref().unwrap_or(&self.lm_head);
        Ok(table.rows(tokens, &self.device)?.unsqueeze(0)?)
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

/// One sequence's part of a batched forward step.
pub struct Step<'a, C> {
    /// The tokens to run: the next one for a decode step, a chunk of the prompt for prefill.
    pub tokens: &'a [u32],
    /// The sequence's cache, extended by `tokens`.
    pub cache: &'a mut C,
    /// Whether to compute the logits after the last token (not for a prefill chunk that is
    /// not the prompt's last: the output head is the largest matrix of a small model).
    pub logits: bool,
}

/// Every step's tokens, in order, after checking that each fits its cache's context.
pub(super) fn batch_tokens<C>(
    steps: &[Step<'_, C>],
    position: impl Fn(&C) -> usize,
    max_positions: usize,
) -> Result<Vec<u32>, ModelError> {
    if steps.is_empty() {
        return Err(ModelError::Limit(
            "a step needs at least one sequence".to_owned(),
        ));
    }
    let mut tokens = Vec::with_capacity(steps.iter().map(|s| s.tokens.len()).sum());
    for step in steps {
        check_fits(step.tokens.len(), position(step.cache), max_positions)?;
        tokens.extend_from_slice(step.tokens);
    }
    Ok(tokens)
}

/// The sequences' attention outputs (1, n_i, width) side by side as (1, sum n_i, width).
pub(super) fn join_rows(mut parts: Vec<Tensor>) -> Result<Tensor, ModelError> {
    if parts.len() == 1 {
        if let Some(only) = parts.pop() {
            return Ok(only);
        }
    }
    Ok(Tensor::cat(&parts, 1)?)
}

/// The position of every token row of a step, as a tensor for the RoPE tables.
pub(super) fn row_positions<C>(
    steps: &[Step<'_, C>],
    position: impl Fn(&C) -> usize,
    device: &Device,
) -> Result<Tensor, ModelError> {
    let mut rows = Vec::new();
    for step in steps {
        let pos = position(step.cache);
        rows.extend((pos..pos + step.tokens.len()).map(|p| p as u32));
    }
    let n = rows.len();
    Ok(Tensor::from_vec(rows, n, device)?)
}

/// One layer's attention for every step: appends each step's new keys and values (rows of `k`,
/// `v`: (1, rows, kv_heads, head_dim)) to its cache, then runs the queries (`q`: (1, rows,
/// heads, head_dim), already rotated) over them with the fixed-order kernel. Returns (1, rows,
/// heads x head_dim).
pub(super) fn attend_steps<C>(
    steps: &mut [Step<'_, C>],
    layer: impl Fn(&mut C) -> Option<&mut KvRows>,
    position: impl Fn(&C) -> usize,
    geometry: &Geometry,
    [q, k, v]: [&Tensor; 3],
) -> Result<Tensor, ModelError> {
    let device = q.device().clone();
    let flat = |t: &Tensor| -> Result<Vec<f32>, ModelError> {
        Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
    };
    let (q, k, v) = (flat(q)?, flat(k)?, flat(v)?);
    let q_row = geometry.heads * geometry.head_dim;
    let kv_row = geometry.kv_heads * geometry.head_dim;
    let kernel = |e: String| ModelError::Limit(format!("attention: {e}"));
    let missing = || ModelError::Limit("a cache from another model".to_owned());
    let mut at = 0;
    for step in steps.iter_mut() {
        let rows = at * kv_row..(at + step.tokens.len()) * kv_row;
        let cache = layer(step.cache).ok_or_else(missing)?;
        cache.append(&k[rows.clone()], &v[rows]).map_err(kernel)?;
        at += step.tokens.len();
    }
    let mut out = vec![0f32; q.len()];
    {
        let mut queries = Vec::with_capacity(steps.len());
        let mut rest: &mut [f32] = &mut out;
        let mut at = 0;
        for step in steps.iter_mut() {
            let n = step.tokens.len();
            let pos = position(step.cache);
            let (mine, tail) = std::mem::take(&mut rest).split_at_mut(n * q_row);
            rest = tail;
            queries.push(Queries {
                cache: layer(step.cache).ok_or_else(missing)?,
                pos,
                q: &q[at * q_row..(at + n) * q_row],
                out: mine,
            });
            at += n;
        }
        attend(geometry, &mut queries).map_err(kernel)?;
    }
    let rows = out.len() / q_row.max(1);
    Ok(Tensor::from_vec(out, (1, rows, q_row), &device)?)
}

/// Per step, the logits after its last row of `x` (1, rows, hidden) when it asked for them.
/// The rows that need logits go through the output head together.
pub(super) fn step_logits<C>(
    x: &Tensor,
    steps: &[Step<'_, C>],
    norm: &RmsNorm,
    head: &Linear,
) -> Result<Vec<Option<Vec<f32>>>, ModelError> {
    let mut ends = Vec::new();
    let mut at = 0;
    for step in steps {
        at += step.tokens.len();
        if step.logits {
            ends.push(x.narrow(1, at - 1, 1)?);
        }
    }
    let mut rows = if ends.is_empty() {
        Vec::new()
    } else {
        let last = join_rows(ends)?;
        let logits = head.forward(&norm.forward(&last)?)?;
        let logits = logits.squeeze(0)?.to_dtype(DType::F32)?;
        logits.to_vec2::<f32>()?
    }
    .into_iter();
    Ok(steps
        .iter()
        .map(|s| if s.logits { rows.next() } else { None })
        .collect())
}

/// The logits of a single step that asked for them.
pub(super) fn one_logits(mut out: Vec<Option<Vec<f32>>>) -> Result<Vec<f32>, ModelError> {
    out.pop()
        .flatten()
        .ok_or_else(|| ModelError::Limit("the step computed no logits".to_owned()))
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
