//! What the router sees of a request: a [`Query`] (the conversation's text, by role) turned into
//! a sparse vector of hashed word n-grams plus a few dense structure measures.
//!
//! Hashed n-grams were chosen over static token embeddings distilled from all-MiniLM-L6-v2 by
//! measurement (see `router-models/README.md`): across held-out sources they ranked queries as
//! well or better, need no vocabulary file, and cost a few microseconds per request.
//!
//! Every function here is deterministic: the same text gives the same vector on every machine,
//! which is what makes `x-wattgate-p-local` equal to `wattgate router score` for the same prompt.

use serde_json::Value;

use crate::wire::text_parts;

/// How much earlier user turns count against the last one (the question being answered now).
const EARLIER_TURN_WEIGHT: f32 = 0.5;
/// How much the system prompt counts.
const SYSTEM_WEIGHT: f32 = 0.3;
/// Tokens read per turn: enough to see what a prompt is about; bounds the cost of huge prompts.
const MAX_TOKENS_PER_TURN: usize = 4096;

/// The routing-relevant text of a conversation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Query {
    /// System (and developer) messages, joined.
    pub system: String,
    /// User turns in order; the last is the one being answered.
    pub user_turns: Vec<String>,
    /// Assistant turns so far.
    pub assistant_turns: usize,
}

impl Query {
    /// A single-turn question, as in the labeled data.
    pub fn from_prompt(prompt: &str) -> Self {
        Self {
            user_turns: vec![prompt.to_owned()],
            ..Self::default()
        }
    }

    /// From an OpenAI `messages` array; text parts of array contents are joined, other parts
    /// (images, audio) are ignored here (the hard constraints see them).
    pub fn from_messages(messages: &[Value]) -> Self {
        let mut query = Self::default();
        for message in messages {
            let role = message.get("role").and_then(Value::as_str).unwrap_or("");
            let text = message
                .get("content")
                .map(|c| text_parts(c).collect::<Vec<_>>().join("\n"))
                .unwrap_or_default();
            match role {
                "system" | "developer" => {
                    if !query.system.is_empty() {
                        query.system.push('\n');
                    }
                    query.system.push_str(&text);
                }
                "user" => query.user_turns.push(text),
                "assistant" => query.assistant_turns += 1,
                _ => {}
            }
        }
        query
    }

    /// The turn being answered ("" when there is none).
    pub fn last_user(&self) -> &str {
        self.user_turns.last().map(String::as_str).unwrap_or("")
    }
}

/// Names of the dense features, in vector order (stored in the router file so a model trained
/// with another list is refused rather than misread).
pub const DENSE_NAMES: [&str; 13] = [
    "ln_chars",
    "ln_words",
    "newline_rate",
    "digit_share",
    "operator_share",
    "code",
    "choice_lines",
    "ln_questions",
    "latex",
    "non_ascii_share",
    "ln_user_turns",
    "ln_system_chars",
    "list_lines",
];

/// Number of dense features.
pub const DENSE: usize = DENSE_NAMES.len();

/// A query as the head reads it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Features {
    /// `(bucket, value)` pairs, buckets ascending and unique, before IDF and normalisation.
    pub sparse: Vec<(u32, f32)>,
    /// Raw dense features (standardised by the model).
    pub dense: [f32; DENSE],
}

/// Extracts features with `buckets` hash buckets (a power of two).
pub fn extract(query: &Query, buckets: u32) -> Features {
    let mut hashes: Vec<(u32, f32)> = Vec::new();
    let last = query.user_turns.len().saturating_sub(1);
    for (i, turn) in query.user_turns.iter().enumerate() {
        let weight = if i == last { 1.0 } else { EARLIER_TURN_WEIGHT };
        push_ngrams(turn, weight, buckets, &mut hashes);
    }
    push_ngrams(&query.system, SYSTEM_WEIGHT, buckets, &mut hashes);
    hashes.sort_unstable_by_key(|&(b, _)| b);
    let mut sparse: Vec<(u32, f32)> = Vec::with_capacity(hashes.len());
    for (bucket, w) in hashes {
        match sparse.last_mut() {
            Some((b, total)) if *b == bucket => *total += w,
            _ => sparse.push((bucket, w)),
        }
    }
    // Sublinear term frequency: the tenth "the" says less than the first. Weights below one
    // (tokens only in earlier turns or the system prompt) stay as they are.
    for (_, v) in &mut sparse {
        if *v > 1.0 {
            *v = 1.0 + v.ln();
        }
    }
    Features {
        sparse,
        dense: dense(query),
    }
}

/// Word unigrams and bigrams of `text`, hashed. Words are lower-cased alphanumeric runs; every
/// other visible character is a token of its own, so `=`, `$`, `{` and `\` count.
fn push_ngrams(text: &str, weight: f32, buckets: u32, out: &mut Vec<(u32, f32)>) {
    let mask = buckets - 1;
    let mut previous: Option<u64> = None;
    let mut word = Fnv::new();
    let mut in_word = false;
    let mut count = 0usize;
    let emit = |h: u64, previous: &mut Option<u64>, out: &mut Vec<(u32, f32)>| {
        out.push(((h as u32) & mask, weight));
        if let Some(p) = *previous {
            let bigram = mix(p.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ h);
            out.push(((bigram as u32) & mask, weight));
        }
        *previous = Some(h);
    };
    for c in text.chars() {
        if count >= MAX_TOKENS_PER_TURN {
            return;
        }
        if c.is_alphanumeric() {
            for l in c.to_lowercase() {
                word.push(l);
            }
            in_word = true;
            continue;
        }
        if in_word {
            emit(mix(word.finish()), &mut previous, out);
            word = Fnv::new();
            in_word = false;
            count += 1;
        }
        if !c.is_whitespace() {
            let mut symbol = Fnv::new();
            symbol.push(c);
            emit(mix(symbol.finish() ^ 0x5bd1_e995), &mut previous, out);
            count += 1;
        }
    }
    if in_word && count < MAX_TOKENS_PER_TURN {
        emit(mix(word.finish()), &mut previous, out);
    }
}

/// FNV-1a over UTF-8 bytes: stable across platforms and releases (std's hasher is not).
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
    fn push(&mut self, c: char) {
        let mut buf = [0u8; 4];
        for &b in c.encode_utf8(&mut buf).as_bytes() {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// FNV-1a of `text` through the splitmix finaliser: the same 64 bits on every platform and
/// release, for anything that must hash text reproducibly.
pub fn stable_hash(text: &str) -> u64 {
    let mut h = Fnv::new();
    for c in text.chars() {
        h.push(c);
    }
    mix(h.finish())
}

/// A finaliser (splitmix64's) so the low bits used as the bucket are well mixed.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Structure measures of the last user turn (and the conversation's shape).
fn dense(query: &Query) -> [f32; DENSE] {
    let text = query.last_user();
    let mut chars = 0usize;
    let mut digits = 0usize;
    let mut operators = 0usize;
    let mut non_ascii = 0usize;
    let mut questions = 0usize;
    let mut newlines = 0usize;
    for c in text.chars() {
        chars += 1;
        match c {
            '0'..='9' => digits += 1,
            '=' | '+' | '-' | '*' | '/' | '^' | '<' | '>' => operators += 1,
            '?' => questions += 1,
            '\n' => newlines += 1,
            _ => {}
        }
        if !c.is_ascii() {
            non_ascii += 1;
        }
    }
    let words = text.split_whitespace().count();
    let mut choice_lines = 0usize;
    let mut list_lines = 0usize;
    let mut code = false;
    for line in text.lines() {
        let t = line.trim_start();
        let b = t.as_bytes();
        if b.len() >= 2 && (b'A'..=b'J').contains(&b[0]) && (b[1] == b'.' || b[1] == b')') {
            choice_lines += 1;
        }
        if t.starts_with("- ") || t.starts_with("* ") || starts_numbered(t) {
            list_lines += 1;
        }
        if t.starts_with("```")
            || t.starts_with("def ")
            || t.starts_with("class ")
            || t.starts_with("import ")
            || t.starts_with("#include")
            || t.starts_with("fn ")
            || t.ends_with(';')
            || t.ends_with('{')
        {
            code = true;
        }
    }
    let latex = text.contains("\\frac") || text.contains("\\sqrt") || text.contains('$');
    let per = |n: usize| n as f32 / (1.0 + chars as f32);
    [
        (1.0 + chars as f32).ln(),
        (1.0 + words as f32).ln(),
        newlines as f32 / (1.0 + chars as f32 / 80.0),
        per(digits),
        per(operators),
        f32::from(u8::from(code)),
        (1.0 + choice_lines as f32).ln(),
        (1.0 + questions as f32).ln(),
        f32::from(u8::from(latex)),
        per(non_ascii),
        (1.0 + query.user_turns.len() as f32).ln(),
        (1.0 + query.system.chars().count() as f32).ln(),
        (1.0 + list_lines as f32).ln(),
    ]
}

fn starts_numbered(t: &str) -> bool {
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    digits > 0 && digits <= 3 && t[digits..].starts_with(". ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_become_a_query_by_role() {
        let messages: Vec<Value> = serde_json::from_str(
            r#"[{"role":"system","content":"Be terse."},
                {"role":"user","content":"hi"},
                {"role":"assistant","content":"hello"},
                {"role":"user","content":[{"type":"text","text":"what is 2+2?"},{"type":"image_url","image_url":{"url":"x"}}]}]"#,
        )
        .unwrap_or_default();
        let q = Query::from_messages(&messages);
        assert_eq!(q.system, "Be terse.");
        assert_eq!(q.user_turns, vec!["hi", "what is 2+2?"]);
        assert_eq!(q.assistant_turns, 1);
        assert_eq!(q.last_user(), "what is 2+2?");
    }

    #[test]
    fn features_are_deterministic_sorted_and_case_blind() {
        let a = extract(&Query::from_prompt("Solve x^2 = 4. Solve it!"), 1 << 16);
        let b = extract(&Query::from_prompt("solve X^2 = 4. SOLVE it!"), 1 << 16);
        assert_eq!(a.sparse, b.sparse);
        assert!(a.sparse.windows(2).all(|w| w[0].0 < w[1].0));
        // "solve" twice: 1 + ln 2.
        let solve = extract(&Query::from_prompt("solve"), 1 << 16).sparse[0].0;
        let v = a.sparse.iter().find(|(k, _)| *k == solve).map(|p| p.1);
        assert_eq!(v, Some(1.0 + 2f32.ln()));
    }

    #[test]
    fn structure_measures_see_choices_code_and_math() {
        let mc = extract(
            &Query::from_prompt("Pick one\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"),
            16,
        );
        assert!((mc.dense[6] - 5f32.ln()).abs() < 1e-6);
        let code = extract(&Query::from_prompt("def f(x):\n    return x"), 16);
        assert_eq!(code.dense[5], 1.0);
        let math = extract(&Query::from_prompt("Find $\\frac{1}{2}$"), 16);
        assert_eq!(math.dense[8], 1.0);
        let empty = extract(&Query::default(), 16);
        assert!(empty.sparse.is_empty() && empty.dense.iter().all(|v| v.is_finite()));
    }
}
