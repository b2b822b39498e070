//! A trained router: the weights of a logistic head over [`features`](super::features), its
//! calibration, and the tables that turn a target (local share or quality loss) into a threshold.
//!
//! On disk a router is a directory: `router.json` (everything but the two big vectors, readable
//! and diffable) and `weights.bin` (IDF then weights, `buckets` little-endian f32 each). Loading
//! checks every length and number, so a truncated or hand-edited file is an error that names the
//! file, never a wrong score.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::evaluation::Report;
use super::features::{self, Query, DENSE, DENSE_NAMES};

/// The on-disk format version this build reads and writes.
pub const FORMAT: u32 = 1;

/// Everything of a router except its two big vectors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouterMeta {
    /// Format version ([`FORMAT`]).
    pub format: u32,
    /// The router's name (its directory name when shipped).
    pub name: String,
    /// What p_local predicts: the label's description (model names or `8b-class`).
    pub label: String,
    /// Hash buckets of the sparse features (a power of two).
    pub buckets: u32,
    /// Whether the head reads the dense structure features.
    pub structure: bool,
    /// Dense feature names, in order; must equal this build's list.
    pub dense_names: Vec<String>,
    /// Training mean of each dense feature.
    pub dense_mean: Vec<f32>,
    /// Training standard deviation of each dense feature.
    pub dense_std: Vec<f32>,
    /// Head weights of the standardised dense features.
    pub dense_weights: Vec<f32>,
    /// Head bias.
    pub bias: f32,
    /// Platt calibration `p = sigmoid(a * z + b)` of the head's logit `z`, fitted on
    /// predictions for sources the head was not trained on.
    pub calibration: Calibration,
    /// `share_thresholds[k]`: the p_local above which `k`% of the training prompts fall, as
    /// scored by heads that did not see them (held-out source or fold).
    pub share_thresholds: Vec<f64>,
    /// Validation curve from held-out-source predictions, by increasing local share.
    pub curve: Vec<CurvePoint>,
    /// Leave-one-source-out metrics, one per held-out source.
    pub validation: Vec<SourceReport>,
    /// The same held-out predictions pooled over every held-out source: how well the router
    /// ranks a mixture of kinds it was not trained on, source levels included (what mixed
    /// traffic needs). Absent in routers trained before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pooled: Option<Report>,
    /// How the settings were chosen (nested validation: the candidates, what each outer fold
    /// chose on its inner folds, what the shipped head uses). Absent in routers trained before
    /// validation was nested; their `validation` then selected on what it reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selection: Option<super::train::Selection>,
    /// Training rows by source.
    pub trained_on: Vec<SourceCount>,
}

/// Platt scaling parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// Slope on the logit.
    pub a: f64,
    /// Offset.
    pub b: f64,
}

/// One point of the validation curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    /// Serve locally when p_local >= this.
    pub threshold: f64,
    /// Share of validation queries that would be local.
    pub local_share: f64,
    /// Cloud-only quality minus routed quality (0..1 scale; negative means better).
    pub quality_loss: f64,
}

/// Validation on one held-out source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceReport {
    /// The source held out.
    pub source: String,
    /// The measures there.
    #[serde(flatten)]
    pub report: Report,
}

/// Rows of one source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceCount {
    /// Source name.
    pub source: String,
    /// Rows.
    pub rows: usize,
}

/// A loaded router, ready to score.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterModel {
    /// Metadata and small parameters.
    pub meta: RouterMeta,
    /// Inverse document frequency per bucket.
    pub idf: Vec<f32>,
    /// Head weight per bucket.
    pub weights: Vec<f32>,
    /// Where it was loaded from (for messages).
    pub path: PathBuf,
}

impl RouterModel {
    /// The head's logit for already-extracted features.
    pub fn logit(&self, f: &features::Features) -> f64 {
        let mut norm = 0.0f32;
        let mut dot = 0.0f32;
        for &(bucket, v) in &f.sparse {
            let i = bucket as usize;
            let x = v * self.idf[i];
            norm += x * x;
            dot += x * self.weights[i];
        }
        let mut z = f64::from(self.meta.bias);
        if norm > 0.0 {
            z += f64::from(dot / norm.sqrt());
        }
        if self.meta.structure {
            for i in 0..DENSE {
                let x = (f.dense[i] - self.meta.dense_mean[i]) / self.meta.dense_std[i];
                z += f64::from(x * self.meta.dense_weights[i]);
            }
        }
        z
    }

    /// The calibrated probability that the local model answers `query` well.
    pub fn score(&self, query: &Query) -> f64 {
        self.score_features(&features::extract(query, self.meta.buckets))
    }

    /// [`score`](Self::score) for features already extracted with this router's `buckets`,
    /// so several heads over the same request share one extraction.
    pub fn score_features(&self, f: &features::Features) -> f64 {
        let c = self.meta.calibration;
        sigmoid(c.a * self.logit(f) + c.b)
    }

    /// The threshold that keeps `share` (0..1) of traffic like the training prompts local.
    pub fn threshold_for_share(&self, share: f64) -> f64 {
        let t = &self.meta.share_thresholds;
        let x = share.clamp(0.0, 1.0) * (t.len() - 1) as f64;
        let k = (x.floor() as usize).min(t.len() - 2);
        let f = x - k as f64;
        t[k] + (t[k + 1] - t[k]) * f
    }

    /// The lowest validated threshold whose quality loss stays within `max_loss` (0..1 scale),
    /// i.e. the largest local share that keeps quality; 1.0 (nothing local) when none does.
    pub fn threshold_for_quality_loss(&self, max_loss: f64) -> f64 {
        self.meta
            .curve
            .iter()
            .filter(|p| p.quality_loss <= max_loss + 1e-12)
            .max_by(|a, b| a.local_share.total_cmp(&b.local_share))
            .map(|p| p.threshold)
            .unwrap_or(1.0)
    }

    /// Writes `router.json` and `weights.bin` into `dir` (created if missing).
    pub fn save(&self, dir: &Path) -> Result<(), RouterError> {
        std::fs::create_dir_all(dir).map_err(|e| RouterError::io(dir, e))?;
        let meta_path = dir.join("router.json");
        let json = serde_json::to_string_pretty(&self.meta)
            .map_err(|e| RouterError::invalid(&meta_path, e))?;
        std::fs::write(&meta_path, json + "\n").map_err(|e| RouterError::io(&meta_path, e))?;
        let mut bin = Vec::with_capacity(8 * self.idf.len());
        for v in self.idf.iter().chain(&self.weights) {
            bin.extend_from_slice(&v.to_le_bytes());
        }
        let bin_path = dir.join("weights.bin");
        std::fs::write(&bin_path, bin).map_err(|e| RouterError::io(&bin_path, e))
    }

    /// Loads a router directory, checking everything a scorer relies on.
    pub fn load(dir: &Path) -> Result<Self, RouterError> {
        let meta_path = dir.join("router.json");
        let text =
            std::fs::read_to_string(&meta_path).map_err(|e| RouterError::io(&meta_path, e))?;
        let meta: RouterMeta =
            serde_json::from_str(&text).map_err(|e| RouterError::invalid(&meta_path, e))?;
        let bad = |what: String| Err(RouterError::invalid(&meta_path, what));
        if meta.format != FORMAT {
            return bad(format!(
                "format {} is not the {FORMAT} this build reads",
                meta.format
            ));
        }
        if !meta.buckets.is_power_of_two() {
            return bad(format!("buckets {} is not a power of two", meta.buckets));
        }
        if meta.dense_names != DENSE_NAMES {
            return bad(format!(
                "dense features {:?} differ from this build's {DENSE_NAMES:?}",
                meta.dense_names
            ));
        }
        for (name, v) in [
            ("dense_mean", &meta.dense_mean),
            ("dense_std", &meta.dense_std),
            ("dense_weights", &meta.dense_weights),
        ] {
            if v.len() != DENSE || v.iter().any(|x| !x.is_finite()) {
                return bad(format!("{name} must be {DENSE} finite numbers"));
            }
        }
        if meta.dense_std.iter().any(|s| *s <= 0.0) {
            return bad("dense_std must be positive".to_owned());
        }
        let t = &meta.share_thresholds;
        if t.len() < 2 || t.iter().any(|x| !x.is_finite()) || t.windows(2).any(|w| w[0] < w[1]) {
            return bad("share_thresholds must be at least 2 non-increasing numbers".to_owned());
        }
        let c = meta.calibration;
        if !(meta.bias.is_finite() && c.a.is_finite() && c.b.is_finite()) {
            return bad("bias and calibration must be finite".to_owned());
        }
        let bin_path = dir.join("weights.bin");
        let bin = std::fs::read(&bin_path).map_err(|e| RouterError::io(&bin_path, e))?;
        let n = meta.buckets as usize;
        if bin.len() != 8 * n {
            return Err(RouterError::invalid(
                &bin_path,
                format!("{} bytes, expected {} (2 x {n} f32)", bin.len(), 8 * n),
            ));
        }
        let floats: Vec<f32> = bin
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if floats.iter().any(|x| !x.is_finite()) {
            return Err(RouterError::invalid(&bin_path, "a weight is not finite"));
        }
        let (idf, weights) = floats.split_at(n);
        Ok(Self {
            meta,
            idf: idf.to_vec(),
            weights: weights.to_vec(),
            path: dir.to_path_buf(),
        })
    }

    /// Resident bytes of the parameters (for the memory budget).
    pub fn memory_bytes(&self) -> usize {
        4 * (self.idf.len() + self.weights.len())
    }
}

/// Why a router could not be found, read or used. Callers branch on it: a backend with no
/// router is routine (the gateway or `profile` goes on without one), a router that exists but
/// does not load is a broken installation and stops them.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// Neither the path nor the name under the router directory holds a router.
    #[error("no router `{name}`: neither {} nor {} holds a router.json", .direct.display(), .named.display())]
    NotFound {
        /// What was asked for.
        name: String,
        /// The path tried as a directory.
        direct: PathBuf,
        /// The path tried under the router directory.
        named: PathBuf,
    },
    /// A file could not be read or written.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file is there but is not a router this build can use.
    #[error("{}: {detail}", .path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
}

impl RouterError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        RouterError::Io {
            path: path.to_owned(),
            source,
        }
    }

    fn invalid(path: &Path, detail: impl std::fmt::Display) -> Self {
        RouterError::Invalid {
            path: path.to_owned(),
            detail: detail.to_string(),
        }
    }
}

/// [`resolve`] then [`RouterModel::load`].
pub fn load_named(name_or_dir: &str, router_dir: &Path) -> Result<RouterModel, RouterError> {
    RouterModel::load(&resolve(name_or_dir, router_dir)?)
}

/// Finds a router by directory or by name under `router_dir`.
pub fn resolve(name_or_dir: &str, router_dir: &Path) -> Result<PathBuf, RouterError> {
    let direct = Path::new(name_or_dir);
    if direct.join("router.json").is_file() {
        return Ok(direct.to_path_buf());
    }
    let named = router_dir.join(name_or_dir);
    if named.join("router.json").is_file() {
        return Ok(named);
    }
    Err(RouterError::NotFound {
        name: name_or_dir.to_owned(),
        direct: direct.to_path_buf(),
        named,
    })
}

/// The logistic function.
pub fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_router_a_broken_one_and_a_good_one_are_told_apart() {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("router-models");
        assert!(load_named("gemma-3-270m", &shipped).is_ok());
        let missing = load_named("no-such-router", &shipped);
        assert!(
            matches!(missing, Err(RouterError::NotFound { ref name, .. }) if name == "no-such-router"),
            "{missing:?}"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("router.json"), "{\"format\": 1").expect("write");
        let broken = RouterModel::load(dir.path());
        assert!(
            matches!(broken, Err(RouterError::Invalid { .. })),
            "{broken:?}"
        );
        // A good router.json without its weights.
        let good = shipped.join("gemma-3-270m");
        std::fs::copy(good.join("router.json"), dir.path().join("router.json")).expect("copy");
        let no_weights = RouterModel::load(dir.path());
        assert!(
            matches!(no_weights, Err(RouterError::Io { ref path, .. }) if path.ends_with("weights.bin")),
            "{no_weights:?}"
        );
    }
}
