//! The quality guard's side of the pipeline: a whole local answer judged and returned or
//! replaced ([`Accounts::check_complete`]), and a local stream held, judged, and released or
//! replaced by the cloud's stream ([`held_stream`]). What the guard decides lives in
//! [`crate::guard`]; this is what the gateway does with it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};

use super::stream::sse_frame;
use super::{client_stream, Accounts, Route, RouteGuard};
use crate::backends::{BackendError, Chunk, ChunkStream, Reply};
use crate::guard::{Decision as GuardDecision, Plan, Verdict};
use crate::metering::Tokens;
use crate::metering::{GuardLeg, Outcome, RequestMeter};
use crate::router::{Decision, Reason};
use crate::wire::ChatRequest;

impl Accounts {
    /// The guard's check of a whole local answer: returned as it is, or replaced by the cloud's
    /// answer to the same request. Returns the backend whose answer the client gets, and the
    /// body; `route` and `meter` are updated to match.
    pub(super) async fn check_complete(
        &self,
        request: &ChatRequest,
        plan: &Plan,
        decision: Decision,
        completion: crate::backends::Completion,
        route: &mut Route,
        meter: &mut RequestMeter,
    ) -> (usize, Bytes) {
        let finish = crate::wire::answer_peek(&completion.body).finish_reason;
        let verdict = self.guard.judge(
            decision.backend,
            plan,
            completion.logprobs.as_deref(),
            finish.as_deref(),
            decision.p_local,
        );
        let local_tokens = completion.usage.map_or_else(
            || Tokens {
                input: 0,
                output: completion.logprobs.as_ref().map_or(0, |l| l.len() as u64),
            },
            |u| Tokens {
                input: u.prompt_tokens,
                output: u.completion_tokens,
            },
        );
        let mut outcome = if verdict.confidence.is_none() {
            GuardDecision::NoSignal
        } else if verdict.escalate {
            GuardDecision::Escalated
        } else {
            GuardDecision::Pass
        };
        if outcome == GuardDecision::Escalated {
            match self.escalate(request, route, &verdict).await {
                Ok(Reply::Complete(cloud)) => {
                    let served = self.cloud.unwrap_or(decision.backend);
                    // A cloud answer needs no shadow check.
                    meter.answer = None;
                    meter.delivered_whole(&cloud);
                    meter.guard = Some(GuardLeg {
                        decision: outcome,
                        verdict: Some(verdict),
                        local: Some(decision.backend),
                        local_tokens,
                    });
                    return (served, cloud.body);
                }
                Ok(Reply::Stream(_)) | Err(_) => outcome = GuardDecision::EscalationFailed,
            }
        }
        route.guard = Some(RouteGuard {
            decision: outcome.as_str(),
            confidence: verdict.confidence,
        });
        meter.delivered_whole(&completion);
        meter.guard = Some(GuardLeg {
            decision: outcome,
            verdict: Some(verdict),
            local: Some(decision.backend),
            local_tokens,
        });
        (decision.backend, completion.body)
    }

    /// Asks the cloud for the answer to a request whose local answer was found doubtful, and
    /// rewrites `route` to what the client gets: the cloud's answer
    /// (`escalated_low_confidence`), or, when the cloud fails, the held local answer
    /// (`escalation_failed`).
    async fn escalate(
        &self,
        request: &ChatRequest,
        route: &mut Route,
        verdict: &Verdict,
    ) -> Result<Reply, BackendError> {
        let Some(cloud) = self.cloud else {
            route.reason = Reason::EscalationFailed;
            return Err(BackendError::NotConfigured {
                detail: "no cloud backend to escalate to".to_owned(),
            });
        };
        let result = self.attempt(cloud, request).await;
        let usable = matches!(
            (&result, request.stream),
            (Ok(Reply::Complete(_)), false) | (Ok(Reply::Stream(_)), true)
        );
        if usable {
            let to = self.backends[cloud].info();
            route.fallback_from = Some(route.backend.clone());
            route.role = to.role;
            route.backend = to.name.clone();
            route.reason = Reason::EscalatedLowConfidence;
            route.guard = Some(RouteGuard {
                decision: GuardDecision::Escalated.as_str(),
                confidence: verdict.confidence,
            });
        } else {
            if let Err(e) = &result {
                tracing::warn!(
                    local = %route.backend,
                    cloud = %self.backends[cloud].info().name,
                    error = %e,
                    "escalation to the cloud failed; serving the held local answer"
                );
            }
            route.reason = Reason::EscalationFailed;
        }
        result
    }
}

/// A local stream under `[guard] stream = "hold"`, with what is needed to judge, release or
/// replace it.
pub(super) struct Held {
    pub(super) accounts: Arc<Accounts>,
    pub(super) request: Arc<ChatRequest>,
    pub(super) plan: Plan,
    pub(super) decision: Decision,
    pub(super) route: Route,
    pub(super) meter: RequestMeter,
}

/// Where a held stream is.
enum HoldState {
    /// Reading the local stream into `chunks`, sending keep-alive comments meanwhile.
    Holding {
        held: Box<Held>,
        rest: ChunkStream,
        chunks: Vec<Chunk>,
        logprobs: Option<Vec<f32>>,
        tokens: usize,
        finish: Option<String>,
        next_ping: tokio::time::Instant,
    },
    /// The local answer was judged doubtful (or its stream broke): waiting for the cloud's
    /// first chunk, still sending keep-alives.
    Escalating {
        held: Box<Held>,
        chunks: Vec<Chunk>,
        verdict: Option<Verdict>,
        local_tokens: Tokens,
        local_error: Option<BackendError>,
        cloud: futures::future::BoxFuture<'static, Result<Reply, BackendError>>,
        next_ping: tokio::time::Instant,
    },
    /// Sending what the client gets.
    Relay(BoxStream<'static, Bytes>),
}

/// The SSE comment sent while an answer is held: ignored by SSE clients, and it keeps idle
/// timeouts of clients and proxies from firing.
const KEEPALIVE: &[u8] = b": keep-alive\n\n";

/// Holds a local stream until it ends (or `hold_max_tokens`), judges it, and releases it or
/// replaces it with the cloud's stream: the client receives one answer, never a mix.
pub(super) fn held_stream(
    opened: crate::backends::OpenedStream,
    held: Held,
) -> BoxStream<'static, Bytes> {
    let keepalive = held.accounts.guard.keepalive;
    let start = HoldState::Holding {
        held: Box::new(held),
        rest: opened.rest,
        logprobs: opened.first.logprobs.clone(),
        chunks: vec![opened.first],
        tokens: 0,
        finish: None,
        next_ping: tokio::time::Instant::now() + keepalive,
    };
    futures::stream::unfold(start, move |state| async move {
        match state {
            HoldState::Relay(mut frames) => {
                let frame = frames.next().await?;
                Some((frame, HoldState::Relay(frames)))
            }
            HoldState::Holding {
                held,
                mut rest,
                mut chunks,
                mut logprobs,
                mut tokens,
                mut finish,
                next_ping,
            } => loop {
                let max = held.accounts.guard.hold_max_tokens;
                let next = tokio::select! {
                    next = rest.next() => next,
                    () = tokio::time::sleep_until(next_ping) => {
                        let state = HoldState::Holding {
                            held, rest, chunks, logprobs, tokens, finish,
                            next_ping: tokio::time::Instant::now() + keepalive,
                        };
                        return Some((Bytes::from_static(KEEPALIVE), state));
                    }
                };
                match next {
                    Some(Ok(chunk)) => {
                        let peek = crate::wire::answer_peek(&chunk.data);
                        let unsigned = peek.has_content && chunk.logprobs.is_none();
                        if let Some(lp) = &chunk.logprobs {
                            tokens += lp.len();
                            logprobs.get_or_insert_with(Vec::new).extend(lp);
                        } else if !chunk.usage_only {
                            tokens += 1;
                        }
                        if peek.finish_reason.is_some() {
                            finish = peek.finish_reason;
                        }
                        chunks.push(chunk);
                        // Text without log-probabilities: the server returns none, so there is
                        // nothing to wait for; release now (no_signal) and stream the rest.
                        if tokens >= max || (unsigned && logprobs.is_none()) {
                            return decide(held, chunks, logprobs, finish, Some(rest), keepalive);
                        }
                    }
                    None => return decide(held, chunks, logprobs, finish, None, keepalive),
                    Some(Err(e)) => {
                        // Nothing reached the client yet: the cloud can still answer whole.
                        let local = held.decision.backend;
                        held.accounts.record_late_failure(local);
                        tracing::warn!(backend = %held.route.backend, error = %e, "held local stream failed; asking the cloud");
                        return escalate_held(held, chunks, None, Some(e), keepalive);
                    }
                }
            },
            HoldState::Escalating {
                mut held,
                chunks,
                verdict,
                local_tokens,
                local_error,
                mut cloud,
                next_ping,
            } => {
                let result = tokio::select! {
                    r = &mut cloud => r,
                    () = tokio::time::sleep_until(next_ping) => {
                        let state = HoldState::Escalating {
                            held, chunks, verdict, local_tokens, local_error, cloud,
                            next_ping: tokio::time::Instant::now() + keepalive,
                        };
                        return Some((Bytes::from_static(KEEPALIVE), state));
                    }
                };
                let decision = held.decision;
                let leg = |d: GuardDecision| GuardLeg {
                    decision: d,
                    verdict,
                    local: Some(decision.backend),
                    local_tokens,
                };
                match result {
                    Ok(Reply::Stream(opened)) => {
                        let cloud = held.accounts.cloud.unwrap_or(decision.backend);
                        let to = held.accounts.backends[cloud].info();
                        let mut route = held.route.clone();
                        route.fallback_from = Some(route.backend.clone());
                        route.role = to.role;
                        route.backend = to.name.clone();
                        route.reason = if local_error.is_some() {
                            Reason::FallbackLocalError
                        } else {
                            Reason::EscalatedLowConfidence
                        };
                        let Held {
                            accounts,
                            request,
                            mut meter,
                            ..
                        } = *held;
                        meter.routed(&route, cloud);
                        meter.answer = None;
                        meter.guard = Some(leg(GuardDecision::Escalated));
                        let note = verdict_comment(GuardDecision::Escalated, verdict, &route.backend);
                        let frames = client_stream(
                            opened.first,
                            opened.rest,
                            request.include_usage,
                            meter,
                            accounts,
                        );
                        Some((note, HoldState::Relay(frames)))
                    }
                    failed => {
                        if let Err(e) = &failed {
                            tracing::warn!(error = %e, "escalation of a held stream failed; serving the held local answer");
                        }
                        if let Some(e) = local_error {
                            // The local stream broke and the cloud could not answer: the
                            // client gets the local failure as its error frame.
                            let backend = held.route.backend.clone();
                            let mut meter = held.meter;
                            meter.outcome = Some(Outcome::Error);
                            meter.guard = Some(leg(GuardDecision::EscalationFailed));
                            drop(meter);
                            let error = e.to_api_error(&backend);
                            let frames = futures::stream::iter([Bytes::from_static(b"data: [DONE]\n\n")]).boxed();
                            return Some((sse_frame(&error.to_json()), HoldState::Relay(frames)));
                        }
                        held.route.reason = Reason::EscalationFailed;
                        let route = held.route.clone();
                        held.meter.routed(&route, decision.backend);
                        held.meter.guard = Some(leg(GuardDecision::EscalationFailed));
                        Some(release(*held, chunks, None, GuardDecision::EscalationFailed, verdict))
                    }
                }
            }
        }
    })
    .boxed()
}

/// Judges a held answer (whole, or its first `hold_max_tokens` when `rest` is left) and
/// releases it or starts the escalation.
fn decide(
    held: Box<Held>,
    chunks: Vec<Chunk>,
    logprobs: Option<Vec<f32>>,
    finish: Option<String>,
    rest: Option<ChunkStream>,
    keepalive: Duration,
) -> Option<(Bytes, HoldState)> {
    let verdict = held.accounts.guard.judge(
        held.decision.backend,
        &held.plan,
        logprobs.as_deref(),
        finish.as_deref(),
        held.decision.p_local,
    );
    if verdict.escalate {
        drop(rest); // stops the local generation
        return escalate_held(held, chunks, Some(verdict), None, keepalive);
    }
    let decision = if verdict.confidence.is_none() {
        GuardDecision::NoSignal
    } else {
        GuardDecision::Pass
    };
    let mut held = held;
    held.meter.guard = Some(GuardLeg {
        decision,
        verdict: Some(verdict),
        local: Some(held.decision.backend),
        local_tokens: Tokens::default(),
    });
    Some(release(*held, chunks, rest, decision, Some(verdict)))
}

/// Starts asking the cloud for a held request's answer.
fn escalate_held(
    held: Box<Held>,
    chunks: Vec<Chunk>,
    verdict: Option<Verdict>,
    local_error: Option<BackendError>,
    keepalive: Duration,
) -> Option<(Bytes, HoldState)> {
    let local_tokens = held_tokens(&chunks);
    let Some(cloud) = held.accounts.cloud else {
        let decision = GuardDecision::EscalationFailed;
        return Some(release(*held, chunks, None, decision, verdict));
    };
    let (accounts, request) = (held.accounts.clone(), held.request.clone());
    let attempt = async move { accounts.attempt(cloud, &request).await }.boxed();
    Some((
        Bytes::from_static(KEEPALIVE),
        HoldState::Escalating {
            held,
            chunks,
            verdict,
            local_tokens,
            local_error,
            cloud: attempt,
            next_ping: tokio::time::Instant::now() + keepalive,
        },
    ))
}

/// The local leg's tokens from its held chunks: the usage chunk, else one per logprob.
fn held_tokens(chunks: &[Chunk]) -> Tokens {
    if let Some(u) = chunks.iter().rev().find_map(|c| c.usage) {
        return Tokens {
            input: u.prompt_tokens,
            output: u.completion_tokens,
        };
    }
    let output = chunks
        .iter()
        .filter_map(|c| c.logprobs.as_ref())
        .map(|l| l.len() as u64)
        .sum();
    Tokens { input: 0, output }
}

/// Sends the held local chunks (then the rest of the local stream, if the hold stopped at
/// `hold_max_tokens`) to the client as an ordinary relayed stream.
fn release(
    held: Held,
    chunks: Vec<Chunk>,
    rest: Option<ChunkStream>,
    decision: GuardDecision,
    verdict: Option<Verdict>,
) -> (Bytes, HoldState) {
    let Held {
        accounts,
        request,
        mut meter,
        route,
        ..
    } = held;
    if meter.guard.is_none() {
        meter.guard = Some(GuardLeg {
            decision,
            verdict,
            local: None,
            local_tokens: Tokens::default(),
        });
    }
    let note = verdict_comment(decision, verdict, &route.backend);
    let mut chunks = chunks.into_iter();
    let Some(first) = chunks.next() else {
        // Unreachable (a held stream has its first chunk), but never panics.
        return (note, HoldState::Relay(futures::stream::empty().boxed()));
    };
    let tail = futures::stream::iter(chunks.map(Ok::<Chunk, BackendError>));
    let rest: ChunkStream = match rest {
        Some(r) => tail.chain(r).boxed(),
        None => tail.boxed(),
    };
    let frames = client_stream(first, rest, request.include_usage, meter, accounts);
    (note, HoldState::Relay(frames))
}

/// An SSE comment naming the guard's verdict, sent before the released answer: SDKs ignore
/// it; a person reading the stream (or a log) sees what happened, since the headers left
/// before the verdict.
fn verdict_comment(decision: GuardDecision, verdict: Option<Verdict>, backend: &str) -> Bytes {
    let confidence = verdict
        .and_then(|v| v.confidence)
        .map_or_else(|| "none".to_owned(), |c| format!("{c:.4}"));
    Bytes::from(format!(
        ": wattgate-guard decision={} confidence={confidence} backend={backend}\n\n",
        decision.as_str()
    ))
}
