//! Reading an upstream's answer for the quality guard without decoding it.
//!
//! The guard needs four things of a completion body or stream chunk: the sampled tokens'
//! `logprob`s, `finish_reason`, whether there is any text, and (when the client did not ask for
//! log-probabilities) the byte spans of each choice's `logprobs`, to blank them. A body with
//! log-probabilities is mostly those log-probabilities (about 90 bytes a token), so decoding it
//! with serde (even into borrowed raw values, then once more for the numbers) costs several
//! times the guard's whole budget of 20 µs. This is one forward walk over the bytes instead: the
//! fields it wants are read where they stand, everything else is skipped by matching brackets
//! and strings, and nothing is allocated but the list of numbers.
//!
//! Keys are compared as they are written; OpenAI-compatible servers write these plain ASCII
//! keys unescaped. A body that is not well-formed where the walk goes reads as empty, like a
//! body that is not a completion.

/// What the quality guard reads of a completion body or stream chunk (first choice).
#[derive(Debug, Default, PartialEq)]
pub struct AnswerPeek {
    /// `choices[0].logprobs.content[].logprob`, when the body carries them.
    pub logprobs: Option<Vec<f32>>,
    /// `choices[0].finish_reason`, when set.
    pub finish_reason: Option<String>,
    /// `choices[0]` carries text (`message.content` or `delta.content` not empty).
    pub has_content: bool,
}

/// Reads `logprobs` and `finish_reason` of the first choice, skipping everything else; a body
/// that is not a completion reads as empty.
pub fn answer_peek(json: &[u8]) -> AnswerPeek {
    read_answer(json, false).0
}

/// The body with every choice's `logprobs` set to `null`, as OpenAI answers a client that did
/// not ask for them; `None` when nothing needed changing (or the body is not JSON).
pub fn without_logprobs(json: &[u8]) -> Option<Vec<u8>> {
    read_answer(json, true).1
}

/// One pass over a completion body or stream chunk for the quality guard: what
/// [`answer_peek`] reads and, with `strip`, the body with each choice's `logprobs` value
/// replaced by `null` in place (the rest of the bytes untouched, so nothing is re-encoded).
pub fn read_answer(json: &[u8], strip: bool) -> (AnswerPeek, Option<Vec<u8>>) {
    let mut walk = Walk {
        b: json,
        at: 0,
        peek: AnswerPeek::default(),
        spans: Vec::new(),
    };
    if walk.body().is_none() {
        return (AnswerPeek::default(), None);
    }
    let stripped = (strip && !walk.spans.is_empty()).then(|| {
        let mut out = Vec::with_capacity(json.len());
        let mut at = 0;
        for &(start, end) in &walk.spans {
            out.extend_from_slice(&json[at..start]);
            out.extend_from_slice(b"null");
            at = end;
        }
        out.extend_from_slice(&json[at..]);
        out
    });
    (walk.peek, stripped)
}

/// The walk's position in the bytes and what it has read so far. Every method returns `None`
/// on bytes that are not the JSON it expects there.
struct Walk<'a> {
    b: &'a [u8],
    at: usize,
    peek: AnswerPeek,
    /// Byte spans of every choice's `logprobs` value.
    spans: Vec<(usize, usize)>,
}

impl Walk<'_> {
    /// `{"choices": [choice, ...], ...}` and nothing after it.
    fn body(&mut self) -> Option<()> {
        self.object(|w, key| {
            if key == b"choices" && w.next_is(b'[') {
                w.array(|w, i| w.choice(i == 0))
            } else {
                w.skip_value()
            }
        })?;
        self.ws();
        (self.at == self.b.len()).then_some(())
    }

    /// One choice; only the first one's fields are read, every one's `logprobs` span is kept.
    fn choice(&mut self, first: bool) -> Option<()> {
        if !self.next_is(b'{') {
            return self.skip_value();
        }
        self.object(|w, key| match key {
            b"logprobs" => {
                let start = w.at;
                if first && w.next_is(b'{') {
                    w.peek.logprobs = w.logprobs()?;
                } else {
                    w.skip_value()?;
                }
                w.spans.push((start, w.at));
                Some(())
            }
            b"finish_reason" if first && w.next_is(b'"') => {
                let (start, end) = w.string()?;
                let raw = std::str::from_utf8(&w.b[start..end]).ok()?;
                w.peek.finish_reason = Some(unescape(raw)?);
                Some(())
            }
            b"message" | b"delta" if first && w.next_is(b'{') => w.object(|w, key| {
                if key != b"content" {
                    return w.skip_value();
                }
                let start = w.at;
                w.skip_value()?;
                // A non-empty string (more than its two quotes) or an array of parts.
                let value = &w.b[start..w.at];
                w.peek.has_content |= (value.first() == Some(&b'"') && value.len() > 2)
                    || value.first() == Some(&b'[');
                Some(())
            }),
            _ => w.skip_value(),
        })
    }

    /// `{"content": [{"logprob": n, ...}, ...], ...}`: the sampled tokens' numbers, or `None`
    /// for the value when `content` is absent, `null`, or a token lacks a numeric `logprob`.
    fn logprobs(&mut self) -> Option<Option<Vec<f32>>> {
        let mut found = None;
        self.object(|w, key| {
            if key == b"content" && w.next_is(b'[') {
                found = w.token_logprobs()?;
                Some(())
            } else {
                w.skip_value()
            }
        })?;
        Some(found)
    }

    /// The `content` array of token objects, in one pass of the bracket count that
    /// [`Walk::skip_value`] uses, reading the `logprob` key of each element (depth 2) and
    /// nothing nested deeper (`top_logprobs`' entries have `logprob`s of their own).
    fn token_logprobs(&mut self) -> Option<Option<Vec<f32>>> {
        let b = self.b;
        let mut i = self.at;
        let mut depth = 0usize;
        let mut numbers = Vec::with_capacity(256);
        let mut whole = true;
        // Inside a token object: whether the next string is a key, and whether it had its number.
        let mut key_next = false;
        let mut has_number = false;
        // Elements of the array (commas between them) and token objects among them.
        let mut commas = 0usize;
        let mut objects = 0usize;
        loop {
            // Plain bytes (digits of `bytes` arrays, spaces) in a tight loop of their own.
            i += b
                .get(i..)?
                .iter()
                .position(|&c| CLASS[usize::from(c)] != PLAIN)?;
            let c = b[i];
            match CLASS[usize::from(c)] {
                QUOTE => {
                    let start = i + 1;
                    let end = self.string_end(start)?;
                    i = end + 1;
                    if depth == 2 && key_next {
                        key_next = false;
                        if &b[start..end] == b"logprob" {
                            let (number, after) = number_after_colon(b, i)?;
                            if let (Some(n), false) = (number, has_number) {
                                numbers.push(n);
                                has_number = true;
                            }
                            i = after;
                        }
                    }
                    continue;
                }
                OPEN => {
                    depth += 1;
                    if depth == 2 {
                        key_next = c == b'{';
                        has_number = false;
                        whole &= key_next;
                        objects += 1;
                    }
                }
                CLOSE => {
                    if depth == 2 {
                        whole &= has_number;
                    }
                    depth = depth.checked_sub(1)?;
                    if depth == 0 {
                        // Every element must have been a token object: a bare number or string
                        // among them is not a token.
                        let inside = &b[self.at + 1..i];
                        let elements = if inside.iter().all(u8::is_ascii_whitespace) {
                            0
                        } else {
                            commas + 1
                        };
                        self.at = i + 1;
                        return Some((whole && objects == elements).then_some(numbers));
                    }
                }
                COMMA => {
                    key_next |= depth == 2;
                    commas += usize::from(depth == 1);
                }
                _ => {}
            }
            i += 1;
        }
    }

    /// Walks `{ "key": value, ... }`, handing each key's raw bytes to `field`, which must consume
    /// the value.
    fn object(&mut self, mut field: impl FnMut(&mut Self, &[u8]) -> Option<()>) -> Option<()> {
        self.expect(b'{')?;
        self.ws();
        if self.eat(b'}') {
            return Some(());
        }
        loop {
            self.ws();
            let (start, end) = self.string()?;
            self.ws();
            self.expect(b':')?;
            self.ws();
            let key = &self.b[start..end];
            field(self, key)?;
            self.ws();
            if self.eat(b',') {
                continue;
            }
            return self.expect(b'}');
        }
    }

    /// Walks `[ value, ... ]`, handing each element's index to `element`, which must consume it.
    fn array(&mut self, mut element: impl FnMut(&mut Self, usize) -> Option<()>) -> Option<()> {
        self.expect(b'[')?;
        self.ws();
        if self.eat(b']') {
            return Some(());
        }
        let mut i = 0;
        loop {
            self.ws();
            element(self, i)?;
            i += 1;
            self.ws();
            if self.eat(b',') {
                continue;
            }
            return self.expect(b']');
        }
    }

    /// Skips one value of any kind. Containers are skipped by counting brackets outside
    /// strings, without looking inside; the walk reads them only where it needs to.
    fn skip_value(&mut self) -> Option<()> {
        match self.b.get(self.at)? {
            b'"' => self.string().map(drop),
            b'{' | b'[' => {
                // One class lookup a byte: almost every byte is plain and costs one predicted
                // branch.
                let mut depth = 0usize;
                let mut in_string = false;
                let mut i = self.at;
                while let Some(&c) = self.b.get(i) {
                    match (CLASS[usize::from(c)], in_string) {
                        (PLAIN, _) => {}
                        (QUOTE, s) => in_string = !s,
                        (ESCAPE, true) => i += 1,
                        (OPEN, false) => depth += 1,
                        (CLOSE, false) => {
                            depth = depth.checked_sub(1)?;
                            if depth == 0 {
                                self.at = i + 1;
                                return Some(());
                            }
                        }
                        _ => {}
                    }
                    i += 1;
                }
                None
            }
            _ => self.scalar().map(drop),
        }
    }

    /// A number, `true`, `false` or `null`: its span, up to the next delimiter.
    fn scalar(&mut self) -> Option<(usize, usize)> {
        let start = self.at;
        while let Some(&c) = self.b.get(self.at) {
            if matches!(c, b',' | b'}' | b']' | b' ' | b'\n' | b'\r' | b'\t') {
                break;
            }
            self.at += 1;
        }
        (self.at > start).then_some((start, self.at))
    }

    /// A string at the cursor: the span between its quotes (escapes left as written).
    fn string(&mut self) -> Option<(usize, usize)> {
        self.expect(b'"')?;
        let start = self.at;
        let end = self.string_end(start)?;
        self.at = end + 1;
        Some((start, end))
    }

    /// The index of the closing quote of a string whose contents start at `from`. Most strings
    /// here are a few bytes (keys, tokens), so a plain loop beats a vectorised search.
    fn string_end(&self, mut from: usize) -> Option<usize> {
        loop {
            from += self
                .b
                .get(from..)?
                .iter()
                .position(|&c| c == b'"' || c == b'\\')?;
            if self.b[from] == b'"' {
                return Some(from);
            }
            // An escape: the next byte is part of it, whatever it is.
            from += 2;
        }
    }

    fn ws(&mut self) {
        while matches!(self.b.get(self.at), Some(b' ' | b'\n' | b'\r' | b'\t')) {
            self.at += 1;
        }
    }

    fn next_is(&self, c: u8) -> bool {
        self.b.get(self.at) == Some(&c)
    }

    fn eat(&mut self, c: u8) -> bool {
        let yes = self.next_is(c);
        self.at += usize::from(yes);
        yes
    }

    fn expect(&mut self, c: u8) -> Option<()> {
        self.eat(c).then_some(())
    }
}

const PLAIN: u8 = 0;
const QUOTE: u8 = 1;
const ESCAPE: u8 = 2;
const OPEN: u8 = 3;
const CLOSE: u8 = 4;
const COMMA: u8 = 5;

/// What each byte means to [`Walk::skip_value`]'s bracket count.
static CLASS: [u8; 256] = {
    let mut t = [PLAIN; 256];
    t[b'"' as usize] = QUOTE;
    t[b'\\' as usize] = ESCAPE;
    t[b'{' as usize] = OPEN;
    t[b'[' as usize] = OPEN;
    t[b'}' as usize] = CLOSE;
    t[b']' as usize] = CLOSE;
    t[b',' as usize] = COMMA;
    t
};

/// After a key that ends before `at`: `: <number>`. The number (`None` when the value is not
/// one: `null`, a string; the walk then skips it as it skips any value) and where it ends.
fn number_after_colon(b: &[u8], mut at: usize) -> Option<(Option<f32>, usize)> {
    while b.get(at).is_some_and(u8::is_ascii_whitespace) {
        at += 1;
    }
    (b.get(at) == Some(&b':')).then_some(())?;
    at += 1;
    while b.get(at).is_some_and(u8::is_ascii_whitespace) {
        at += 1;
    }
    let from = at;
    while b
        .get(at)
        .is_some_and(|c| matches!(c, b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'))
    {
        at += 1;
    }
    let number = std::str::from_utf8(&b[from..at])
        .ok()
        .and_then(|s| s.parse::<f32>().ok());
    Some((number, at))
}

/// A JSON string's contents as written (between the quotes) decoded; `finish_reason` is short,
/// and serde does the escapes.
fn unescape(raw: &str) -> Option<String> {
    if !raw.contains('\\') {
        return Some(raw.to_owned());
    }
    serde_json::from_str(&format!("\"{raw}\"")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    /// What the walk must agree with: the same fields read by decoding the whole body.
    fn decoded(body: &[u8]) -> AnswerPeek {
        let Ok(v) = serde_json::from_slice::<Value>(body) else {
            return AnswerPeek::default();
        };
        let Some(c) = v.get("choices").and_then(|c| c.get(0)) else {
            return AnswerPeek::default();
        };
        let logprobs = c
            .pointer("/logprobs/content")
            .and_then(Value::as_array)
            .and_then(|t| {
                t.iter()
                    .map(|t| t.get("logprob").and_then(Value::as_f64).map(|x| x as f32))
                    .collect()
            });
        let has_content = ["message", "delta"].iter().any(|k| {
            c.get(k)
                .and_then(|m| m.get("content"))
                .is_some_and(|t| t.as_str().is_some_and(|s| !s.is_empty()) || t.is_array())
        });
        AnswerPeek {
            logprobs,
            finish_reason: c
                .get("finish_reason")
                .and_then(Value::as_str)
                .map(str::to_owned),
            has_content,
        }
    }

    fn token(t: &str, l: f64) -> Value {
        json!({"token": t, "logprob": l, "bytes": t.as_bytes(),
            "top_logprobs": [{"token": "x", "logprob": -9.5, "bytes": [120]}]})
    }

    #[test]
    fn agrees_with_a_full_decode_and_blanks_only_the_logprobs() {
        let bodies = [
            json!({"id": "c", "choices": [{"index": 0, "message": {"role": "assistant", "content": "he said \"hi\" {["},
                "logprobs": {"content": [token("he", -0.25), token(" said", -1.5e-3), token(" \"", -12.0)], "refusal": null},
                "finish_reason": "stop"}], "usage": {"prompt_tokens": 3}}),
            // A stream chunk; the second choice's logprobs are blanked too but not read.
            json!({"choices": [{"delta": {"content": "a"}, "logprobs": {"content": [token("a", -0.5)]}, "finish_reason": null},
                {"delta": {"content": "b"}, "logprobs": {"content": [token("b", -3.0)]}}]}),
            json!({"choices": [{"message": {"content": ""}, "logprobs": null, "finish_reason": "len\\u0067th"}]}),
            json!({"choices": [{"message": {"content": [{"type": "text", "text": "x"}]}, "logprobs": {"content": null}}]}),
            // A token without a number: no signal rather than a shorter list.
            json!({"choices": [{"message": {"content": "x"}, "logprobs": {"content": [{"token": "x", "logprob": null}]}}]}),
            // Long texts full of structural bytes and escapes.
            json!({"choices": [{"message": {"content": "[{\"a\": 1}, ] \\ ,".repeat(30)},
                "logprobs": {"content": (0..40).map(|i| token(&"}\"\\[,".repeat(i % 7), -(i as f64) / 8.0)).collect::<Vec<_>>()},
                "finish_reason": "stop"}]}),
            json!({"choices": []}),
            json!({"object": "list"}),
        ];
        for body in bodies {
            for text in [
                body.to_string(),
                serde_json::to_string_pretty(&body).unwrap_or_default(),
            ] {
                let bytes = text.as_bytes();
                let (peek, stripped) = read_answer(bytes, true);
                assert_eq!(peek, decoded(bytes), "{text}");
                let mut expected = body.clone();
                let mut changed = false;
                for c in expected["choices"].as_array_mut().into_iter().flatten() {
                    if let Some(l) = c.get_mut("logprobs") {
                        *l = Value::Null;
                        changed = true;
                    }
                }
                match stripped {
                    Some(s) => {
                        assert!(changed, "{text}");
                        let v: Value = serde_json::from_slice(&s).unwrap_or_default();
                        assert_eq!(v, expected, "{text}");
                    }
                    None => assert!(!changed, "{text}"),
                }
            }
        }
    }

    #[test]
    fn malformed_bodies_read_as_empty() {
        for bad in [
            &b""[..],
            b"not json",
            b"{\"choices\": [",
            b"{\"choices\": [{\"logprobs\": {\"content\": [{\"logprob\": -1}]}}]",
            b"{\"choices\": [{\"finish_reason\": \"stop}]}",
            b"{\"choices\": []} trailing",
            b"{\"choices\": [{\"logprobs\": ]}]}",
            b"\"just a string\"",
        ] {
            assert_eq!(
                read_answer(bad, true),
                (AnswerPeek::default(), None),
                "{bad:?}"
            );
        }
    }
}
