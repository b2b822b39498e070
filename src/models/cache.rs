//! The model cache directory and whole-file verification.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::ModelSpec;

/// Where fetched models live.
#[derive(Debug, Clone)]
pub struct ModelCache {
    dir: PathBuf,
}

/// What the cache holds for a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelStatus {
    /// No file.
    Missing,
    /// A file of the expected size (its digest is checked by [`ModelCache::verify`]).
    Present {
        /// Its path.
        path: PathBuf,
    },
    /// A file of the wrong size: partial or corrupt; it will be re-fetched.
    WrongSize {
        /// Its path.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
}

impl ModelCache {
    /// The configured directory, else `$XDG_CACHE_HOME/wattgate/models`, else
    /// `~/.cache/wattgate/models`.
    pub fn new(configured: Option<&Path>) -> io::Result<Self> {
        if let Some(dir) = configured {
            return Ok(Self {
                dir: dir.to_owned(),
            });
        }
        let base = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
            Some(xdg) => PathBuf::from(xdg),
            None => match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
                Some(home) => PathBuf::from(home).join(".cache"),
                None => return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    "neither XDG_CACHE_HOME nor HOME is set: set models.cache_dir in the config",
                )),
            },
        };
        Ok(Self {
            dir: base.join("wattgate").join("models"),
        })
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where `spec`'s file lives (whether or not it exists).
    pub fn path(&self, spec: &ModelSpec) -> PathBuf {
        self.dir.join(&spec.file_name)
    }

    /// Cheap status: existence and size.
    pub fn status(&self, spec: &ModelSpec) -> ModelStatus {
        let path = self.path(spec);
        match std::fs::metadata(&path) {
            Err(_) => ModelStatus::Missing,
            Ok(m) if m.len() == spec.size => ModelStatus::Present { path },
            Ok(m) => ModelStatus::WrongSize {
                path,
                size: m.len(),
            },
        }
    }

    /// Full check: size and SHA-256 against `expected_sha256` (lower-case hex).
    pub fn verify(&self, spec: &ModelSpec, expected_sha256: &str) -> Result<PathBuf, String> {
        let path = self.path(spec);
        let size = std::fs::metadata(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .len();
        if size != spec.size {
            return Err(format!(
                "{} is {size} bytes, expected {} (partial or corrupt)",
                path.display(),
                spec.size
            ));
        }
        let actual = sha256_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if actual != expected_sha256 {
            return Err(format!(
                "{} has SHA-256 {actual}, expected {expected_sha256} (corrupt)",
                path.display()
            ));
        }
        Ok(path)
    }
}

/// Lower-case hex SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}
