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

/// Draws tokens from logits.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    /// A sampler; unseeded requests draw their seed from the OS.
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_rng(&mut rand::rng()),
        };
        Self { params, rng }
    }

    /// The next token.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature <= 0.0 || self.params.top_k == 1 {
            return super::gemma3::argmax(logits);
        }
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l))
            .collect();
        if candidates.is_empty() {
            return 0;
        }
        let k = self.params.top_k;
        if k > 0 && k < candidates.len() {
            candidates.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
            candidates.truncate(k);
        }
        candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        let t = self.params.temperature;
        let max = candidates[0].1;
        let mut probs: Vec<f32> = candidates
            .iter()
            .map(|(_, l)| ((l - max) / t).exp())
            .collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.params.top_p < 1.0 {
            let mut mass = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                mass += p;
                if mass >= self.params.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut draw = self.rng.random::<f32>() * total;
        for (i, p) in probs.iter().enumerate() {
            draw -= p;
            if draw <= 0.0 {
                return candidates[i].0;
            }
        }
        candidates[probs.len() - 1].0
    }
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
        let max = logits
            .iter()
            .copied()
            .filter(|l| l.is_finite())
            .fold(f32::NEG_INFINITY, f32::max);
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
    let x = if x >= -87.0 { x.min(0.0) } else { -87.0 };
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
