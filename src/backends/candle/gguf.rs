//! Typed access to GGUF metadata, with errors that name the key.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};

/// A metadata problem, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened or parsed as GGUF.
    #[error("{path}: not a readable GGUF file: {detail}")]
    Unreadable {
        /// The file.
        path: String,
        /// Why.
        detail: String,
    },
    /// A required key is absent.
    #[error("GGUF metadata has no `{0}`")]
    Missing(String),
    /// A key holds the wrong type.
    #[error("GGUF metadata `{key}`: {detail}")]
    Invalid {
        /// The key.
        key: String,
        /// What is wrong.
        detail: String,
    },
}

/// Reads the header (metadata and tensor index, not tensor data) of a GGUF file.
pub fn read_header(path: &Path) -> Result<Content, GgufError> {
    let unreadable = |detail: String| GgufError::Unreadable {
        path: path.display().to_string(),
        detail,
    };
    let mut file = std::fs::File::open(path).map_err(|e| unreadable(e.to_string()))?;
    Content::read(&mut file).map_err(|e| unreadable(e.to_string()))
}

/// Typed getters over a metadata map.
pub struct Metadata<'a>(pub &'a HashMap<String, Value>);

impl Metadata<'_> {
    fn get(&self, key: &str) -> Result<&Value, GgufError> {
        self.0
            .get(key)
            .ok_or_else(|| GgufError::Missing(key.to_owned()))
    }

    fn invalid(key: &str, e: impl std::fmt::Display) -> GgufError {
        GgufError::Invalid {
            key: key.to_owned(),
            detail: e.to_string(),
        }
    }

    /// Whether the key is present.
    pub fn has(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }

    /// A string value.
    pub fn string(&self, key: &str) -> Result<&str, GgufError> {
        self.get(key)?
            .to_string()
            .map(String::as_str)
            .map_err(|e| Self::invalid(key, e))
    }

    /// An unsigned integer value of any width.
    pub fn u32(&self, key: &str) -> Result<u32, GgufError> {
        let v = self.get(key)?;
        v.to_u32()
            .or_else(|_| v.to_i32().map(|x| x as u32))
            .or_else(|_| v.to_u64().map(|x| x as u32))
            .map_err(|e| Self::invalid(key, e))
    }

    /// A float value.
    pub fn f32(&self, key: &str) -> Result<f32, GgufError> {
        let v = self.get(key)?;
        v.to_f32()
            .or_else(|_| v.to_f64().map(|x| x as f32))
            .map_err(|e| Self::invalid(key, e))
    }

    /// A boolean value, or `default` when absent.
    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool, GgufError> {
        match self.0.get(key) {
            None => Ok(default),
            Some(v) => v.to_bool().map_err(|e| Self::invalid(key, e)),
        }
    }

    /// An array value.
    pub fn array(&self, key: &str) -> Result<&Vec<Value>, GgufError> {
        self.get(key)?.to_vec().map_err(|e| Self::invalid(key, e))
    }

    /// An array of strings.
    pub fn strings(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        self.array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.to_string()
                    .map(String::as_str)
                    .map_err(|e| Self::invalid(&format!("{key}[{i}]"), e))
            })
            .collect()
    }
}
