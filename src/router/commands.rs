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
use super::model;
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

/// What `router train` was asked for (the command line, parsed).
pub struct TrainArgs<'a> {
    /// Labeled JSONL files.
    pub files: &'a [PathBuf],
    /// Local label preference.
    pub local: &'a [String],
    /// Cloud label preference (empty: each source's strongest model).
    pub cloud: &'a [String],
    /// Output directory.
    pub out: &'a Path,
    /// Router name (default: the output directory's name).
    pub name: Option<&'a str>,
    /// Fix the structure measures instead of letting validation choose (`all`, `none` or names).
    pub structure: Option<&'a [String]>,
    /// Fit raw labels only, instead of letting validation choose centring.
    pub keep_source_levels: bool,
    /// Penalties validation chooses among (empty: [`train::DEFAULT_L2`]).
    pub l2: &'a [f64],
    /// Sources whose scores are judge grades / 10, turned into success at `pass_grade`.
    pub graded_sources: &'a [String],
    /// A graded answer counts as a success at this grade / 10 or above.
    pub pass_grade: f64,
    /// The own-traffic study ([`TrainOptions::own_rows`]); 0 trains normally.
    pub own_rows: usize,
    /// The weight of each study row ([`TrainOptions::own_weight`]).
    pub own_weight: f64,
    /// Rows of the operator's own traffic ([`super::own::examples`]) and the local backend
    /// they grade: they join the files' rows, their label first in the local preference.
    pub own: Option<(Vec<Example>, String)>,
}

/// The candidates of `args`: the default grid, narrowed by each flag given.
fn choices(args: &TrainArgs<'_>) -> Vec<train::Choice> {
    let structures: Vec<Vec<String>> = match args.structure {
        None => train::default_structures(),
        Some(names) if names.iter().any(|s| s == "all") => {
            vec![DENSE_NAMES.iter().map(|s| (*s).to_owned()).collect()]
        }
        Some(names) => vec![names.iter().filter(|s| *s != "none").cloned().collect()],
    };
    let centring: &[bool] = if args.keep_source_levels {
        &[false]
    } else {
        &[true, false]
    };
    let l2: &[f64] = if args.l2.is_empty() {
        &train::DEFAULT_L2
    } else {
        args.l2
    };
    train::grid(centring, &structures, l2)
}

/// `router train`: fits, prints validation by held-out source, saves to `out`.
pub fn train(args: &TrainArgs<'_>) -> Result<(), String> {
    let mut examples = read_all(args.files)?;
    let mut local = args.local.to_vec();
    let mut cloud = args.cloud.to_vec();
    if let Some((own, backend)) = &args.own {
        // The own rows' labels come first: on them, the backend's own grade is the truth; the
        // files' rows keep the labels named on the command line.
        local.insert(0, super::own::local_label(backend));
        if !cloud.is_empty() {
            cloud.push(super::own::CLOUD_LABEL.to_owned());
        }
        examples.extend(own.iter().cloned());
    }
    if !args.graded_sources.is_empty() {
        let n = data::grades_to_success(&mut examples, args.graded_sources, args.pass_grade)?;
        eprintln!(
            "{n} graded rows ({}) scored as success at grade >= {}",
            args.graded_sources.join(", "),
            args.pass_grade * 10.0
        );
    }
    let out = args.out;
    let name = match args.name {
        Some(n) => n.to_owned(),
        None => out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "router".to_owned()),
    };
    let mut options = TrainOptions::new(&name, local, cloud);
    options.choices = choices(args);
    options.own_rows = args.own_rows;
    options.own_weight = args.own_weight;
    let started = std::time::Instant::now();
    let mut bar: Option<crate::progress::Progress> = None;
    let trained = train::train(&examples, &options, &mut |step| {
        let bar = bar.get_or_insert_with(|| {
            crate::progress::Progress::new("train", step.total as u64, crate::progress::Unit::Items)
        });
        if step.done == step.total {
            bar.set(step.done as u64, "");
            bar.finish(&format!("{} fits", step.total));
        } else {
            bar.set(step.done as u64, step.what);
        }
    })?;
    trained.model.save(out).map_err(|e| e.to_string())?;
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
    if let Some(sel) = &meta.selection {
        println!(
            "validation: {}; every number above is an outer one (each group scored once, by a \
             head chosen and fitted without it)",
            sel.protocol
        );
        for o in &sel.outer {
            match o.inner_score {
                Some(score) => println!(
                    "  without {:<20} inner folds chose: {} (inner score {score:.3})",
                    o.source, o.choice
                ),
                None => println!(
                    "  without {:<20} the only candidate: {}",
                    o.source, o.choice
                ),
            }
        }
        if sel.own_rows > 0 {
            println!(
                "own-traffic study: {} rows of each outer source, weight {} each, joined its \
                 training; the rest of it was scored (sources with fewer than {} rows left are \
                 not reported)",
                sel.own_rows,
                sel.own_weight,
                train::MIN_SCORED
            );
        }
        println!(
            "shipped head: {} (inner score {:.3} on all groups, {} candidates)",
            sel.chosen,
            sel.inner_score,
            sel.candidates.len()
        );
    }
    println!(
        "calibration (Platt, on the shipped choice's held-out logits): a={:.4} b={:.4}",
        meta.calibration.a, meta.calibration.b
    );
    eprintln!("trained in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// `router score`: one `{"id", "p_local"}` line per input line, in order.
pub fn score(router: &str, router_dir: &Path, input: &Path, output: &Path) -> Result<(), String> {
    let model = model::load_named(router, router_dir).map_err(|e| e.to_string())?;
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
    let model = model::load_named(router, router_dir).map_err(|e| e.to_string())?;
    let examples = data::read_examples(file)?;
    let labels = Labels::new(&examples, local, cloud);
    let outcomes: Vec<Outcome> = examples
        .iter()
        .filter_map(|e| {
            Some(Outcome {
                p_local: model.score(&e.query()),
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

/// What `router guard` needs.
pub struct GuardOptions<'a> {
    /// Profile `queries.jsonl` files whose rows carry `profile.signals`.
    pub files: &'a [PathBuf],
    /// The cloud model's label in the rows' `scores` (first present wins).
    pub cloud: &'a [String],
    /// The local model's router (its p_local is a feature and the comparison), if any.
    pub router: Option<&'a str>,
    /// Where routers are looked up by name.
    pub router_dir: &'a Path,
    /// Where `guard.json` is written.
    pub out: &'a Path,
    /// The replayed curves' SVG; default `<out>/guard_curve.svg`.
    pub svg: Option<&'a Path>,
    /// Ridge penalty on the standardised weights.
    pub l2: f64,
    /// Replay with the rule (exp mean ln P) instead of the fitted head's held-out confidence:
    /// what the guard uses where no head is shipped.
    pub replay_rule: bool,
}

/// `router guard`: fits the quality guard's head on profiled answers that carry their
/// signals, validates it by held-out source, and replays router-only against router + guard.
pub fn guard(o: &GuardOptions<'_>) -> Result<(), String> {
    use crate::guard::head::{self, Example as GuardExample};
    use crate::guard::replay;
    let router = o
        .router
        .map(|r| model::load_named(r, o.router_dir))
        .transpose()
        .map_err(|e| e.to_string())?;
    let metering = crate::config::MeteringConfig::default();
    let mut examples = Vec::new();
    let mut joules = Vec::new();
    let (mut no_signals, mut no_cloud) = (0usize, 0usize);
    let mut local_model = String::new();
    let mut seen = std::collections::HashSet::new();
    let mut duplicates = 0usize;
    for f in o.files {
        let text = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let r: crate::profile::QueryRecord = serde_json::from_str(line)
                .map_err(|e| format!("{}:{}: {e}", f.display(), i + 1))?;
            // A query profiled twice (overlapping samples) counts once: the first row.
            if !seen.insert(r.id.clone()) {
                duplicates += 1;
                continue;
            }
            let Some(signals) = r.profile.signals else {
                no_signals += 1;
                continue;
            };
            let Some(cloud) = o.cloud.iter().find_map(|c| r.scores.get(c)) else {
                no_cloud += 1;
                continue;
            };
            local_model.clone_from(&r.profile.model);
            let p_local = router
                .as_ref()
                .map(|m| m.score(&Query::from_prompt(&r.prompt)));
            // The cloud's answer is priced on the local answer's token counts (an estimate:
            // the cloud answer is not generated in a replay).
            let cloud_joules = metering.cloud_pue
                * (r.profile.input_tokens as f64 * metering.cloud_joules_per_input_token
                    + r.profile.output_tokens as f64 * metering.cloud_joules_per_output_token);
            joules.push((r.profile.joules, cloud_joules));
            examples.push(GuardExample {
                signals,
                p_local,
                local: r.profile.score,
                cloud: *cloud,
                source: r.source,
            });
        }
    }
    if duplicates > 0 {
        eprintln!("skipped {duplicates} rows whose id an earlier row already had");
    }
    if no_signals + no_cloud > 0 {
        eprintln!(
            "skipped {no_signals} rows without signals (profiled before signals were recorded, or a backend without logprobs) and {no_cloud} without a cloud label ({})",
            o.cloud.join(", ")
        );
    }
    let trained = head::train(&examples, &local_model, o.l2)?;
    // The same held-out predictions training validated with.
    let held_out = head::held_out_confidence(&examples, &local_model, o.l2)?;
    std::fs::create_dir_all(o.out).map_err(|e| format!("{}: {e}", o.out.display()))?;
    trained.save(o.out)?;
    let v = &trained.validation;
    let positives = examples.iter().filter(|e| e.local >= 0.5).count();
    println!(
        "guard head for {local_model} -> {}",
        o.out.join(head::GUARD_FILE).display()
    );
    println!(
        "{} answers with signals from {} source(s), {positives} right ({:.1}%)",
        v.n,
        v.sources,
        100.0 * positives as f64 / v.n.max(1) as f64
    );
    let opt = |x: Option<f64>| x.map_or("-".to_owned(), |x| format!("{x:.3}"));
    println!(
        "held-out AUC for \"answered right\": guard {}, rule exp(mean ln P) {}, router p_local {}",
        opt(v.auc),
        opt(v.rule_auc),
        opt(v.router_auc)
    );
    if let (Some(g), Some(r)) = (v.auc, v.router_auc) {
        println!("guard - router AUC: {:+.3}", g - r);
    }
    println!(
        "default threshold (max_quality_loss = {}): {:.4}",
        crate::config::DEFAULT_MAX_QUALITY_LOSS,
        trained.threshold_for_quality_loss(crate::config::DEFAULT_MAX_QUALITY_LOSS)
    );
    let rows: Vec<replay::Row> = examples
        .iter()
        .zip(&held_out)
        .zip(&joules)
        .map(|((e, &held), &(local_joules, cloud_joules))| replay::Row {
            p_local: e.p_local.unwrap_or(0.5),
            confidence: if o.replay_rule {
                head::rule_confidence(&e.signals)
            } else {
                held
            },
            local: e.local,
            cloud: e.cloud,
            local_joules,
            cloud_joules,
        })
        .collect();
    let shares: Vec<f64> = (0..=10).map(|i| f64::from(i) / 10.0).collect();
    let points = replay::curves(&rows, &shares);
    println!(
        "replayed on the same rows with the {} (no new generation; local joules as profiled, cloud joules estimated at {} J/input and {} J/output token x PUE {}):",
        if o.replay_rule { "rule exp(mean ln P)" } else { "head's held-out confidence" },
        metering.cloud_joules_per_input_token, metering.cloud_joules_per_output_token, metering.cloud_pue
    );
    print!("{}", replay::table(&points));
    let svg_path = o
        .svg
        .map_or_else(|| o.out.join("guard_curve.svg"), Path::to_path_buf);
    let title =
        format!("{local_model}: quality vs local share, router only vs router + guard (held out)");
    std::fs::write(&svg_path, replay::svg(&points, &title))
        .map_err(|e| format!("{}: {e}", svg_path.display()))?;
    println!("chart: {}", svg_path.display());
    Ok(())
}
