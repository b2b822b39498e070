//! A BERT sentence encoder on candle (all-MiniLM-L6-v2): word pieces in, mean-pooled,
//! L2-normalised vectors out, exactly as sentence-transformers computes them (its modules.json:
//! Transformer, mean Pooling, Normalize).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::bert::{BertModel, Config};

use crate::models::EncoderSpec;

/// A loaded encoder.
pub struct Encoder {
    model: BertModel,
    tokenizer: tokenizers::Tokenizer,
    /// `[CLS]` and `[SEP]`, wrapped around token-array inputs as the tokenizer wraps text.
    cls: u32,
    sep: u32,
    vocab: u32,
    max_tokens: usize,
    dimensions: usize,
}

fn text<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> String {
    move |e| format!("{what}: {e}")
}

impl Encoder {
    /// Loads the encoder's files from `dir` (see [`crate::models::pull_encoder`]).
    pub fn load(dir: &Path, spec: &EncoderSpec) -> Result<Self, String> {
        let config: Config = serde_json::from_str(
            &std::fs::read_to_string(dir.join("config.json")).map_err(text("config.json"))?,
        )
        .map_err(text("config.json"))?;
        // SAFETY: the weights file is only read, and the cache never rewrites a verified file
        // in place (a re-pull renames a new file over it).
        let vb = unsafe {
            candle_nn::VarBuilder::from_mmaped_safetensors(
                &[dir.join("model.safetensors")],
                DType::F32,
                &Device::Cpu,
            )
        }
        .map_err(text("model.safetensors"))?;
        let model = BertModel::load(vb, &config).map_err(text("model.safetensors"))?;
        let mut tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(text("tokenizer.json"))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: spec.max_tokens,
                ..Default::default()
            }))
            .map_err(text("tokenizer.json"))?;
        let id = |t: &str| {
            tokenizer
                .token_to_id(t)
                .ok_or_else(|| format!("tokenizer.json has no {t} token"))
        };
        Ok(Self {
            cls: id("[CLS]")?,
            sep: id("[SEP]")?,
            vocab: u32::try_from(config.vocab_size).unwrap_or(u32::MAX),
            tokenizer,
            model,
            max_tokens: spec.max_tokens,
            dimensions: spec.dimensions,
        })
    }

    /// Output dimensions.
    pub fn dimensions(&self) -> usize {
        self.dimensions
    }

    /// The word pieces of `text`, `[CLS]` and `[SEP]` included, cut at the encoder's length.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, String> {
        self.tokenizer
            .encode(text, true)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| format!("tokenizing: {e}"))
    }

    /// Token ids a client sent: checked against the vocabulary, wrapped in `[CLS]`/`[SEP]`
    /// and cut like text. `Err` names the first id outside the vocabulary.
    pub fn wrap_ids(&self, ids: &[u64]) -> Result<Vec<u32>, u64> {
        let mut out = Vec::with_capacity(ids.len().min(self.max_tokens) + 2);
        out.push(self.cls);
        for &id in ids.iter().take(self.max_tokens.saturating_sub(2)) {
            match u32::try_from(id) {
                Ok(i) if i < self.vocab => out.push(i),
                _ => return Err(id),
            }
        }
        out.push(self.sep);
        Ok(out)
    }

    /// The vocabulary size (token ids are below it).
    pub fn vocab(&self) -> u32 {
        self.vocab
    }

    /// Embeds a batch of tokenized inputs: padded to the longest, attention masked, mean-pooled
    /// over the real tokens, L2-normalised.
    pub fn embed(&self, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, String> {
        let longest = batch.iter().map(Vec::len).max().unwrap_or(0);
        if longest == 0 {
            return Ok(Vec::new());
        }
        let mut ids = Vec::with_capacity(batch.len() * longest);
        let mut mask = Vec::with_capacity(batch.len() * longest);
        for input in batch {
            ids.extend(input.iter().copied());
            ids.extend(std::iter::repeat_n(0u32, longest - input.len()));
            mask.extend(std::iter::repeat_n(1u32, input.len()));
            mask.extend(std::iter::repeat_n(0u32, longest - input.len()));
        }
        let run = || -> candle_core::Result<Vec<Vec<f32>>> {
            let shape = (batch.len(), longest);
            let ids = Tensor::from_vec(ids, shape, &Device::Cpu)?;
            let mask = Tensor::from_vec(mask, shape, &Device::Cpu)?;
            let types = ids.zeros_like()?;
            let hidden = self.model.forward(&ids, &types, Some(&mask))?;
            let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
            let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
            let counts = mask.sum(1)?;
            let mean = summed.broadcast_div(&counts)?;
            let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f32::MAX)?;
            mean.broadcast_div(&norm)?.to_vec2()
        };
        run().map_err(|e| format!("encoder: {e}"))
    }
}
