//! Prefix reuse: the keys and values of prompts already computed, kept so that a later prompt
//! that starts the same way (a shared system prompt, the history of a multi-turn conversation,
//! a retry) resumes from them instead of recomputing them.
//!
//! An entry is the cache of one whole prompt, snapshotted when its prefill ends. A lookup takes
//! the entry sharing the longest run of leading tokens with the new prompt and cuts it back to
//! that length ([`Model::truncated`]), so one entry serves every prompt that shares any prefix
//! of it, not only those that extend it. At least one prompt token is always left to run: the
//! step that runs it gives the logits the first answer token is drawn from.
//!
//! The cache is bounded in bytes (`prefix_cache_mb`); the least recently used entries go first.
//! A snapshot shares its tensors with the sequence it came from until that sequence's next step
//! writes new ones, so keeping it costs no copy.

use super::engine::{Model, SequenceCache};

/// Shared prefixes shorter than this are recomputed: a lookup and a cut cost more than a few
/// tokens of prefill.
const MIN_REUSE: usize = 8;

struct Entry {
    tokens: Vec<u32>,
    cache: SequenceCache,
    bytes: usize,
    used: u64,
}

/// Counters of the cache's use, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Prompts that resumed from a cached prefix.
    pub hits: u64,
    /// Prompts that found none.
    pub misses: u64,
    /// Prompt tokens taken from the cache instead of computed.
    pub reused_tokens: u64,
    /// Bytes of keys and values the entries hold.
    pub bytes: usize,
}

/// A bounded set of prompt caches.
pub struct PrefixCache {
    entries: Vec<Entry>,
    budget: usize,
    clock: u64,
    stats: PrefixStats,
}

impl PrefixCache {
    /// An empty cache holding at most `budget` bytes (0 turns reuse off).
    pub fn new(budget: usize) -> Self {
        Self {
            entries: Vec::new(),
            budget,
            clock: 0,
            stats: PrefixStats::default(),
        }
    }

    /// The cache state after the longest cached prefix of `prompt`, or `None`. Never the whole
    /// prompt: its last token is left to run.
    pub fn lookup(&mut self, model: &Model, prompt: &[u32]) -> Option<SequenceCache> {
        let limit = prompt.len().saturating_sub(1);
        let mut best: Option<(usize, usize)> = None; // (entry, shared tokens)
        for (i, e) in self.entries.iter().enumerate() {
            let shared = e
                .tokens
                .iter()
                .zip(prompt)
                .take_while(|(a, b)| a == b)
                .count()
                .min(limit);
            if shared >= MIN_REUSE && best.is_none_or(|(_, s)| shared > s) {
                best = Some((i, shared));
            }
        }
        self.clock += 1;
        let found = best.and_then(|(i, shared)| {
            let e = &mut self.entries[i];
            e.used = self.clock;
            model.truncated(&e.cache, shared)
        });
        match &found {
            Some(cache) => {
                self.stats.hits += 1;
                self.stats.reused_tokens += cache.position() as u64;
            }
            None => self.stats.misses += 1,
        }
        found
    }

    /// Keeps the cache of a prefilled `prompt`, evicting the least recently used entries to
    /// stay within the budget. A prompt already covered by an entry is not stored twice.
    pub fn insert(&mut self, model: &Model, prompt: &[u32], cache: &SequenceCache) {
        let bytes = model.kv_bytes(prompt.len());
        if bytes > self.budget || prompt.len() < MIN_REUSE || cache.position() != prompt.len() {
            return;
        }
        self.clock += 1;
        if let Some(e) = self
            .entries
            .iter_mut()
            .find(|e| e.tokens.len() >= prompt.len() && e.tokens.starts_with(prompt))
        {
            e.used = self.clock;
            return;
        }
        // An entry this prompt extends is superseded by it.
        self.entries.retain(|e| !prompt.starts_with(&e.tokens));
        self.entries.push(Entry {
            tokens: prompt.to_vec(),
            cache: cache.clone(),
            bytes,
            used: self.clock,
        });
        while self.entries.iter().map(|e| e.bytes).sum::<usize>() > self.budget {
            let Some(oldest) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.used)
                .map(|(i, _)| i)
            else {
                break;
            };
            self.entries.swap_remove(oldest);
        }
    }

    /// Counters and the bytes held now.
    pub fn stats(&self) -> PrefixStats {
        PrefixStats {
            bytes: self.entries.iter().map(|e| e.bytes).sum(),
            ..self.stats
        }
    }
}
