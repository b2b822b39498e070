//! Token selection and stopping: temperature, top-k, top-p and seed; stop strings, max tokens,
//! and end-of-sequence tokens.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sampling parameters of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus mass kept (1.0 keeps all).
    pub top_p: f32,
    /// Keep only the k most likely tokens (0 disables).
    pub top_k: usize,
    /// Fixed seed for reproducible sampling.
    pub seed: Option<u64>,
}

/// Draws tokens from logits in O(vocab) per token, with no sort over the vocabulary: a
/// temperature-only draw is one pass for the maximum, one (vectorised) for the weights and their
/// block sums, and a walk over the blocks to the drawn one; `top_k` selects its k by partial
/// selection (`select_nth_unstable`); `top_p` finds its nucleus by selection on probability
/// mass ([`nucleus`]) among the tokens that can be in it. The distribution is exactly the
/// sort-based definition's (OpenAI's and vLLM's): softmax at the temperature, the k most
/// likely, then the smallest most-likely set with mass >= top_p, renormalised.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Scratch kept across tokens: one weight per vocabulary entry, and candidate (id, weight)
    /// pairs, so that a token allocates nothing.
    weights: Vec<f32>,
    candidates: Vec<(u32, f32)>,
}

/// Weights summed per block: the draw walks the block sums, then one block.
const BLOCK: usize = 1024;

impl Sampler {
    /// A sampler; unseeded requests draw their seed from the OS.
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_rng(&mut rand::rng()),
        };
        Self {
            params,
            rng,
            weights: Vec::new(),
            candidates: Vec::new(),
        }
    }

    /// The next token.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature <= 0.0 || self.params.top_k == 1 {
            return super::gemma3::argmax(logits);
        }
        let max = finite_max(logits);
        if !max.is_finite() {
            return 0;
        }
        let inv_t = 1.0 / self.params.temperature;
        let weight = |l: f32| {
            // Computed for every logit and then selected, without a branch, so the loop over
            // the vocabulary vectorises.
            let w = exp_nonpositive((l - max) * inv_t);
            if l.is_finite() {
                w
            } else {
                0.0
            }
        };
        let k = self.params.top_k;
        if k > 0 && k < logits.len() {
            // The k most likely by logit (the temperature keeps the order), then weights.
            self.candidates.clear();
            self.candidates.extend(
                logits
                    .iter()
                    .enumerate()
                    .filter(|(_, l)| l.is_finite())
                    .map(|(i, &l)| (i as u32, l)),
            );
            if k < self.candidates.len() {
                self.candidates
                    .select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
                self.candidates.truncate(k);
            }
            for c in &mut self.candidates {
                c.1 = weight(c.1);
            }
            if self.params.top_p < 1.0 {
                let total: f64 = self.candidates.iter().map(|c| f64::from(c.1)).sum();
                let keep = nucleus(
                    &mut self.candidates,
                    f64::from(self.params.top_p.max(0.0)) * total,
                );
                self.candidates.truncate(keep);
            }
            return self.draw_candidates();
        }
        // Every token's weight, and the total.
        self.weights.clear();
        self.weights.extend(logits.iter().map(|&l| weight(l)));
        let blocks: Vec<f64> = self
            .weights
            .chunks(BLOCK)
            .map(|b| f64::from(sum_f32(b)))
            .collect();
        let total: f64 = blocks.iter().sum();
        if self.params.top_p >= 1.0 {
            let mut target = self.rng.random::<f64>() * total;
            for (b, &mass) in blocks.iter().enumerate() {
                if target < mass {
                    let end = ((b + 1) * BLOCK).min(self.weights.len());
                    let mut left = target;
                    for (i, &w) in self.weights[b * BLOCK..end].iter().enumerate() {
                        left -= f64::from(w);
                        if left < 0.0 && w > 0.0 {
                            return (b * BLOCK + i) as u32;
                        }
                    }
                }
                target -= mass;
            }
            // Rounding left the target past the end: the last token with any weight.
            return self.weights.iter().rposition(|&w| w > 0.0).unwrap_or(0) as u32;
        }
        // Only tokens of weight >= floor can be in the nucleus: those below it weigh less than
        // (1 - top_p) / 2 of the total together, so the most likely set reaching top_p ends
        // before any of them.
        let finite = logits.iter().filter(|l| l.is_finite()).count().max(1);
        let floor = ((1.0 - f64::from(self.params.top_p)) * total / (2.0 * finite as f64)) as f32;
        self.candidates.clear();
        self.candidates.extend(
            self.weights
                .iter()
                .enumerate()
                .filter(|(_, &w)| w > 0.0 && w >= floor)
                .map(|(i, &w)| (i as u32, w)),
        );
        let keep = nucleus(
            &mut self.candidates,
            f64::from(self.params.top_p.max(0.0)) * total,
        );
        self.candidates.truncate(keep);
        self.draw_candidates()
    }

    /// A draw among the candidates, in proportion to their weights.
    fn draw_candidates(&mut self) -> u32 {
        let total: f64 = self.candidates.iter().map(|c| f64::from(c.1)).sum();
        let mut target = self.rng.random::<f64>() * total;
        for &(id, w) in &self.candidates {
            target -= f64::from(w);
            if target < 0.0 && w > 0.0 {
                return id;
            }
        }
        self.candidates
            .iter()
            .rev()
            .find(|c| c.1 > 0.0)
            .or(self.candidates.first())
            .map_or(0, |c| c.0)
    }
}

/// Reorders `c` so that `c[..n]` is the nucleus, and returns n: the fewest most-weighted
/// candidates whose weights reach `need` (the crossing one included; at least one). Expected
/// O(len): like quickselect, each round partitions around a pivot weight and keeps the side the
/// boundary is in; no order is kept within the nucleus, and a draw needs none.
fn nucleus(c: &mut [(u32, f32)], need: f64) -> usize {
    if c.is_empty() {
        return 0;
    }
    let (mut lo, mut hi, mut need) = (0usize, c.len(), need);
    loop {
        // Invariant: c[..lo] is in the nucleus and outweighs all of c[lo..]; need is what
        // c[lo..hi] must still supply; c[hi..] is outside.
        if hi - lo <= 16 {
            c[lo..hi].sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
            for (i, x) in c[lo..hi].iter().enumerate() {
                need -= f64::from(x.1);
                if need <= 0.0 {
                    return lo + i + 1;
                }
            }
            return hi.max(1);
        }
        let pivot = median_of_three(c[lo].1, c[lo + (hi - lo) / 2].1, c[hi - 1].1);
        // Three-way partition of c[lo..hi]: heavier than the pivot, equal, lighter.
        let (mut gt, mut i, mut lt) = (lo, lo, hi);
        while i < lt {
            if c[i].1 > pivot {
                c.swap(i, gt);
                gt += 1;
                i += 1;
            } else if c[i].1 < pivot {
                lt -= 1;
                c.swap(i, lt);
            } else {
                i += 1;
            }
        }
        let heavier: f64 = c[lo..gt].iter().map(|x| f64::from(x.1)).sum();
        if heavier >= need && gt > lo {
            hi = gt;
            continue;
        }
        need -= heavier;
        lo = gt;
        // The pivot's equals, one at a time (ties at the boundary: any of them).
        while lo < lt {
            need -= f64::from(c[lo].1);
            lo += 1;
            if need <= 0.0 {
                return lo;
            }
        }
        if lo >= hi {
            return hi.max(1);
        }
    }
}

fn median_of_three(a: f32, b: f32, c: f32) -> f32 {
    a.max(b).min(a.min(b).max(c))
}

/// The largest finite logit (NEG_INFINITY when none is), in eight lanes (vectorisable).
fn finite_max(logits: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let mut lanes = logits.chunks_exact(8);
    for lane in &mut lanes {
        for (a, &l) in acc.iter_mut().zip(lane) {
            *a = if l.is_finite() { a.max(l) } else { *a };
        }
    }
    let rest = lanes.remainder().iter().copied().filter(|l| l.is_finite());
    acc.into_iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, f32::max)
}

/// A sum of f32s in eight lanes (vectorisable), for one block of weights.
fn sum_f32(block: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut lanes = block.chunks_exact(8);
    for lane in &mut lanes {
        for (a, &w) in acc.iter_mut().zip(lane) {
            *a += w;
        }
    }
    acc.iter().sum::<f32>() + lanes.remainder().iter().sum::<f32>()
}

/// A sampled token's log-probability, and the most likely alternatives when asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// ln P(token) under the distribution the sampler drew from.
    pub logprob: f32,
    /// The `n` most likely tokens and their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

impl Sampler {
    /// The temperature whose distribution log-probabilities describe: the sampling temperature,
    /// or 1 for greedy decoding (the model's own distribution, as OpenAI reports it at
    /// temperature 0). Top-k and top-p truncation are not applied, as in OpenAI's and vLLM's
    /// `logprobs`: they describe the model's distribution, not the candidate set.
    fn logprob_temperature(&self) -> f32 {
        if self.params.temperature > 0.0 {
            self.params.temperature
        } else {
            1.0
        }
    }

    /// ln P(`token`) and the `top_n` most likely tokens, from `logits` scaled by the sampling
    /// temperature. One pass for the maximum, one vectorisable pass for the normaliser, and a
    /// third (only when `top_n` > 0) that keeps the best `top_n` in a small sorted array: no
    /// allocation or sort over the vocabulary.
    pub fn logprob(&self, logits: &[f32], token: u32, top_n: usize) -> TokenLogprob {
        let inv_t = 1.0 / self.logprob_temperature();
        let max = finite_max(logits);
        if !max.is_finite() {
            return TokenLogprob {
                logprob: f32::NEG_INFINITY,
                top: Vec::new(),
            };
        }
        let log_z = log_sum_exp(logits, max, inv_t);
        let at = |l: f32| {
            if l.is_finite() {
                (l - max) * inv_t - log_z
            } else {
                f32::NEG_INFINITY
            }
        };
        let logprob = logits
            .get(token as usize)
            .copied()
            .map_or(f32::NEG_INFINITY, at);
        let top = top_n_of(logits, top_n)
            .into_iter()
            .map(|(id, l)| (id, at(l)))
            .collect();
        TokenLogprob { logprob, top }
    }
}

/// ln sum exp((l - max) * inv_t) over the finite logits, in f32 with an f64 final sum.
fn log_sum_exp(logits: &[f32], max: f32, inv_t: f32) -> f32 {
    let mut total = 0f64;
    for block in logits.chunks(1024) {
        let mut acc = [0f32; 8];
        let mut lanes = block.chunks_exact(8);
        for lane in &mut lanes {
            for (a, &l) in acc.iter_mut().zip(lane) {
                *a += exp_nonpositive((l - max) * inv_t);
            }
        }
        let tail: f32 = lanes
            .remainder()
            .iter()
            .map(|&l| exp_nonpositive((l - max) * inv_t))
            .sum();
        total += f64::from(acc.iter().sum::<f32>() + tail);
    }
    total.ln() as f32
}

/// e^x for x <= 0 (NaN and -inf give 0), written so the compiler vectorises it: 2^x split into
/// the nearest integer power, set in the exponent bits, and a degree-6 Taylor polynomial for
/// the fraction in [-0.5, 0.5) (relative error under 1e-6 near 0 and a few 1e-6 near -87, from
/// rounding x log2 e in f32: far under a logprob's printed precision).
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    // Below -87, e^x is under f32's normal range: 0 for a probability mass.
    // Branch-free, so that a loop over the vocabulary vectorises. Not `clamp`: NaN must
    // become -87 (weight 0), and `clamp` keeps NaN.
    #[allow(clippy::manual_clamp)]
    let x = x.max(-87.0).min(0.0);
    let t = x * std::f32::consts::LOG2_E;
    let k = (t + 0.5).floor();
    let f = t - k;
    // Taylor series of 2^f = e^(f ln 2) on [-0.5, 0.5).
    let p = 1.0
        + f * (std::f32::consts::LN_2
            + f * (0.240_226_5
                + f * (0.055_504_11
                    + f * (0.009_618_129 + f * (0.001_333_355_8 + f * 0.000_154_035_3)))));
    let scale = f32::from_bits((((k as i32) + 127) as u32) << 23);
    let out = p * scale;
    if x <= -87.0 {
        0.0
    } else {
        out
    }
}

/// The `n` largest finite logits with their ids, largest first (ties: lower id first).
fn top_n_of(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    if n == 0 {
        return best;
    }
    for (i, &l) in logits.iter().enumerate() {
        if !l.is_finite() || (best.len() == n && l <= best[n - 1].1) {
            continue;
        }
        let at = best.partition_point(|&(_, b)| b >= l);
        best.insert(at, (i as u32, l));
        best.truncate(n);
    }
    best
}

/// Why generation ended, in OpenAI's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl FinishReason {
    /// OpenAI's `finish_reason` value.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Turns generated token text into client text: holds back what could still become a stop
/// string, and cuts at the first stop string.
pub struct StopFilter {
    stops: Vec<String>,
    pending: String,
}

impl StopFilter {
    /// A filter for these stop strings (empty ones are ignored).
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    /// Feeds new text; returns what can be released now, and whether a stop string was hit.
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.pending.push_str(text);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let out = self.pending[..at].to_owned();
            self.pending.clear();
            return (out, true);
        }
        // Hold back the longest suffix that is a prefix of some stop string.
        let hold = self
            .stops
            .iter()
            .map(|s| {
                (1..s.len().min(self.pending.len()) + 1)
                    .rev()
                    .find(|&n| {
                        self.pending.is_char_boundary(self.pending.len() - n)
                            && s.is_char_boundary(n)
                            && self.pending.ends_with(&s[..n])
                    })
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_owned();
        self.pending.drain(..cut);
        (out, false)
    }

    /// Releases whatever was held back (generation ended without a stop string).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_seeded_sampling() {
        let logits = vec![0.1, 3.0, 2.9, -1.0];
        let greedy = SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
        };
        assert_eq!(Sampler::new(greedy).sample(&logits), 1);
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: Some(7),
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(p.clone());
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(p);
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b, "same seed, same draws");
        assert!(
            a.contains(&1) && a.contains(&2),
            "both likely tokens drawn: {a:?}"
        );
        let top1 = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 1,
            seed: Some(1),
        };
        assert_eq!(Sampler::new(top1).sample(&logits), 1);
        let nucleus = SamplingParams {
            temperature: 1.0,
            top_p: 0.1,
            top_k: 0,
            seed: Some(3),
        };
        let mut s = Sampler::new(nucleus);
        assert!(
            (0..50).all(|_| s.sample(&logits) == 1),
            "top_p 0.1 keeps only the best token"
        );
    }

    /// The sort-based definition the sampler must equal: softmax at the temperature over the
    /// finite logits, the k most likely, the smallest most-likely prefix with mass >= top_p,
    /// renormalised (in f64).
    fn reference(logits: &[f32], p: &SamplingParams) -> Vec<f64> {
        let mut order: Vec<usize> = (0..logits.len())
            .filter(|&i| logits[i].is_finite())
            .collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        if p.top_k > 0 {
            order.truncate(p.top_k);
        }
        let max = f64::from(logits[order[0]]);
        let t = f64::from(p.temperature);
        let w: Vec<f64> = order
            .iter()
            .map(|&i| ((f64::from(logits[i]) - max) / t).exp())
            .collect();
        let z: f64 = w.iter().sum();
        let mut keep = w.len();
        if p.top_p < 1.0 {
            let mut mass = 0.0;
            for (j, x) in w.iter().enumerate() {
                mass += x / z;
                if mass >= f64::from(p.top_p) {
                    keep = j + 1;
                    break;
                }
            }
        }
        let kept: f64 = w[..keep].iter().sum();
        let mut out = vec![0.0; logits.len()];
        for j in 0..keep {
            out[order[j]] = w[j] / kept;
        }
        out
    }

    /// Pearson's chi-square of `counts` against `expected` probabilities over `bins` (groups of
    /// token ids), and its critical value at p = 1e-4 (Wilson-Hilferty). Tokens of probability
    /// 0 must never be drawn.
    fn chi_square(counts: &[u64], expected: &[f64], bins: &[Vec<usize>]) -> (f64, f64) {
        let n: u64 = counts.iter().sum();
        for (i, (&c, &e)) in counts.iter().zip(expected).enumerate() {
            assert!(
                e > 0.0 || c == 0,
                "token {i} drawn {c} times at probability 0"
            );
        }
        let mut stat = 0.0;
        for bin in bins {
            let o: u64 = bin.iter().map(|&i| counts[i]).sum();
            let e: f64 = bin.iter().map(|&i| expected[i]).sum::<f64>() * n as f64;
            stat += (o as f64 - e).powi(2) / e;
        }
        let dof = (bins.len() - 1) as f64;
        let z = 3.719; // the 1 - 1e-4 quantile of the standard normal
        let a = 2.0 / (9.0 * dof);
        (stat, dof * (1.0 - a + z * a.sqrt()).powi(3))
    }

    /// Bins of at least 5 expected draws: tokens by descending probability, single while they
    /// are likely enough, then grouped.
    fn bins(expected: &[f64], n: u64) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..expected.len()).filter(|&i| expected[i] > 0.0).collect();
        order.sort_by(|&a, &b| expected[b].total_cmp(&expected[a]));
        let mut out: Vec<Vec<usize>> = Vec::new();
        let mut current = Vec::new();
        let mut mass = 0.0;
        for i in order {
            current.push(i);
            mass += expected[i] * n as f64;
            if mass >= 20.0 {
                out.push(std::mem::take(&mut current));
                mass = 0.0;
            }
        }
        match out.last_mut() {
            Some(last) => last.extend(current),
            None => out.push(current),
        }
        out
    }

    #[test]
    fn draws_follow_the_sort_based_distribution_for_every_truncation() {
        // 64 tokens with distinct logits spread over 0..7, one of them -inf.
        let mut logits: Vec<f32> = (0..64).map(|i| ((i * 37) % 64) as f32 / 9.0).collect();
        logits[5] = f32::NEG_INFINITY;
        let cases = [
            (1.0, 0, 1.0),
            (0.7, 10, 1.0),
            (1.0, 0, 0.9),
            (1.3, 20, 0.8),
            (0.5, 0, 0.5),
            (2.0, 0, 0.97),
        ];
        for (temperature, top_k, top_p) in cases {
            let params = SamplingParams {
                temperature,
                top_p,
                top_k,
                seed: Some(11),
            };
            let expected = reference(&logits, &params);
            let n = 30_000u64;
            let mut sampler = Sampler::new(params.clone());
            let mut counts = vec![0u64; logits.len()];
            for _ in 0..n {
                counts[sampler.sample(&logits) as usize] += 1;
            }
            let (stat, critical) = chi_square(&counts, &expected, &bins(&expected, n));
            assert!(
                stat < critical,
                "{params:?}: chi-square {stat:.1} over {critical:.1}"
            );
        }
    }

    #[test]
    fn a_larger_vocabulary_nucleus_is_exact() {
        // 2,048 distinct logits (a permutation of a grid over 0..12): the nucleus floor drops
        // most of them before selection, and must not drop any the nucleus holds.
        let v = 2048usize;
        let logits: Vec<f32> = (0..v)
            .map(|i| ((i * 7919) % v) as f32 * 12.0 / v as f32)
            .collect();
        for top_p in [0.9f32, 0.99] {
            let params = SamplingParams {
                temperature: 1.0,
                top_p,
                top_k: 0,
                seed: Some(5),
            };
            let expected = reference(&logits, &params);
            let n = 10_000u64;
            let mut sampler = Sampler::new(params.clone());
            let mut counts = vec![0u64; v];
            for _ in 0..n {
                counts[sampler.sample(&logits) as usize] += 1;
            }
            let (stat, critical) = chi_square(&counts, &expected, &bins(&expected, n));
            assert!(
                stat < critical,
                "top_p {top_p}: {stat:.1} over {critical:.1}"
            );
        }
    }

    #[test]
    fn the_nucleus_is_the_fewest_heaviest_reaching_the_mass() {
        let weights = [5.0f32, 1.0, 3.0, 3.0, 0.5, 8.0, 2.0];
        for need in [0.0f64, 4.0, 8.0, 8.5, 13.0, 16.0, 21.0, 22.5, 100.0] {
            let mut c: Vec<(u32, f32)> = weights
                .iter()
                .enumerate()
                .map(|(i, &w)| (i as u32, w))
                .collect();
            // Pad past the small-slice cut so the partition rounds run too.
            c.extend((0..40).map(|i| (100 + i, 0.01)));
            let n = nucleus(&mut c, need);
            let mut sorted: Vec<f32> = c.iter().map(|x| x.1).collect();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let mut mass = 0.0f64;
            let want = sorted
                .iter()
                .position(|&w| {
                    mass += f64::from(w);
                    mass >= need
                })
                .map_or(c.len(), |p| p + 1);
            assert_eq!(n, want, "need {need}");
            let kept: f64 = c[..n].iter().map(|x| f64::from(x.1)).sum();
            let best: f64 = sorted[..n].iter().map(|&w| f64::from(w)).sum();
            assert!((kept - best).abs() < 1e-9, "need {need}: the heaviest kept");
        }
    }

    #[test]
    fn logprobs_are_the_sampling_distribution() {
        let logits = vec![0.1f32, 3.0, 2.9, -1.0, f32::NEG_INFINITY];
        let reference = |t: f32| -> Vec<f64> {
            let z: f64 = logits
                .iter()
                .filter(|l| l.is_finite())
                .map(|&l| (f64::from(l) / f64::from(t)).exp())
                .sum();
            logits
                .iter()
                .map(|&l| f64::from(l) / f64::from(t) - z.ln())
                .collect()
        };
        for (temperature, t) in [(0.0, 1.0), (0.7, 0.7), (1.5, 1.5)] {
            let s = Sampler::new(SamplingParams {
                temperature,
                top_p: 1.0,
                top_k: 0,
                seed: Some(1),
            });
            let want = reference(t);
            let got = s.logprob(&logits, 2, 3);
            assert!(
                (f64::from(got.logprob) - want[2]).abs() < 1e-5,
                "{got:?} vs {want:?}"
            );
            let ids: Vec<u32> = got.top.iter().map(|&(i, _)| i).collect();
            assert_eq!(ids, vec![1, 2, 0]);
            for (id, lp) in got.top {
                assert!((f64::from(lp) - want[id as usize]).abs() < 1e-5);
            }
            assert_eq!(s.logprob(&logits, 4, 0).logprob, f32::NEG_INFINITY);
        }
        // Greedy: the sampled token is the top-1 and their logprobs are the same number.
        let greedy = Sampler::new(SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
        });
        let big: Vec<f32> = (0..262_144)
            .map(|i| ((i * 7919) % 1000) as f32 / 97.0)
            .collect();
        let token = crate::backends::candle::gemma3::argmax(&big);
        let lp = greedy.logprob(&big, token, 5);
        assert_eq!(lp.top[0], (token, lp.logprob));
        let mass: f64 = big
            .iter()
            .map(|&l| (f64::from(l) - f64::from(big[token as usize]) + f64::from(lp.logprob)).exp())
            .sum();
        assert!((mass - 1.0).abs() < 1e-4, "probabilities sum to {mass}");
    }

    #[test]
    fn fast_exp_matches_the_library() {
        for i in 0..10_000 {
            let x = -(i as f32) * 0.0087;
            let (a, b) = (exp_nonpositive(x), x.exp());
            // f32 range reduction (x log2 e) costs a few 1e-6 relative at large |x|.
            assert!(
                (a - b).abs() <= 4e-6 * b.max(f32::MIN_POSITIVE),
                "{x}: {a} vs {b}"
            );
        }
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpositive(f32::NAN), 0.0);
        assert_eq!(exp_nonpositive(-100.0), 0.0);
        assert!((exp_nonpositive(0.0) - 1.0).abs() < 1e-7);
    }

    #[test]
    fn stop_strings_cut_and_hold_back() {
        let mut f = StopFilter::new(vec!["END".into(), "\n\n".into()]);
        assert_eq!(
            f.push("Hello E"),
            ("Hello ".into(), false),
            "held back a possible stop prefix"
        );
        assert_eq!(f.push("xtra"), ("Extra".into(), false));
        assert_eq!(f.push(" done EN"), (" done ".into(), false));
        assert_eq!(f.push("D and more"), ("".into(), true));
        let mut f = StopFilter::new(vec!["\n\n".into()]);
        assert_eq!(f.push("a\n"), ("a".into(), false));
        assert_eq!(f.finish(), "\n");
        let mut f = StopFilter::new(vec![]);
        assert_eq!(f.push("é"), ("é".into(), false));
    }
}
