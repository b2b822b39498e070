//! Graders: did the model's answer match the reference?
//!
//! Each source kind has its own rule, because a model that is right can still say so in many
//! shapes ("B", "(B)", "The answer is B.", "#### 18", "$18.00") and a model that is wrong often
//! echoes the question, options included. The rules are strict in one direction: an answer is
//! only found where the output *commits* to one, never in an echoed option list, so a parroting
//! model scores what it deserves.

use serde::{Deserialize, Serialize};

/// Which rule grades a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GraderKind {
    /// A letter among the prompt's options (MMLU, MMLU-Pro, GPQA, ARC).
    MultipleChoice,
    /// The final number of a worked answer (GSM8K).
    FinalNumber,
    /// A short answer compared after normalisation (TriviaQA, NQ).
    ShortAnswer,
    /// Open-ended: a judge model compares the answer with a reference answer.
    Judge,
}

impl GraderKind {
    /// The name used in outputs and in a row's optional `grader` field.
    pub fn as_str(self) -> &'static str {
        match self {
            GraderKind::MultipleChoice => "multiple_choice",
            GraderKind::FinalNumber => "final_number",
            GraderKind::ShortAnswer => "short_answer",
            GraderKind::Judge => "judge",
        }
    }
}

/// A grade: the score in 0..1 and what was read from the output.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Grade {
    /// 1.0 right, 0.0 wrong; a judge can give 0.5 (right in one order of two).
    pub score: f64,
    /// The answer found in the output (a letter, a number, a normalised phrase), or `None`
    /// when the output commits to no answer (echoes, rambling, empty).
    pub extracted: Option<String>,
}

impl Grade {
    fn of(extracted: Option<String>, right: bool) -> Self {
        Self {
            score: if right { 1.0 } else { 0.0 },
            extracted,
        }
    }
}

/// The option letters a multiple-choice prompt offers: the last run of lines `A. ...`,
/// `B. ...` (or `A) ...`) in order, so roman-numeral statements (`I. ...`, `II. ...`) above the
/// options are not taken for options.
pub fn option_letters(prompt: &str) -> Vec<char> {
    option_lines(prompt).into_iter().map(|(l, _)| l).collect()
}

/// The options of a multiple-choice prompt, as (letter, text), found as in [`option_letters`].
pub fn option_lines(prompt: &str) -> Vec<(char, String)> {
    let mut best: Vec<(char, String)> = Vec::new();
    let mut run: Vec<(char, String)> = Vec::new();
    for line in prompt.lines() {
        let line = line.trim();
        let mut chars = line.chars();
        let (Some(letter), Some(sep)) = (chars.next(), chars.next()) else {
            continue;
        };
        if !(letter.is_ascii_uppercase() && (sep == '.' || sep == ')')) {
            continue;
        }
        let text = chars.as_str().trim().to_owned();
        let expected = (b'A' + run.len() as u8) as char;
        if letter == expected {
            run.push((letter, text));
        } else if letter == 'A' {
            run = vec![(letter, text)];
        } else {
            continue;
        }
        if run.len() >= best.len() {
            best = run.clone();
        }
    }
    if best.len() >= 2 {
        best
    } else {
        Vec::new()
    }
}

/// Grades a multiple-choice answer against the reference letter.
pub fn multiple_choice(output: &str, reference: char, letters: &[char]) -> Grade {
    let found = extract_choice(output, letters);
    let right = found == Some(reference.to_ascii_uppercase());
    Grade::of(found.map(String::from), right)
}

/// The letter an output commits to, among `letters`.
///
/// Looked for, in order: an explicit statement ("answer is B", "Answer: (B)", "correct option
/// is B"); a bare letter opening the output ("B", "B.", "(B)", "B) 4"), but not an article
/// ("A landlord...", "A 25-year-old...") and not the first line of an option list the model is
/// reciting ("A. ...\nB. ..."). Anything else, including an echoed question, commits to nothing.
pub fn extract_choice(output: &str, letters: &[char]) -> Option<char> {
    let valid = |c: char| letters.contains(&c);
    // ASCII lower-casing keeps byte offsets, so positions found in `lower` index `output`.
    let lower = output.to_ascii_lowercase();
    // "the answer is", "the correct answer is" end in "answer is"; a colon after a cue is
    // skipped with the spaces.
    for cue in ["answer is", "answer:", "option is"] {
        let mut from = 0;
        while let Some(at) = lower[from..].find(cue) {
            let after = &output[from + at + cue.len()..];
            if let Some(c) = leading_letter(after, &valid, false) {
                return Some(c);
            }
            from += at + cue.len();
        }
    }
    let option_markers = output
        .lines()
        .filter(|line| {
            let mut chars = line.trim().chars();
            match (chars.next(), chars.next()) {
                (Some(l), None) => valid(l),
                (Some(l), Some('.' | ')')) => valid(l),
                _ => false,
            }
        })
        .count();
    if option_markers >= 2 {
        return None;
    }
    leading_letter(output, &valid, true)
}

/// A letter at the start of `text` (after spaces, `*`, `(` or `[`) that stands alone: followed
/// by the end, a closing bracket, `.`, `:`, `,` or a line break. With `strict_start` (the very
/// start of an output, no cue before it), a letter followed by a space and more text on the
/// same line is a word ("A landlord"), not an answer.
fn leading_letter(text: &str, valid: &dyn Fn(char) -> bool, strict_start: bool) -> Option<char> {
    let opening = if strict_start { "*([\"'" } else { ":*([\"'" };
    let text = text.trim_start_matches(|c: char| c.is_whitespace() || opening.contains(c));
    let mut chars = text.chars();
    let first = chars.next()?;
    if !first.is_ascii_alphabetic() {
        return None;
    }
    let letter = first.to_ascii_uppercase();
    if !valid(letter) {
        return None;
    }
    let rest = chars.as_str();
    match rest.chars().next() {
        None => Some(letter),
        Some(')' | ']' | '.' | ':' | ',' | '*' | '"' | '\'' | '\n' | '\r') => Some(letter),
        Some(c) if c.is_whitespace() => {
            let same_line = rest.split('\n').next().unwrap_or("").trim();
            if strict_start && !same_line.is_empty() {
                None
            } else {
                Some(letter)
            }
        }
        Some(_) => None,
    }
}

/// The reference number of a GSM8K-style answer: what follows the last `####`, else the whole
/// text, normalised (no thousands separators, no currency, no trailing zeros).
pub fn reference_number(answer: &str) -> Option<String> {
    let tail = answer.rsplit("####").next().unwrap_or(answer);
    numbers_in(tail).into_iter().next_back()
}

/// Grades a worked answer by its final number.
pub fn final_number(output: &str, reference: &str) -> Grade {
    let found = extract_final_number(output);
    let want = reference_number(reference);
    let right = match (&found, &want) {
        (Some(a), Some(b)) => same_number(a, b),
        _ => false,
    };
    Grade::of(found, right)
}

/// The number an output ends on: after `####` if present, else after "answer is", else the
/// last number in the text.
pub fn extract_final_number(output: &str) -> Option<String> {
    if let Some((_, tail)) = output.rsplit_once("####") {
        if let Some(n) = numbers_in(tail).into_iter().next() {
            return Some(n);
        }
    }
    let lower = output.to_ascii_lowercase();
    if let Some(at) = lower.rfind("answer is") {
        if let Some(n) = numbers_in(&output[at..]).into_iter().next() {
            return Some(n);
        }
    }
    numbers_in(output).into_iter().next_back()
}

/// Every number in `text`, normalised: `$1,234.50` -> `1234.5`, `-3` -> `-3`.
fn numbers_in(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let starts = c.is_ascii_digit()
            || (c == '-'
                && bytes.get(i + 1).is_some_and(|d| d.is_ascii_digit())
                && (i == 0 || !bytes[i - 1].is_alphanumeric()));
        if !starts {
            i += 1;
            continue;
        }
        let mut s = String::new();
        if c == '-' {
            s.push('-');
            i += 1;
        }
        while i < bytes.len() {
            let d = bytes[i];
            let next_digit = bytes.get(i + 1).is_some_and(|n| n.is_ascii_digit());
            if d.is_ascii_digit() {
                s.push(d);
            } else if d == ',' && next_digit {
                // thousands separator
            } else if d == '.' && next_digit {
                s.push('.');
            } else {
                break;
            }
            i += 1;
        }
        out.push(normalise_number(&s));
    }
    out
}

fn normalise_number(s: &str) -> String {
    if let Some((int, frac)) = s.split_once('.') {
        let frac = frac.trim_end_matches('0');
        if frac.is_empty() {
            int.to_owned()
        } else {
            format!("{int}.{frac}")
        }
    } else {
        s.to_owned()
    }
}

fn same_number(a: &str, b: &str) -> bool {
    if a == b {
        return true;
    }
    match (a.parse::<f64>(), b.parse::<f64>()) {
        (Ok(x), Ok(y)) => (x - y).abs() <= 1e-6 * y.abs().max(1.0),
        _ => false,
    }
}

/// Lower case, punctuation and the articles a/an/the removed, whitespace collapsed (the
/// SQuAD normalisation).
pub fn normalise_text(text: &str) -> String {
    let cleaned: String = text
        .to_lowercase()
        .chars()
        .map(|c| if c.is_alphanumeric() { c } else { ' ' })
        .collect();
    cleaned
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Grades a short answer: right when the output's first line, normalised, equals one of the
/// accepted answers or contains one as whole words ("Paris." and "It is Paris" both match
/// "Paris"; "Parisian" does not).
pub fn short_answer(output: &str, accepted: &[String]) -> Grade {
    let first = output
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    let lower = first.to_ascii_lowercase();
    let span = match lower.find("answer is") {
        Some(at) => &first[at + "answer is".len()..],
        None => first,
    };
    let got = normalise_text(span);
    if got.is_empty() {
        return Grade::of(None, false);
    }
    let padded = format!(" {got} ");
    let right = accepted
        .iter()
        .map(|a| normalise_text(a))
        .any(|want| !want.is_empty() && (got == want || padded.contains(&format!(" {want} "))));
    Grade::of(Some(got), right)
}

/// A judge's verdict in one order: which answer it preferred.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The first answer shown.
    First,
    /// The second answer shown.
    Second,
    /// Neither is better.
    Tie,
}

/// Reads a judge's verdict: the last `[[A]]`, `[[B]]` or `[[C]]` (tie) in its reply, the
/// MT-Bench pairwise convention. `None` when the judge gave none.
pub fn parse_verdict(reply: &str) -> Option<Verdict> {
    let mut last = None;
    let mut from = 0;
    while let Some(at) = reply[from..].find("[[") {
        let start = from + at + 2;
        let verdict = match reply[start..].get(..3) {
            Some("A]]") => Some(Verdict::First),
            Some("B]]") => Some(Verdict::Second),
            Some("C]]") => Some(Verdict::Tie),
            _ => None,
        };
        if verdict.is_some() {
            last = verdict;
        }
        from = start;
    }
    last
}

/// Combines the two judge orders (local answer shown first, then second) into a grade: each
/// order where the local answer wins or ties counts 1, so 1.0 is win-or-tie in both orders, 0.5
/// in one. A missing verdict counts as a loss and is named in `extracted`.
pub fn judged(local_first: Option<Verdict>, local_second: Option<Verdict>) -> Grade {
    let first = matches!(local_first, Some(Verdict::First | Verdict::Tie));
    let second = matches!(local_second, Some(Verdict::Second | Verdict::Tie));
    let name = |v: Option<Verdict>, local: Verdict| match v {
        None => "none",
        Some(Verdict::Tie) => "tie",
        Some(x) if x == local => "win",
        Some(_) => "loss",
    };
    Grade {
        score: (f64::from(u8::from(first)) + f64::from(u8::from(second))) / 2.0,
        extracted: Some(format!(
            "{}/{}",
            name(local_first, Verdict::First),
            name(local_second, Verdict::Second)
        )),
    }
}

/// The instructions a judge gets; the IPW harness and MT-Bench ask for the same: compare two
/// answers to one question on helpfulness and correctness, ignore order and length, end with
/// a bracketed verdict.
pub fn judge_prompt(question: &str, first: &str, second: &str) -> String {
    format!(
        "Please act as an impartial judge and compare the two AI assistants' answers to the user \
question below. Judge correctness first, then helpfulness, relevance and detail. Do not let \
the order of the answers, their length or the assistants' names influence you. Explain briefly, \
then give your verdict strictly as \"[[A]]\" if assistant A is better, \"[[B]]\" if assistant B \
is better, or \"[[C]]\" for a tie.\n\n[User Question]\n{question}\n\n\
[The Start of Assistant A's Answer]\n{first}\n[The End of Assistant A's Answer]\n\n\
[The Start of Assistant B's Answer]\n{second}\n[The End of Assistant B's Answer]"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const ABCD: [char; 4] = ['A', 'B', 'C', 'D'];

    // Outputs below marked "gemma" are verbatim replies of the embedded default (Gemma 3 270M
    // base, Q4_K_M, greedy) to routellm/mmlu and routellm/gsm8k prompts, captured with
    // `wattgate profile`; the others are the answer shapes instruction-tuned models give.

    #[test]
    fn multiple_choice_reads_committed_answers() {
        for (output, want) in [
            ("B", Some('B')),
            ("B.", Some('B')),
            (" (C)", Some('C')),
            ("D) 4", Some('D')),
            ("B\n", Some('B')),
            ("**A**", Some('A')),
            ("The answer is (B).", Some('B')),
            ("Let's think. 2+2=4, so the correct answer is C", Some('C')),
            ("Answer: D\nExplanation: ...", Some('D')),
            ("answer is: A", Some('A')),
            // gemma: a bare letter, then the template's continuation
            ("B\nWhich of the following", Some('B')),
        ] {
            assert_eq!(extract_choice(output, &ABCD), want, "{output:?}");
        }
    }

    #[test]
    fn multiple_choice_ignores_echoes_articles_and_out_of_range_letters() {
        for output in [
            // gemma: echoes the question
            "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over",
            // gemma: echoes and starts the options
            "aced by a black hole of the same mass, it would have a Schwarzschild radius of 3",
            // gemma: a letter glued to a word (tokenisation artefact)
            "BButtonClicked\nA. SSL",
            // an article, not an answer
            "A landlord, the owner of a large, high-rise apartment building",
            // gemma: an article before a number
            "A 25-year-old woman comes to the physician because of a",
            // gemma: recites the options (the last one cut by max_tokens)
            "A. Epigenetics enables one gene to produce many different traits.\nB",
            "A. A\nB. B\nC. C\nD. D\n",
            "A. the Indus River Valley Civilization\nB. the Shang Dynasty\nC.",
            "",
            "   \n",
            "E",
            "The answer is E.",
        ] {
            assert_eq!(extract_choice(output, &ABCD), None, "{output:?}");
        }
        assert_eq!(multiple_choice("The answer is B", 'B', &ABCD).score, 1.0);
        assert_eq!(multiple_choice("The answer is B", 'C', &ABCD).score, 0.0);
        let none = multiple_choice("I am not sure.", 'A', &ABCD);
        assert_eq!((none.score, none.extracted), (0.0, None));
    }

    #[test]
    fn option_letters_skip_roman_numeral_statements() {
        let prompt = "A cell nucleus contains which of the following?\nI. DNA\nII. Protein\nIII. RNA\nA. I only\nB. II only\nC. III only\nD. I, II, and III\nAnswer:";
        assert_eq!(option_letters(prompt), ABCD.to_vec());
        let pro = "Q?\nA. a\nB. b\nC. c\nD. d\nE. e\nF. f\nG. g\nH. h\nI. i\nJ. j\nAnswer:";
        assert_eq!(option_letters(pro).len(), 10);
        assert_eq!(option_lines(pro)[9], ('J', "j".to_owned()));
        assert!(option_letters("How many eggs? A. lot").is_empty());
    }

    #[test]
    fn final_number_reads_worked_answers() {
        let reference = "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every day at the farmer’s market.\n#### 18";
        assert_eq!(reference_number(reference).as_deref(), Some("18"));
        for (output, right) in [
            ("She makes 9 * 2 = $18.\n#### 18", true),
            ("The answer is $18.00 per day.", true),
            ("16 - 3 - 4 = 9 eggs, 9 x $2 = $18", true),
            ("So she makes 18 dollars. Then 3 more days...", false),
            ("#### 1,018", false),
            // gemma: echoes the question and trails off into other text
            ("Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her friends every day with four. She sells the remainder at the farmers' market daily for $2 per fresh duck egg. How much in dollars does she make every day at the farmers' market? mendatang\nで購入する\nJan", false),
            ("", false),
        ] {
            assert_eq!(final_number(output, reference).score == 1.0, right, "{output:?}");
        }
        assert_eq!(
            extract_final_number("total: 1,234.50").as_deref(),
            Some("1234.5")
        );
        assert_eq!(
            extract_final_number("it fell -3 degrees").as_deref(),
            Some("-3")
        );
        assert_eq!(extract_final_number("T-3").as_deref(), Some("3"));
        assert_eq!(extract_final_number("no digits"), None);
    }

    #[test]
    fn short_answers_match_after_normalisation() {
        let accepted = ["Paris".to_owned(), "Paris, France".to_owned()];
        assert_eq!(short_answer("Paris.", &accepted).score, 1.0);
        assert_eq!(short_answer("The answer is Paris", &accepted).score, 1.0);
        assert_eq!(
            short_answer("It is PARIS, france!\nmore", &accepted).score,
            1.0
        );
        assert_eq!(short_answer("Parisian", &accepted).score, 0.0);
        // gemma: echoes the question
        let echo = short_answer(
            "What is the capital of France? mendatang\nWhat is the capital",
            &accepted,
        );
        assert_eq!(echo.score, 0.0);
        assert_eq!(short_answer("", &accepted).extracted, None);
        assert_eq!(normalise_text("The  Beatles!"), "beatles");
    }

    #[test]
    fn judge_verdicts_combine_both_orders() {
        assert_eq!(
            parse_verdict("A is more precise. Verdict: [[A]]"),
            Some(Verdict::First)
        );
        assert_eq!(
            parse_verdict("Format: [[A]], [[B]] or [[C]]. My verdict: [[B]]"),
            Some(Verdict::Second)
        );
        assert_eq!(parse_verdict("[[C]]"), Some(Verdict::Tie));
        assert_eq!(parse_verdict("Both are fine."), None);
        assert_eq!(parse_verdict("[[D]] [["), None);
        // local first and wins; local second and ties: win-or-tie in both orders
        let g = judged(Some(Verdict::First), Some(Verdict::Tie));
        assert_eq!((g.score, g.extracted.as_deref()), (1.0, Some("win/tie")));
        // position bias: the judge prefers whichever answer comes first
        let g = judged(Some(Verdict::First), Some(Verdict::First));
        assert_eq!((g.score, g.extracted.as_deref()), (0.5, Some("win/loss")));
        let g = judged(None, Some(Verdict::First));
        assert_eq!((g.score, g.extracted.as_deref()), (0.0, Some("none/loss")));
    }
}
