//! A loaded model with its tokenizer and prompt format, and one generation job run on it: the
//! worker side of the embedded backend, free of queues and HTTP.

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::Device;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedSender;

use super::decoder::{Decoder, DecoderCache, Family};
use super::gemma3::{one_logits, Cache, Gemma3, ModelError, Step};
use super::gguf::Metadata;
use super::prompt::{text_messages, PromptFormat};
use super::sampling::{FinishReason, Sampler, SamplingParams, StopFilter, TokenLogprob};
use super::tokenizer::GgufTokenizer;
use crate::backends::BackendError;
use crate::wire::Usage;
use wattgate_kernels::attention::SLACK;

/// A loaded model of any supported architecture.
pub enum Model {
    /// Gemma 3.
    Gemma3(Gemma3),
    /// Llama, Qwen2, Qwen3.
    Decoder(Decoder),
}

/// A sequence's state in either architecture. Cloning is cheap (the tensors are shared, and a
/// step writes new ones rather than changing them), which is what lets the prefix cache keep a
/// snapshot of a sequence that goes on generating.
#[derive(Clone)]
pub enum SequenceCache {
    /// Gemma 3's.
    Gemma3(Cache),
    /// The decoder family's.
    Decoder(DecoderCache),
}

impl Model {
    /// Loads the architecture named by `general.architecture`.
    pub fn load(
        content: &candle_core::quantized::gguf_file::Content,
        file: &mut std::fs::File,
        max_context: usize,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let meta = Metadata(&content.metadata);
        let arch = meta.string("general.architecture")?;
        if arch == "gemma3" {
            return Ok(Self::Gemma3(Gemma3::load(
                content,
                file,
                max_context,
                device,
            )?));
        }
        match Family::from_architecture(arch) {
            Some(family) => Ok(Self::Decoder(Decoder::load(
                content,
                file,
                family,
                max_context,
                device,
            )?)),
            None => Err(ModelError::Limit(format!(
                "architecture \"{arch}\" is not supported (supported: gemma3, llama, qwen2, qwen3)"
            ))),
        }
    }

    /// Usable positions.
    pub fn max_positions(&self) -> usize {
        match self {
            Self::Gemma3(m) => m.config().max_positions,
            Self::Decoder(m) => m.config().max_positions,
        }
    }

    /// A fresh cache for a new sequence.
    pub fn new_cache(&self) -> SequenceCache {
        match self {
            Self::Gemma3(m) => SequenceCache::Gemma3(m.new_cache()),
            Self::Decoder(m) => SequenceCache::Decoder(m.new_cache()),
        }
    }

    /// Runs `tokens` at the cache's position; the logits after the last one.
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut SequenceCache,
    ) -> Result<Vec<f32>, ModelError> {
        one_logits(self.forward_batch(&mut [(tokens, cache, true)])?)
    }

    /// One step over several sequences, each `(tokens, cache, wants logits)`: the weights are
    /// read once for all of them (see [`Gemma3::forward_batch`]).
    pub fn forward_batch(
        &self,
        batch: &mut [(&[u32], &mut SequenceCache, bool)],
    ) -> Result<Vec<Option<Vec<f32>>>, ModelError> {
        match self {
            Self::Gemma3(m) => m.forward_batch(&mut steps(batch, |c| match c {
                SequenceCache::Gemma3(c) => Some(c),
                SequenceCache::Decoder(_) => None,
            })?),
            Self::Decoder(m) => m.forward_batch(&mut steps(batch, |c| match c {
                SequenceCache::Decoder(c) => Some(c),
                SequenceCache::Gemma3(_) => None,
            })?),
        }
    }

    /// Bytes of keys and values a sequence of `positions` holds at most (f32; Gemma 3's
    /// sliding-window layers keep their window and at most [`SLACK`] positions it has passed).
    pub fn kv_bytes(&self, positions: usize) -> usize {
        let f32_bytes = std::mem::size_of::<f32>();
        match self {
            Self::Gemma3(m) => {
                let c = m.config();
                let per_position = 2 * c.kv_heads * c.head_dim * f32_bytes;
                let local = positions.min(c.window + SLACK);
                let globals = (0..c.layers).filter(|&l| c.is_global(l)).count();
                per_position * (globals * positions + (c.layers - globals) * local)
            }
            Self::Decoder(m) => {
                let c = m.config();
                2 * c.kv_heads * c.head_dim * f32_bytes * c.layers * positions
            }
        }
    }

    /// The state `cache` had after its first `position` positions, when the cache still holds
    /// what that state needs (see [`Cache::truncated`]).
    pub fn truncated(&self, cache: &SequenceCache, position: usize) -> Option<SequenceCache> {
        match (self, cache) {
            (Self::Gemma3(m), SequenceCache::Gemma3(c)) => {
                c.truncated(position, m.config()).map(SequenceCache::Gemma3)
            }
            (Self::Decoder(_), SequenceCache::Decoder(c)) => {
                c.truncated(position).map(SequenceCache::Decoder)
            }
            _ => None,
        }
    }
}

/// The batch as one architecture's steps; `cache` picks that architecture's cache.
fn steps<'a, C>(
    batch: &'a mut [(&[u32], &mut SequenceCache, bool)],
    cache: impl Fn(&mut SequenceCache) -> Option<&mut C>,
) -> Result<Vec<Step<'a, C>>, ModelError> {
    batch
        .iter_mut()
        .map(|(tokens, c, logits)| {
            Ok(Step {
                tokens,
                cache: cache(c).ok_or_else(|| {
                    ModelError::Limit("a cache from another model was passed".to_owned())
                })?,
                logits: *logits,
            })
        })
        .collect()
}

impl SequenceCache {
    /// Positions in the cache.
    pub fn position(&self) -> usize {
        match self {
            Self::Gemma3(c) => c.position(),
            Self::Decoder(c) => c.position(),
        }
    }
}

/// A loaded model with its tokenizer and prompt format.
pub struct Engine {
    model: Model,
    tokenizer: GgufTokenizer,
    format: PromptFormat,
    stop_ids: Vec<u32>,
}

impl Engine {
    /// Tokens `text` encodes to with this model's tokenizer (for metering replies whose
    /// upstream reported no usage).
    pub fn count_tokens(&self, text: &str) -> Option<u64> {
        self.tokenizer.encode(text).ok().map(|ids| ids.len() as u64)
    }

    /// Loads a GGUF file.
    pub fn load(
        path: &Path,
        max_context: usize,
        plain: bool,
        device: &Device,
    ) -> Result<Self, String> {
        let describe = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
        let mut file = std::fs::File::open(path).map_err(|e| describe(&e))?;
        let content = candle_core::quantized::gguf_file::Content::read(&mut file)
            .map_err(|e| describe(&e))?;
        let tokenizer = GgufTokenizer::from_gguf(&content).map_err(|e| describe(&e))?;
        let meta = Metadata(&content.metadata);
        let arch = meta
            .string("general.architecture")
            .map_err(|e| describe(&e))?;
        let format = match meta.string("tokenizer.chat_template") {
            _ if plain => PromptFormat::Plain {
                bos: tokenizer.token(tokenizer.bos).unwrap_or_default(),
            },
            Ok(source) => PromptFormat::Template {
                source: source.to_owned(),
                bos_token: tokenizer.token(tokenizer.bos).unwrap_or_default(),
                eos_token: tokenizer.token(tokenizer.eos).unwrap_or_default(),
            },
            Err(_) if arch == "gemma3" => PromptFormat::Gemma,
            Err(_) => {
                return Err(describe(&format!(
                "no tokenizer.chat_template in the file and no built-in turn format for \"{arch}\""
            )))
            }
        };
        let model =
            Model::load(&content, &mut file, max_context, device).map_err(|e| describe(&e))?;
        let mut stop_ids = vec![tokenizer.eos];
        // End-of-turn tokens of the supported families' chat formats.
        stop_ids.extend(
            [
                "<end_of_turn>",
                "<eot>",
                "<|im_end|>",
                "<|eot_id|>",
                "<|endoftext|>",
            ]
            .iter()
            .filter_map(|t| tokenizer.token_id(t)),
        );
        Ok(Self {
            model,
            tokenizer,
            format,
            stop_ids,
        })
    }

    /// Usable positions (prompt + output).
    pub fn max_positions(&self) -> usize {
        self.model.max_positions()
    }

    /// The prompt token ids for OpenAI `messages`.
    pub fn prompt_ids(&self, messages: &[Value]) -> Result<Vec<u32>, BackendError> {
        let messages = text_messages(messages).map_err(|e| BackendError::Unsupported {
            detail: e.to_string(),
        })?;
        let text = self
            .format
            .render(&messages)
            .map_err(|e| BackendError::Unsupported {
                detail: e.to_string(),
            })?;
        self.tokenizer
            .encode(&text)
            .map_err(|e| BackendError::Internal {
                detail: e.to_string(),
            })
    }

    /// The model (for the scheduler's batched steps).
    pub(super) fn model(&self) -> &Model {
        &self.model
    }

    /// Starts a sequence for `job`, resuming from `reused` (a cache holding the first
    /// `reused.position()` prompt tokens, from the prefix cache) when given.
    pub(super) fn start(&self, job: Job, reused: Option<SequenceCache>) -> Sequence {
        let cache = reused.unwrap_or_else(|| self.model.new_cache());
        let in_cache = cache.position();
        Sequence {
            sampler: Sampler::new(job.sampling.clone()),
            scored: job.logprobs.is_some() || job.signals,
            top_n: job.logprobs.unwrap_or(0),
            filter: StopFilter::new(job.stops.clone()),
            cache,
            in_cache,
            next: None,
            generated: Vec::new(),
            decoded: 0,
            trail: Trail::default(),
            job,
        }
    }

    /// Takes the logits after a sequence's last token: draws the next token and sends its
    /// text (past the stop filter), or ends the sequence (end of turn, stop string, max
    /// tokens, or a client that left).
    pub(super) fn accept(&self, seq: &mut Sequence, logits: &[f32]) -> Progress {
        let next = seq.sampler.sample(logits);
        let scored = seq
            .scored
            .then(|| seq.sampler.logprob(logits, next, seq.top_n));
        if self.stop_ids.contains(&next) {
            return self.finish(seq, FinishReason::Stop);
        }
        seq.generated.push(next);
        let text = self.tokenizer.decode(&seq.generated).unwrap_or_default();
        // A multi-byte character split across tokens decodes as U+FFFD until complete; its
        // text then belongs to the token that completes it.
        let mut delta = "";
        if !text.ends_with('\u{FFFD}')
            && text.len() >= seq.decoded
            && text.is_char_boundary(seq.decoded)
        {
            delta = &text[seq.decoded..];
            seq.decoded = text.len();
        }
        if let Some(lp) = scored {
            seq.trail.push(delta, lp, |id| {
                self.tokenizer.decode(&[id]).unwrap_or_default()
            });
        }
        if !delta.is_empty() {
            let (out, hit) = seq.filter.push(delta);
            let mut entries = seq.trail.release(out.len());
            if hit {
                entries.extend(seq.trail.cut());
            }
            if !out.is_empty() && seq.job.events.send(Event::Text(out, entries)).is_err() {
                return Progress::Left;
            }
            if hit {
                return self.finish(seq, FinishReason::Stop);
            }
        }
        if seq.generated.len() >= seq.job.max_tokens {
            return self.finish(seq, FinishReason::Length);
        }
        if seq.job.events.is_closed() {
            return Progress::Left;
        }
        seq.next = Some(next);
        Progress::Running
    }

    fn finish(&self, seq: &mut Sequence, finish: FinishReason) -> Progress {
        // Text held back for a stop string that never came is the client's.
        let rest = seq.filter.finish();
        let events = &seq.job.events;
        if !rest.is_empty() {
            let entries = seq.trail.release(rest.len());
            if events.send(Event::Text(rest, entries)).is_err() {
                return Progress::Left;
            }
        }
        let (prompt, generated) = (seq.job.prompt.len() as u64, seq.generated.len() as u64);
        let done = events.send(Event::Done {
            finish,
            usage: Usage {
                prompt_tokens: prompt,
                completion_tokens: generated,
                total_tokens: prompt + generated,
            },
        });
        if done.is_err() {
            return Progress::Left;
        }
        Progress::Done
    }
}

/// Where a sequence stands after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Progress {
    /// Generating: its next token runs in the next step.
    Running,
    /// Finished and its client told.
    Done,
    /// Its client went away; nothing more is sent.
    Left,
}

/// One request being generated: its job, its cache and where it stands.
pub(super) struct Sequence {
    pub(super) job: Job,
    pub(super) cache: SequenceCache,
    /// Prompt tokens in the cache (reused from the prefix cache or prefilled).
    pub(super) in_cache: usize,
    /// The token drawn last, which the next step runs.
    pub(super) next: Option<u32>,
    sampler: Sampler,
    scored: bool,
    top_n: usize,
    generated: Vec<u32>,
    /// Bytes of decoded text already passed to the stop filter.
    decoded: usize,
    filter: StopFilter,
    trail: Trail,
}

impl Sequence {
    /// Prompt tokens still to prefill.
    pub(super) fn prompt_left(&self) -> usize {
        self.job.prompt.len().saturating_sub(self.in_cache)
    }
}

/// One generated token as OpenAI's `logprobs.content[]` describes it.
#[derive(Debug, Clone)]
pub(super) struct TokenEntry {
    /// The text this token added to the answer (empty for the first bytes of a character split
    /// across tokens: the token completing it carries the whole character), so the entries'
    /// texts concatenate to exactly the answer.
    pub(super) text: String,
    pub(super) logprob: f32,
    pub(super) top: Vec<(String, f32)>,
}

impl TokenEntry {
    pub(super) fn to_json(&self) -> Value {
        let finite = |lp: f32| {
            if lp.is_finite() {
                f64::from(lp)
            } else {
                -9999.0
            }
        };
        json!({
            "token": self.text,
            "logprob": finite(self.logprob),
            "bytes": self.text.as_bytes(),
            "top_logprobs": self.top.iter().map(|(t, lp)| json!({
                "token": t, "logprob": finite(*lp), "bytes": t.as_bytes(),
            })).collect::<Vec<_>>(),
        })
    }
}

/// Token entries waiting for their text to be released past the stop filter, so each event
/// carries the entries of exactly the text it carries.
#[derive(Default)]
pub(super) struct Trail {
    waiting: std::collections::VecDeque<TokenEntry>,
    /// Released bytes not yet matched to a whole entry.
    unmatched: usize,
}

impl Trail {
    fn push(&mut self, text: &str, lp: TokenLogprob, name: impl Fn(u32) -> String) {
        self.waiting.push_back(TokenEntry {
            text: text.to_owned(),
            logprob: lp.logprob,
            top: lp.top.into_iter().map(|(id, l)| (name(id), l)).collect(),
        });
    }

    /// The entries whose text lies wholly inside the `bytes` just released.
    fn release(&mut self, bytes: usize) -> Vec<TokenEntry> {
        self.unmatched += bytes;
        let mut out = Vec::new();
        while let Some(front) = self.waiting.front() {
            if front.text.len() > self.unmatched {
                break;
            }
            self.unmatched -= front.text.len();
            out.extend(self.waiting.pop_front());
        }
        out
    }

    /// After a stop string: the entry the cut fell inside, trimmed to the released part.
    fn cut(&mut self) -> Option<TokenEntry> {
        let keep = std::mem::take(&mut self.unmatched);
        let mut entry = self.waiting.pop_front().filter(|_| keep > 0)?;
        self.waiting.clear();
        let at = (0..=keep.min(entry.text.len()))
            .rev()
            .find(|&i| entry.text.is_char_boundary(i))
            .unwrap_or(0);
        entry.text.truncate(at);
        Some(entry)
    }
}

pub(super) struct Job {
    pub(super) prompt: Vec<u32>,
    pub(super) max_tokens: usize,
    pub(super) sampling: SamplingParams,
    pub(super) stops: Vec<String>,
    /// The client asked for `logprobs`: with this many `top_logprobs`.
    pub(super) logprobs: Option<usize>,
    /// The gateway wants the sampled tokens' log-probabilities (quality guard).
    pub(super) signals: bool,
    pub(super) enqueued: Instant,
    pub(super) queue_timeout: Duration,
    /// Told when a worker takes the job; dropped by a requester that stopped waiting.
    pub(super) started: Option<tokio::sync::oneshot::Sender<()>>,
    pub(super) events: UnboundedSender<Event>,
}

pub(super) enum Event {
    Text(String, Vec<TokenEntry>),
    Done { finish: FinishReason, usage: Usage },
    Failed(BackendError),
}
