//! Labeled routing data in the shared schema, one JSON object per line:
//! `{"id", "source", "category", "prompt", "scores": {"<model>": 0..1}}` (see
//! `../shared/data/README.md`). Training and evaluation read it; a malformed line is an error
//! naming the file and line, never skipped silently.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;

use serde::Deserialize;

/// One labeled query.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Example {
    /// Stable id.
    pub id: String,
    /// The data set it comes from (the unit of leave-one-source-out validation).
    pub source: String,
    /// Optional subject or task.
    #[serde(default)]
    pub category: Option<String>,
    /// The full prompt text (a single user turn; empty where `messages` is given).
    #[serde(default)]
    pub prompt: String,
    /// The conversation, for rows from a ledger (`router train --from-ledger`): OpenAI
    /// `{"role", "content"}` messages, read the way the router reads a request.
    #[serde(default)]
    pub messages: Option<Vec<serde_json::Value>>,
    /// Each labeled model's score on this query, 0..1.
    pub scores: BTreeMap<String, f64>,
    /// How much the row counts in the fit's loss (the operator's own rows count more than the
    /// public data; see `--own-weight`). 1 for the shared files.
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

impl Example {
    /// The scores of `local` and `cloud`, when both are labeled.
    pub fn pair(&self, local: &str, cloud: &str) -> Option<(f64, f64)> {
        Some((*self.scores.get(local)?, *self.scores.get(cloud)?))
    }

    /// The query the router reads: the conversation when the row has one, else the prompt as
    /// a single user turn.
    pub fn query(&self) -> crate::router::features::Query {
        use crate::router::features::Query;
        match &self.messages {
            Some(messages) => Query::from_messages(messages),
            None => Query::from_prompt(&self.prompt),
        }
    }
}

/// Reads every example of a JSONL file.
pub fn read_examples(path: &Path) -> Result<Vec<Example>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let example: Example = serde_json::from_str(&line)
            .map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))?;
        if example.prompt.is_empty() && example.messages.is_none() {
            return Err(format!(
                "{}:{}: the row has neither `prompt` nor `messages`",
                path.display(),
                i + 1
            ));
        }
        if !(example.weight.is_finite() && example.weight > 0.0) {
            return Err(format!(
                "{}:{}: weight {} must be a finite number > 0",
                path.display(),
                i + 1,
                example.weight
            ));
        }
        if let Some((model, score)) = example
            .scores
            .iter()
            .find(|(_, s)| !(0.0..=1.0).contains(*s))
        {
            return Err(format!(
                "{}:{}: score {score} of `{model}` is outside 0..1",
                path.display(),
                i + 1
            ));
        }
        out.push(example);
    }
    Ok(out)
}

/// Turns the judge grades of `sources` (a score of grade / 10, as the chat files carry) into
/// success: 1 at `pass` or above, else 0, for every model of those rows. A routing label must
/// mean "the local answer is good enough", and a 6/10 answer is not half a good answer. Returns
/// how many rows were changed; a named source that no row has is an error (a typo would
/// otherwise train on grades silently).
pub fn grades_to_success(
    examples: &mut [Example],
    sources: &[String],
    pass: f64,
) -> Result<usize, String> {
    if !(pass > 0.0 && pass <= 1.0) {
        return Err(format!("pass grade {pass} must be in (0, 1] (grade / 10)"));
    }
    for s in sources {
        if !examples.iter().any(|e| &e.source == s) {
            return Err(format!("graded source {s:?}: no row has that source"));
        }
    }
    let mut n = 0;
    for e in examples.iter_mut().filter(|e| sources.contains(&e.source)) {
        for v in e.scores.values_mut() {
            // Grades are tenths; 0.8 read back from JSON may be 0.7999...
            *v = if *v + 1e-9 >= pass { 1.0 } else { 0.0 };
        }
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap_or_else(|e| panic!("{e}"));
        std::io::Write::write_all(&mut f, text.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        f
    }

    #[test]
    fn reads_the_shared_schema_and_pairs_scores() {
        let f = write(concat!(
            r#"{"id": "a", "source": "s1", "category": null, "prompt": "2+2?", "scores": {"small": 1.0, "big": 1.0}}"#,
            "\n\n",
            r#"{"id": "b", "source": "s2", "prompt": "prove it", "scores": {"small": 0.0}}"#,
            "\n"
        ));
        let rows = read_examples(f.path()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].pair("small", "big"), Some((1.0, 1.0)));
        assert_eq!(rows[1].pair("small", "big"), None);
        assert_eq!(rows[1].category, None);
    }

    #[test]
    fn malformed_lines_are_errors_with_their_line_number() {
        let f =
            write("{\"id\": \"a\", \"source\": \"s\", \"prompt\": \"p\", \"scores\": {}}\n{oops\n");
        let err = read_examples(f.path()).err().unwrap_or_default();
        assert!(err.contains(":2:"), "{err}");
        let f = write(
            "{\"id\": \"a\", \"source\": \"s\", \"prompt\": \"p\", \"scores\": {\"m\": 1.5}}\n",
        );
        let err = read_examples(f.path()).err().unwrap_or_default();
        assert!(err.contains(":1:") && err.contains("outside 0..1"), "{err}");
    }

    #[test]
    #[cfg_attr(
        wattgate_no_shared_data,
        ignore = "needs ../shared/data/routing, absent beside this checkout"
    )]
    fn the_shared_files_parse() {
        // The real data, read from ../shared/data (never copied into the repository).
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/routing");
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("the shared data ({}): {e}", dir.display()));
        for entry in entries.flatten() {
            let rows = read_examples(&entry.path()).unwrap_or_else(|e| panic!("{e}"));
            // The chat files are the smallest (78 and 300 labeled prompts).
            assert!(
                rows.len() >= 50,
                "{}: {} rows",
                entry.path().display(),
                rows.len()
            );
        }
    }

    #[test]
    fn grades_become_success_at_the_pass_grade_and_a_misnamed_source_is_refused() {
        let row = |source: &str, grade: f64| Example {
            id: "x".into(),
            source: source.into(),
            category: None,
            prompt: "p".into(),
            scores: [("m".to_owned(), grade)].into(),
            messages: None,
            weight: 1.0,
        };
        // 0.8 parsed from JSON; 0.7 just below; another source left as it is.
        let grade: f64 = serde_json::from_str("0.8").unwrap_or_else(|e| panic!("{e}"));
        let mut rows = vec![row("chat", grade), row("chat", 0.7), row("mmlu", 0.7)];
        let n =
            grades_to_success(&mut rows, &["chat".into()], 0.8).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(n, 2);
        let got: Vec<f64> = rows.iter().map(|r| r.scores["m"]).collect();
        assert_eq!(got, [1.0, 0.0, 0.7]);
        let err = grades_to_success(&mut rows, &["caht".into()], 0.8)
            .err()
            .unwrap_or_default();
        assert!(err.contains("\"caht\""), "{err}");
        assert!(grades_to_success(&mut rows, &["chat".into()], 8.0).is_err());
    }
}
