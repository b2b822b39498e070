//! The files a profile reads and writes besides its summary: the labeled input rows, the
//! records of a run being resumed, and the marker that ties a directory to one model.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::grade::GraderKind;
use super::{QueryRecord, RUN_FILE};
use crate::wire::text_parts;

/// One line of the labeled input, as written (the shared routing schema, plus `answer`).
#[derive(Deserialize)]
struct InputRow {
    id: Value,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    category: Option<String>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    messages: Option<Vec<Value>>,
    #[serde(default)]
    scores: BTreeMap<String, f64>,
    #[serde(default)]
    answer: Option<AnswerField>,
    #[serde(default)]
    grader: Option<GraderKind>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum AnswerField {
    One(String),
    Many(Vec<String>),
}

/// A row ready to run.
pub(super) struct Query {
    pub(super) id: String,
    pub(super) source: String,
    pub(super) category: Option<String>,
    pub(super) prompt: String,
    pub(super) messages: Vec<Value>,
    pub(super) scores: BTreeMap<String, f64>,
    pub(super) answers: Vec<String>,
    pub(super) grader: Option<GraderKind>,
}

/// `n` items spread evenly over `items` (the first, then every len/n-th), in order.
pub(super) fn spread<T>(items: Vec<T>, n: usize) -> Vec<T> {
    let len = items.len();
    if n >= len {
        return items;
    }
    let mut picks = (0..n).map(|i| i * len / n).peekable();
    items
        .into_iter()
        .enumerate()
        .filter_map(|(i, item)| {
            if picks.peek() == Some(&i) {
                picks.next();
                Some(item)
            } else {
                None
            }
        })
        .collect()
}

/// Reads the input rows; a malformed line is an error naming its line, a duplicate id too
/// (resuming goes by id).
pub(super) fn read_queries(path: &Path) -> anyhow::Result<Vec<Query>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let row: InputRow = serde_json::from_str(line).with_context(at)?;
        let id = match row.id {
            Value::String(s) => s,
            Value::Number(n) => n.to_string(),
            other => bail!("{}: `id` must be a string or number, got {other}", at()),
        };
        if !seen.insert(id.clone()) {
            bail!("{}: duplicate id `{id}`", at());
        }
        let (prompt, messages) = match (row.prompt, row.messages) {
            (Some(p), None) => {
                let messages = vec![json!({"role": "user", "content": p})];
                (p, messages)
            }
            (None, Some(m)) if !m.is_empty() => {
                let text: Vec<&str> = m
                    .iter()
                    .filter(|m| m.get("role").and_then(Value::as_str) == Some("user"))
                    .filter_map(|m| m.get("content"))
                    .flat_map(text_parts)
                    .collect();
                (text.join("\n"), m)
            }
            (Some(_), Some(_)) => bail!("{}: give `prompt` or `messages`, not both", at()),
            _ => bail!(
                "{}: needs `prompt` (string) or `messages` (non-empty array)",
                at()
            ),
        };
        if let Some((m, s)) = row.scores.iter().find(|(_, s)| !(0.0..=1.0).contains(*s)) {
            bail!("{}: score {s} of `{m}` is outside 0..1", at());
        }
        let answers = match row.answer {
            None => Vec::new(),
            Some(AnswerField::One(a)) => vec![a],
            Some(AnswerField::Many(a)) => a,
        };
        out.push(Query {
            id,
            source: row.source.unwrap_or_else(|| "unknown".to_owned()),
            category: row.category,
            prompt,
            messages,
            scores: row.scores,
            answers,
            grader: row.grader,
        });
    }
    Ok(out)
}

/// Reads the finished rows. A last line without its newline was cut by an interrupted write:
/// it is removed (the query runs again). Any other malformed line is an error naming it.
pub(super) fn read_records(
    path: &Path,
    say: &mut dyn FnMut(String),
) -> anyhow::Result<Vec<QueryRecord>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let complete = match text.rfind('\n') {
        Some(end) => end + 1,
        None => 0,
    };
    if complete < text.len() {
        say(format!(
            "{}: dropping an unfinished last line ({} bytes) left by an interrupted run",
            path.display(),
            text.len() - complete
        ));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        file.set_len(complete as u64)
            .with_context(|| format!("truncating {}", path.display()))?;
    }
    let mut out = Vec::new();
    for (i, line) in text[..complete].lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record: QueryRecord = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not a profile row", path.display(), i + 1))?;
        out.push(record);
    }
    Ok(out)
}

#[derive(Serialize, Deserialize)]
struct RunInfo {
    model: String,
    data: String,
}

/// Records what the directory profiles, or checks that a resumed run profiles the same model:
/// mixing two models' rows in one file would corrupt both.
pub(super) fn claim_directory(dir: &Path, model: &str, data: &Path) -> anyhow::Result<()> {
    let path = dir.join(RUN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let info: RunInfo =
                serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?;
            if info.model != model {
                bail!(
                    "{} holds a profile of `{}`, not `{model}`: pass another --out",
                    dir.display(),
                    info.model
                );
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let info = RunInfo {
                model: model.to_owned(),
                data: data.display().to_string(),
            };
            std::fs::write(&path, serde_json::to_string_pretty(&info)? + "\n")
                .with_context(|| format!("writing {}", path.display()))
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn spread_picks_evenly_and_keeps_order() {
        let picked = super::spread((0..10).collect(), 3);
        assert_eq!(picked, vec![0, 3, 6]);
        assert_eq!(super::spread((0..3).collect(), 5), vec![0, 1, 2]);
        assert_eq!(super::spread((0..100).collect(), 100).len(), 100);
        assert!(super::spread((0..10).collect::<Vec<i32>>(), 0).is_empty());
    }
}
