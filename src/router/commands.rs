//! `wattgate router train|score|eval`: the command-line contract other tools build on.
//!
//! Results go to stdout (or the output file), progress and errors to stderr. A malformed input
//! line stops the command with its line number; `score` writes its output through a temporary
//! file renamed at the end, so a failed run never leaves a partial output that looks complete.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::data::{self, Example};
use super::evaluation::{self, Outcome};
use super::features::{Query, DENSE_NAMES};
use super::model::{self, RouterModel};
use super::train::{self, Labels, TrainOptions};

/// Reads and concatenates labeled files.
fn read_all(files: &[PathBuf]) -> Result<Vec<Example>, String> {
    let mut all = Vec::new();
    for f in files {
        let rows = data::read_examples(f)?;
        eprintln!("read {} rows from {}", rows.len(), f.display());
        all.extend(rows);
    }
    Ok(all)
}

/// `router train`: fits, prints validation by held-out source, saves to `out`.
pub fn train(
    files: &[PathBuf],
    local: &[String],
    cloud: &[String],
    out: &Path,
    name: Option<&str>,
    structure: Option<&[String]>,
    keep_source_levels: bool,
) -> Result<(), String> {
    let examples = read_all(files)?;
    let name = match name {
        Some(n) => n.to_owned(),
        None => out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "router".to_owned()),
    };
    let mut options = TrainOptions::new(&name, local.to_vec(), cloud.to_vec());
    match structure {
        None => {}
        Some(names) if names.iter().any(|s| s == "all") => {
            options.structure = DENSE_NAMES.iter().map(|s| (*s).to_owned()).collect();
        }
        Some(names) => {
            options.structure = names.iter().filter(|s| *s != "none").cloned().collect();
        }
    }
    options.centre_sources = !keep_source_levels;
    let started = std::time::Instant::now();
    let trained = train::train(&examples, &options, &mut |s| eprintln!("train: {s}"))?;
    trained.model.save(out)?;
    let meta = &trained.model.meta;
    println!("router {} -> {}", meta.name, out.display());
    println!("local label: {}", meta.label);
    println!("cloud label: {}", trained.cloud);
    println!(
        "{:<22} {:>6} {:>6} {:>6} {:>9} {:>8}",
        "held-out source", "rows", "auc", "apgr", "share@1pt", "oracle"
    );
    let opt = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.3}"));
    for v in &meta.validation {
        println!(
            "{:<22} {:>6} {:>6} {:>6} {:>9.3} {:>8.3}",
            v.source,
            v.report.n,
            opt(v.report.auc),
            opt(v.report.apgr),
            v.report.local_share_at_1pt,
            v.report.oracle_local_share
        );
    }
    if let Some(p) = &meta.pooled {
        println!(
            "{:<22} {:>6} {:>6} {:>6} {:>9.3} {:>8.3}",
            "(all held out, pooled)",
            p.n,
            opt(p.auc),
            opt(p.apgr),
            p.local_share_at_1pt,
            p.oracle_local_share
        );
    }
    if meta.validation.is_empty() {
        println!("(one source only: no held-out validation)");
    }
    println!(
        "calibration (Platt, on held-out-source logits): a={:.4} b={:.4}",
        meta.calibration.a, meta.calibration.b
    );
    eprintln!("trained in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// `router score`: one `{"id", "p_local"}` line per input line, in order.
pub fn score(router: &str, router_dir: &Path, input: &Path, output: &Path) -> Result<(), String> {
    let model = RouterModel::load(&model::resolve(router, router_dir)?)?;
    let file = std::fs::File::open(input).map_err(|e| format!("{}: {e}", input.display()))?;
    let tmp = output.with_extension("partial");
    let out_file = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let mut writer = std::io::BufWriter::new(out_file);
    let result = (|| {
        let mut n = 0usize;
        for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
            let at = |e: String| format!("{}:{}: {e}", input.display(), i + 1);
            let line = line.map_err(|e| at(e.to_string()))?;
            if line.trim().is_empty() {
                continue;
            }
            let (id, query) = parse_score_line(&line).map_err(at)?;
            let p = model.score(&query);
            let row = serde_json::json!({"id": id, "p_local": p});
            writeln!(writer, "{row}").map_err(|e| format!("{}: {e}", tmp.display()))?;
            n += 1;
            if n.is_multiple_of(1000) {
                eprintln!("scored {n}");
            }
        }
        writer
            .flush()
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        Ok(n)
    })();
    match result {
        Ok(n) => {
            std::fs::rename(&tmp, output).map_err(|e| format!("{}: {e}", output.display()))?;
            eprintln!("scored {n} lines -> {}", output.display());
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// One `score` input line: `id` plus `prompt` (string) or `messages` (OpenAI array).
fn parse_score_line(line: &str) -> Result<(Value, Query), String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let Value::Object(obj) = value else {
        return Err("each line must be a JSON object".to_owned());
    };
    let id = match obj.get("id") {
        Some(id @ (Value::String(_) | Value::Number(_))) => id.clone(),
        Some(_) => return Err("`id` must be a string or a number".to_owned()),
        None => return Err("missing `id`".to_owned()),
    };
    let query = match (obj.get("prompt"), obj.get("messages")) {
        (Some(Value::String(p)), _) => Query::from_prompt(p),
        (Some(_), _) => return Err("`prompt` must be a string".to_owned()),
        (None, Some(Value::Array(m))) => {
            if let Some(k) = m
                .iter()
                .position(|m| !m.is_object() || !m.get("role").is_some_and(Value::is_string))
            {
                return Err(format!("`messages[{k}]` must be an object with a `role`"));
            }
            Query::from_messages(m)
        }
        (None, Some(_)) => return Err("`messages` must be an array".to_owned()),
        (None, None) => return Err("needs `prompt` or `messages`".to_owned()),
    };
    Ok((id, query))
}

/// `router eval`: the measures of a router on a labeled file, as JSON.
pub fn eval(
    router: &str,
    router_dir: &Path,
    file: &Path,
    local: &[String],
    cloud: &[String],
) -> Result<(), String> {
    let model = RouterModel::load(&model::resolve(router, router_dir)?)?;
    let examples = data::read_examples(file)?;
    let labels = Labels::new(&examples, local, cloud);
    let outcomes: Vec<Outcome> = examples
        .iter()
        .filter_map(|e| {
            Some(Outcome {
                p_local: model.score(&Query::from_prompt(&e.prompt)),
                local: labels.local(e)?,
                cloud: labels.cloud(e)?,
            })
        })
        .collect();
    if outcomes.is_empty() {
        return Err(format!(
            "{}: no row carries both a `{}` and a `{}` score",
            file.display(),
            local.join(" | "),
            cloud.join(" | ")
        ));
    }
    let skipped = examples.len() - outcomes.len();
    if skipped > 0 {
        eprintln!("{skipped} rows lack one of the two labels and were left out");
    }
    let report = evaluation::evaluate(&outcomes)?;
    let json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
    println!("{json}");
    Ok(())
}
