//! Continuous batching: one loop per worker thread that runs every active sequence in one
//! forward pass per step.
//!
//! Why: decoding on a CPU is bound by reading the weights. One pass over them can serve many
//! sequences for little more than the cost of one, so a worker that ran one request at a time
//! left most of the machine's throughput unused and sent the overflow to the cloud
//! (`local_busy`). Here a step runs one token for each decoding sequence and a chunk of prompt
//! for sequences still prefilling, all through the same matrix products.
//!
//! - **Joining**: a request taken from the queue joins at the next step, up to `max_batch`
//!   sequences per worker.
//! - **Chunked prefill**: at most `prefill_chunk_tokens` prompt tokens run per step (shared by
//!   the prefilling sequences, oldest first), so a long prompt delays the running streams by
//!   one chunk's time per step rather than by its whole prefill.
//! - **KV admission**: a request reserves the keys and values of its prompt plus its
//!   `max_tokens` from `kv_cache_mb` before it starts; one that cannot get them waits in the
//!   queue and, past `queue_timeout_s`, goes to the cloud (`local_busy`). Memory is bounded by
//!   the budget, never by luck.
//! - **Cancellation**: a sequence whose client left is dropped before the next step, and its
//!   reservation freed.
//! - **Prefix reuse**: see [`super::prefix`].
//!
//! Every sequence's results are the same as if it ran alone: each row of a matrix product is
//! computed independently of the others, and attention runs per sequence on its own cache.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::engine::{Engine, Event, Job, Progress, Sequence};
use super::prefix::PrefixCache;
use crate::backends::BackendError;

/// How a worker batches.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Sequences per step.
    pub max_batch: usize,
    /// Prompt tokens per step.
    pub prefill_chunk: usize,
}

/// State shared by a backend's workers.
pub struct Shared {
    /// Jobs accepted and not yet started (the `wattgate_local_queue_depth` gauge).
    pub queued: AtomicUsize,
    /// Jobs accepted and not yet over, queued or running: what admission counts against the
    /// batches' places plus `queue_depth`.
    pub held: AtomicUsize,
    /// Sequences generating now.
    pub active: AtomicUsize,
    /// Forward steps run, and the sequences they ran summed over steps (their ratio is the
    /// mean batch size).
    pub steps: AtomicU64,
    /// See `steps`.
    pub sequence_steps: AtomicU64,
    /// The KV budget and what is reserved of it.
    pub kv: KvBudget,
    /// Prompt caches for reuse.
    pub prefix: Mutex<PrefixCache>,
}

impl Shared {
    /// A job leaves the queue: to run, or (`gone`) for good.
    fn dequeue(&self, gone: bool) {
        self.queued.fetch_sub(1, Ordering::Relaxed);
        if gone {
            self.held.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Bytes of keys and values the sequences may hold together.
pub struct KvBudget {
    total: usize,
    reserved: Mutex<usize>,
}

impl KvBudget {
    /// A budget of `total` bytes.
    pub fn new(total: usize) -> Self {
        Self {
            total,
            reserved: Mutex::new(0),
        }
    }

    /// Bytes reserved now.
    pub fn reserved(&self) -> usize {
        self.reserved.lock().map_or(0, |r| *r)
    }

    /// Reserves `bytes` if they fit.
    fn try_reserve(&self, bytes: usize) -> bool {
        let Ok(mut reserved) = self.reserved.lock() else {
            return false;
        };
        if *reserved + bytes > self.total {
            return false;
        }
        *reserved += bytes;
        true
    }

    fn release(&self, bytes: usize) {
        if let Ok(mut reserved) = self.reserved.lock() {
            *reserved = reserved.saturating_sub(bytes);
        }
    }
}

/// A running sequence and the KV bytes it reserved.
struct Running {
    seq: Sequence,
    reserved: usize,
    /// Finished, failed or abandoned: leaves the batch after this step.
    over: bool,
}

/// A worker: takes jobs, runs steps, until the backend is dropped and no sequence is left.
pub fn worker(engine: &Engine, jobs: &Mutex<Receiver<Job>>, shared: &Shared, limits: BatchLimits) {
    let mut running: Vec<Running> = Vec::new();
    // Taken from the queue but waiting for KV space.
    let mut waiting: VecDeque<Job> = VecDeque::new();
    let mut open = true;
    loop {
        if open {
            open = take_jobs(jobs, &mut waiting, running.len(), limits.max_batch);
        }
        admit(engine, shared, &mut waiting, &mut running);
        if running.is_empty() {
            if !open && waiting.is_empty() {
                return;
            }
            if !waiting.is_empty() {
                // Waiting for KV space that another worker holds.
                std::thread::sleep(Duration::from_millis(5));
            }
            continue;
        }
        // A panic in the model or sampling code fails the requests running, not the worker:
        // without the catch one bad request would take the worker away for the life of the
        // process.
        let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            step(engine, shared, &mut running, limits.prefill_chunk)
        }));
        if let Err(panic) = stepped {
            let what = crate::backends::panic_message(&*panic);
            tracing::error!("the model panicked while generating: {what}");
            fail(running.iter_mut(), &format!("the model panicked: {what}"));
        }
        running.retain(|r| {
            if r.over {
                shared.kv.release(r.reserved);
                shared.held.fetch_sub(1, Ordering::Relaxed);
            }
            !r.over
        });
        shared.active.store(running.len(), Ordering::Relaxed);
    }
}

/// Moves jobs from the queue into `waiting` while the batch has room: blocking when nothing at
/// all is running or waiting, without blocking otherwise. False once the backend is dropped.
fn take_jobs(
    jobs: &Mutex<Receiver<Job>>,
    waiting: &mut VecDeque<Job>,
    running: usize,
    max_batch: usize,
) -> bool {
    let idle = running == 0 && waiting.is_empty();
    // A worker with sequences to run never waits for the lock: an idle worker may hold it,
    // blocked until the next job arrives.
    let queue = if idle {
        match jobs.lock() {
            Ok(q) => q,
            Err(_) => return false,
        }
    } else {
        match jobs.try_lock() {
            Ok(q) => q,
            Err(std::sync::TryLockError::WouldBlock) => return true,
            Err(std::sync::TryLockError::Poisoned(_)) => return false,
        }
    };
    if idle {
        match queue.recv() {
            Ok(job) => waiting.push_back(job),
            Err(_) => return false,
        }
    }
    while running + waiting.len() < max_batch {
        match queue.try_recv() {
            Ok(job) => waiting.push_back(job),
            Err(TryRecvError::Empty) => break,
            Err(TryRecvError::Disconnected) => return false,
        }
    }
    true
}

/// Starts waiting jobs, oldest first, while their KV reservation fits; drops those whose
/// requester stopped waiting and fails those past their queue deadline.
fn admit(
    engine: &Engine,
    shared: &Shared,
    waiting: &mut VecDeque<Job>,
    running: &mut Vec<Running>,
) {
    let model = engine.model();
    while let Some(mut job) = waiting.pop_front() {
        let waited = job.enqueued.elapsed();
        if waited > job.queue_timeout {
            shared.dequeue(true);
            let _ = job.events.send(Event::Failed(BackendError::Busy {
                detail: format!(
                    "waited {:.1}s for the model (queue_timeout_s = {:.1})",
                    waited.as_secs_f64(),
                    job.queue_timeout.as_secs_f64()
                ),
            }));
            continue;
        }
        if job.events.is_closed() {
            // The requester gave up (queue deadline, disconnect).
            shared.dequeue(true);
            continue;
        }
        let need = model.kv_bytes(job.prompt.len() + job.max_tokens);
        if need > shared.kv.total {
            shared.dequeue(true);
            let _ = job.events.send(Event::Failed(BackendError::Busy {
                detail: format!(
                    "the request needs {:.1} MB of keys and values, more than kv_cache_mb ({:.1} MB)",
                    mb(need),
                    mb(shared.kv.total)
                ),
            }));
            continue;
        }
        if !shared.kv.try_reserve(need) {
            // Oldest first: later jobs wait behind it rather than overtake it.
            waiting.push_front(job);
            return;
        }
        let taken = job.started.take().is_some_and(|s| s.send(()).is_ok());
        shared.dequeue(!taken);
        if !taken {
            shared.kv.release(need);
            continue;
        }
        let reused = shared
            .prefix
            .lock()
            .ok()
            .and_then(|mut p| p.lookup(model, &job.prompt));
        running.push(Running {
            seq: engine.start(job, reused),
            reserved: need,
            over: false,
        });
    }
}

fn mb(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// One forward pass over every running sequence, then each one's next token. A sequence that
/// ends, fails, or whose client left is marked `over`.
fn step(engine: &Engine, shared: &Shared, running: &mut [Running], prefill_chunk: usize) {
    // What each sequence runs this step: (index, first prompt token, prompt tokens); a
    // decoding sequence runs its drawn token.
    let mut budget = prefill_chunk.max(1);
    let mut plan: Vec<(usize, usize, usize)> = Vec::with_capacity(running.len());
    for (i, r) in running.iter_mut().enumerate() {
        if r.seq.job.events.is_closed() {
            r.over = true;
            continue;
        }
        let left = r.seq.prompt_left();
        if left == 0 {
            plan.push((i, 0, 0));
        } else if budget > 0 {
            let n = left.min(budget);
            plan.push((i, r.seq.in_cache, n));
            budget -= n;
        }
    }
    if plan.is_empty() {
        return;
    }
    shared.steps.fetch_add(1, Ordering::Relaxed);
    shared
        .sequence_steps
        .fetch_add(plan.len() as u64, Ordering::Relaxed);
    let outcome = {
        let mut batch = Vec::with_capacity(plan.len());
        let mut todo = plan.iter().peekable();
        for (i, r) in running.iter_mut().enumerate() {
            let Some(&&(at, from, n)) = todo.peek() else {
                break;
            };
            if at != i {
                continue;
            }
            todo.next();
            let seq = &mut r.seq;
            if n == 0 {
                batch.push((seq.next.as_slice(), &mut seq.cache, true));
            } else {
                // Logits only for the chunk that ends the prompt.
                let last = from + n == seq.job.prompt.len();
                batch.push((&seq.job.prompt[from..from + n], &mut seq.cache, last));
            }
        }
        engine.model().forward_batch(&mut batch)
    };
    let failure = match outcome {
        Ok(all) => {
            for (&(i, from, n), logits) in plan.iter().zip(all) {
                let r = &mut running[i];
                if n > 0 {
                    r.seq.in_cache = from + n;
                    if r.seq.prompt_left() > 0 {
                        continue;
                    }
                    if let Ok(mut prefix) = shared.prefix.lock() {
                        prefix.insert(engine.model(), &r.seq.job.prompt, &r.seq.cache);
                    }
                }
                let Some(logits) = logits else {
                    r.over = true;
                    continue;
                };
                if engine.accept(&mut r.seq, &logits) != Progress::Running {
                    r.over = true;
                }
            }
            return;
        }
        Err(e) => e.to_string(),
    };
    // The step failed for every sequence in it.
    let planned: Vec<usize> = plan.iter().map(|&(i, _, _)| i).collect();
    fail(
        running
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| planned.contains(i))
            .map(|(_, r)| r),
        &failure,
    );
}

/// Tells each sequence's client that generation failed, and ends the sequence.
fn fail<'a>(sequences: impl Iterator<Item = &'a mut Running>, detail: &str) {
    for r in sequences {
        let _ = r.seq.job.events.send(Event::Failed(BackendError::Internal {
            detail: detail.to_owned(),
        }));
        r.over = true;
    }
}

/// The shared state for a backend whose sequences may hold `kv_bytes` of keys and values and
/// whose prefix cache `prefix_bytes`.
pub fn shared(kv_bytes: usize, prefix_bytes: usize) -> Arc<Shared> {
    Arc::new(Shared {
        queued: AtomicUsize::new(0),
        held: AtomicUsize::new(0),
        active: AtomicUsize::new(0),
        steps: AtomicU64::new(0),
        sequence_steps: AtomicU64::new(0),
        kv: KvBudget::new(kv_bytes),
        prefix: Mutex::new(PrefixCache::new(prefix_bytes)),
    })
}
