//! Confidence signals of one generated answer, read from its tokens' log-probabilities.
//!
//! A router decides from the prompt alone; these describe what the local model actually did.
//! Each is cheap (one pass over at most a few thousand floats) and needs nothing but the sampled
//! tokens' ln P, which the embedded model computes in-process and OpenAI-compatible servers
//! return in `logprobs`.

use serde::{Deserialize, Serialize};

/// Tokens averaged for [`Signals::first_mean`]: an answer's opening commits to its direction.
pub const FIRST_TOKENS: usize = 8;

/// What the guard knows about one local answer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Signals {
    /// Tokens with a log-probability.
    pub tokens: usize,
    /// Mean ln P over the tokens (ln of the geometric-mean token probability).
    pub mean: f64,
    /// The least likely token's ln P.
    pub min: f64,
    /// Mean ln P of the least likely tenth of the tokens (at least one token): a few unsure
    /// tokens in a long, fluent answer are where answers go wrong.
    pub low_decile: f64,
    /// Mean ln P of the first [`FIRST_TOKENS`] tokens.
    pub first_mean: f64,
    /// The answer stopped at `max_tokens` (`finish_reason = "length"`).
    pub truncated: bool,
}

/// Floor for a token's ln P: `-inf` (a token outside the truncated candidate set of an upstream)
/// and absurd values are clamped so means stay finite. ln(1e-9).
const LOGPROB_FLOOR: f64 = -20.723;

impl Signals {
    /// The signals of an answer; `None` when no token carries a log-probability (the backend
    /// returned none: the guard's `no_signal`).
    pub fn from_logprobs(logprobs: &[f32], finish_reason: Option<&str>) -> Option<Self> {
        if logprobs.is_empty() {
            return None;
        }
        let mut sorted: Vec<f64> = logprobs
            .iter()
            .map(|&l| {
                let l = f64::from(l);
                if l.is_nan() {
                    LOGPROB_FLOOR
                } else {
                    l.clamp(LOGPROB_FLOOR, 0.0)
                }
            })
            .collect();
        let n = sorted.len();
        let mean = sorted.iter().sum::<f64>() / n as f64;
        let first = n.min(FIRST_TOKENS);
        let first_mean = sorted[..first].iter().sum::<f64>() / first as f64;
        let tenth = n.div_ceil(10);
        let (low, pivot, _) = sorted.select_nth_unstable_by(tenth - 1, f64::total_cmp);
        let low_decile = (low.iter().sum::<f64>() + *pivot) / tenth as f64;
        let min = low.iter().copied().fold(*pivot, f64::min);
        Some(Self {
            tokens: n,
            mean,
            min,
            low_decile,
            first_mean,
            truncated: finish_reason == Some("length"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_signals() {
        let lp = [
            -0.1f32, -0.2, -3.0, -0.1, -0.1, -0.1, -0.1, -0.1, -0.1, -0.1, -0.5, -0.2,
        ];
        let s = Signals::from_logprobs(&lp, Some("stop")).unwrap();
        assert_eq!(s.tokens, 12);
        let sum: f64 = lp.iter().map(|&l| f64::from(l)).sum();
        assert!((s.mean - sum / 12.0).abs() < 1e-9);
        assert!((s.min + 3.0).abs() < 1e-6);
        // 12 tokens: the lowest ceil(1.2) = 2, -3.0 and -0.5.
        assert!((s.low_decile + 1.75).abs() < 1e-6, "{}", s.low_decile);
        let first: f64 = lp[..8].iter().map(|&l| f64::from(l)).sum::<f64>() / 8.0;
        assert!((s.first_mean - first).abs() < 1e-9);
        assert!(!s.truncated);
        let one = Signals::from_logprobs(&[f32::NEG_INFINITY], Some("length")).unwrap();
        assert_eq!(one.min, LOGPROB_FLOOR);
        assert_eq!(one.low_decile, LOGPROB_FLOOR);
        assert!(one.truncated);
        assert!(Signals::from_logprobs(&[], None).is_none());
        assert!(Signals::from_logprobs(&[f32::NAN], None)
            .unwrap()
            .mean
            .is_finite());
    }
}
