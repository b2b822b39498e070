//! One query of a profile: sent to the measured backend, timed, metered, graded, and written as
//! the record the router and the guard are trained on.

use std::time::Instant;

use anyhow::{anyhow, bail};
use futures::StreamExt;
use serde_json::{json, Value};

use super::files::Query;
use super::grade::{self, Grade, GraderKind};
use super::references::Reference;
use super::{Backends, Measurement, QueryRecord};
use crate::backends::{count_tokens, Backend, BackendError, Reply};
use crate::metering::{EnergySource, Metering, Tokens};
use crate::wire::{generated_text, ChatRequest};

/// Everything one query needs, shared by the concurrent queries.
pub(super) struct Runner<'a> {
    pub(super) backends: &'a Backends,
    pub(super) metering: &'a Metering,
    pub(super) index: usize,
    pub(super) backend: &'a dyn Backend,
    pub(super) max_tokens: Option<u32>,
    pub(super) source: EnergySource,
    pub(super) model: &'a str,
    pub(super) router: Option<&'a crate::router::model::RouterModel>,
    pub(super) guard_head: Option<&'a crate::guard::GuardHead>,
}

impl Runner<'_> {
    pub(super) async fn profile_one(
        &self,
        q: Query,
        grader: GraderKind,
        reference: Option<Reference>,
    ) -> Result<QueryRecord, (String, anyhow::Error)> {
        let id = q.id.clone();
        self.profile(q, grader, reference)
            .await
            .map_err(|e| (id, e))
    }

    async fn profile(
        &self,
        q: Query,
        grader: GraderKind,
        reference: Option<Reference>,
    ) -> anyhow::Result<QueryRecord> {
        let request = chat_request(&q.messages, self.max_tokens, true)?;
        let ticket = self.metering.begin_measured();
        let sent = Instant::now();
        let answer = match self.backend.chat(&request).await {
            Ok(Reply::Stream(opened)) => {
                let ttft = sent.elapsed();
                collect_stream(opened).await.map(|c| (c, ttft))
            }
            Ok(Reply::Complete(c)) => {
                let mut text = String::new();
                generated_text(&c.body, &mut text);
                let collected = Collected {
                    text,
                    usage: c.usage,
                    finish_reason: crate::wire::answer_peek(&c.body).finish_reason,
                    logprobs: c.logprobs,
                };
                Ok((collected, sent.elapsed()))
            }
            Err(e) => Err(e),
        };
        let (output, usage, ttft, error, signals) = match answer {
            Ok((c, ttft)) => {
                let signals = c.logprobs.as_deref().and_then(|l| {
                    crate::guard::Signals::from_logprobs(l, c.finish_reason.as_deref())
                });
                (c.text, c.usage, ttft, None, signals)
            }
            Err(e @ (BackendError::ContextTooLong { .. } | BackendError::Unsupported { .. })) => (
                String::new(),
                None,
                sent.elapsed(),
                Some(e.to_string()),
                None,
            ),
            Err(e) => {
                let _ = self
                    .metering
                    .end_measured(ticket, self.index, Tokens::default());
                return Err(e.into());
            }
        };
        let latency = sent.elapsed();
        let (tokens, tokens_source) = match usage {
            Some(u) => (
                Tokens {
                    input: u.prompt_tokens,
                    output: u.completion_tokens,
                },
                "usage",
            ),
            None => {
                let (input, source) = count_tokens(&self.backends.all, 0, &q.prompt);
                let (output, _) = count_tokens(&self.backends.all, 0, &output);
                (Tokens { input, output }, source)
            }
        };
        let bill = self.metering.end_measured(ticket, self.index, tokens);
        let joules = if self.source == EnergySource::CloudEstimate {
            bill.cloud_joules
        } else {
            bill.local_joules
        };
        let grade = if error.is_some() {
            Grade {
                score: 0.0,
                extracted: None,
            }
        } else {
            self.grade(&q, grader, reference.as_ref(), &output).await?
        };
        let p_local = self
            .router
            .map(|r| r.score(&crate::router::features::Query::from_prompt(&q.prompt)));
        let confidence = signals.map(|s| match self.guard_head {
            Some(h) => h.confidence(&s, p_local),
            None => crate::guard::head::rule_confidence(&s),
        });
        let mut scores = q.scores;
        scores.insert(self.model.to_owned(), grade.score);
        let seconds = latency.as_secs_f64();
        Ok(QueryRecord {
            id: q.id,
            source: q.source,
            category: q.category,
            prompt: q.prompt,
            scores,
            profile: Measurement {
                model: self.model.to_owned(),
                grader,
                score: grade.score,
                correct: grade.score >= 0.5,
                extracted: grade.extracted,
                reference: reference
                    .as_ref()
                    .map(Reference::describe)
                    .or_else(|| (!q.answers.is_empty()).then(|| q.answers.join(" | "))),
                output,
                input_tokens: tokens.input,
                output_tokens: tokens.output,
                tokens_source: tokens_source.to_owned(),
                latency_s: seconds,
                ttft_s: ttft.as_secs_f64(),
                joules,
                watts: if seconds > 0.0 { joules / seconds } else { 0.0 },
                energy_source: self.source.as_str().to_owned(),
                measured: self.source.is_measured(),
                error,
                signals,
                p_local,
                confidence,
            },
        })
    }

    async fn grade(
        &self,
        q: &Query,
        grader: GraderKind,
        reference: Option<&Reference>,
        output: &str,
    ) -> anyhow::Result<Grade> {
        Ok(match (grader, reference) {
            (GraderKind::MultipleChoice, Some(Reference::Letter { letter, letters })) => {
                grade::multiple_choice(output, *letter, letters)
            }
            (GraderKind::FinalNumber, Some(Reference::Number(n))) => grade::final_number(output, n),
            (GraderKind::FinalNumber, Some(Reference::Texts(t))) => {
                grade::final_number(output, t.first().map_or("", String::as_str))
            }
            (GraderKind::ShortAnswer, Some(r)) => {
                let accepted = match r {
                    Reference::Texts(t) => t.clone(),
                    other => vec![other.describe()],
                };
                grade::short_answer(output, &accepted)
            }
            (GraderKind::Judge, _) => self.judge(q, output).await?,
            (g, _) => bail!(
                "row `{}`: no reference answer for the {} grader",
                q.id,
                g.as_str()
            ),
        })
    }

    /// Win-or-tie against the reference answer, asked in both orders.
    async fn judge(&self, q: &Query, output: &str) -> anyhow::Result<Grade> {
        let Some((_, judge)) = &self.backends.judge else {
            bail!("no --judge backend");
        };
        let reference = if q.answers.is_empty() {
            let Some((_, model)) = &self.backends.reference else {
                bail!(
                    "row `{}` has no reference answer for the judge: add `answer` to the row or pass --reference-model",
                    q.id
                );
            };
            complete(model.as_ref(), &q.messages, None).await?
        } else {
            q.answers.join("\n")
        };
        let ask = |first: &str, second: &str| {
            vec![json!({"role": "user", "content": grade::judge_prompt(&q.prompt, first, second)})]
        };
        let local_first = complete(judge.as_ref(), &ask(output, &reference), Some(512)).await?;
        let local_second = complete(judge.as_ref(), &ask(&reference, output), Some(512)).await?;
        Ok(grade::judged(
            grade::parse_verdict(&local_first),
            grade::parse_verdict(&local_second),
        ))
    }
}

/// A non-streamed answer's text.
async fn complete(
    backend: &dyn Backend,
    messages: &[Value],
    max_tokens: Option<u32>,
) -> anyhow::Result<String> {
    let request = chat_request(messages, max_tokens, false)?;
    let mut text = String::new();
    match backend.chat(&request).await? {
        Reply::Complete(c) => generated_text(&c.body, &mut text),
        Reply::Stream(opened) => text = collect_stream(opened).await?.text,
    }
    Ok(text)
}

/// What a stream read to its end carried.
#[derive(Debug, Default)]
pub(crate) struct Collected {
    /// The answer's text.
    pub text: String,
    /// The usage chunk's counts, if sent.
    pub usage: Option<crate::wire::Usage>,
    /// The sampled tokens' ln P, when the backend gave any.
    pub logprobs: Option<Vec<f32>>,
    /// The last `finish_reason` seen.
    pub finish_reason: Option<String>,
}

/// Reads a stream to its end.
pub(crate) async fn collect_stream(
    opened: crate::backends::OpenedStream,
) -> Result<Collected, BackendError> {
    let mut out = Collected::default();
    let mut take = |chunk: &crate::backends::Chunk| -> Result<(), BackendError> {
        if chunk.is_error {
            return Err(BackendError::Protocol {
                detail: format!(
                    "error in the stream: {}",
                    String::from_utf8_lossy(&chunk.data)
                ),
            });
        }
        generated_text(&chunk.data, &mut out.text);
        if chunk.usage.is_some() {
            out.usage = chunk.usage;
        }
        if let Some(lp) = &chunk.logprobs {
            out.logprobs.get_or_insert_with(Vec::new).extend(lp);
        }
        if let Some(f) = crate::wire::answer_peek(&chunk.data).finish_reason {
            out.finish_reason = Some(f);
        }
        Ok(())
    };
    take(&opened.first)?;
    let mut rest = opened.rest;
    while let Some(chunk) = rest.next().await {
        take(&chunk?)?;
    }
    Ok(out)
}

/// A deterministic request (temperature 0) as the gateway would forward it.
pub(super) fn chat_request(
    messages: &[Value],
    max_tokens: Option<u32>,
    stream: bool,
) -> anyhow::Result<ChatRequest> {
    let mut body = json!({
        "model": "profile",
        "messages": messages,
        "temperature": 0,
        "stream": stream,
    });
    if stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    if let Some(n) = max_tokens {
        body["max_tokens"] = json!(n);
    }
    let mut request =
        ChatRequest::parse(&serde_json::to_vec(&body)?).map_err(|e| anyhow!("{}", e.message))?;
    // Record the signals the quality guard would read of the same answer.
    request.set_wants_signals(true);
    Ok(request)
}
