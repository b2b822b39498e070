//! The APIs besides chat completions, at the HTTP edge: a request on `/v1/responses` or
//! `/v1/messages` is translated into the chat request the pipeline serves, and its answer back
//! (see [`crate::wire::edge`] for why the pipeline speaks only chat). Errors on `/v1/messages`,
//! wherever in the stack they arise, are rewritten into Anthropic's shape by [`anthropic_errors`].

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use futures::StreamExt;

use crate::error::ApiError;
use crate::gateway::AnswerBody;
use crate::wire::edge::{new_id, translate_stream};
use crate::wire::native::{self, NativeApi};
use crate::wire::{messages, responses};

/// Which API a request arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Api {
    /// `POST /v1/chat/completions`: served as it came.
    Chat,
    /// `POST /v1/responses`.
    Responses,
    /// `POST /v1/messages`.
    Messages,
}

/// A request as the pipeline will serve it, and what its answer needs to be written back.
pub(super) enum Edge {
    Chat(Vec<u8>),
    Responses {
        request: Box<responses::Translated>,
        id: String,
    },
    Messages {
        request: messages::Translated,
        id: String,
    },
    /// A request with no chat translation, for a backend speaking its API natively: `view` is
    /// the chat the pipeline routes and meters it as.
    Native {
        request: Arc<native::Native>,
        view: Vec<u8>,
    },
}

impl Edge {
    /// Translates a request body of `api` into chat. What has no translation (tools, reasoning,
    /// a conversation the gateway did not keep) is passed through natively when `speaks(api)`,
    /// some backend speaking that API; else it is the translator's 400 naming the field.
    pub(super) fn translate(
        api: Api,
        body: Vec<u8>,
        conversations: &responses::Conversations,
        speaks: impl Fn(NativeApi) -> bool,
    ) -> Result<Self, ApiError> {
        let passed = |e: ApiError, native: NativeApi| {
            if !native::needs_native(&e) || !speaks(native) {
                return Err(e);
            }
            let request = match native {
                NativeApi::Responses => native::Native::responses(&body, e.message, conversations)?,
                NativeApi::Messages => native::Native::messages(&body, e.message)?,
            };
            Ok(Self::Native {
                view: request.view(),
                request: Arc::new(request),
            })
        };
        Ok(match api {
            Api::Chat => Self::Chat(body),
            Api::Responses => match responses::to_chat(&body, conversations) {
                Ok(request) => Self::Responses {
                    request: Box::new(request),
                    id: new_id("resp_"),
                },
                Err(e) => passed(e, NativeApi::Responses)?,
            },
            Api::Messages => match messages::to_chat(&body) {
                Ok(request) => Self::Messages {
                    request,
                    id: new_id("msg_"),
                },
                Err(e) => passed(e, NativeApi::Messages)?,
            },
        })
    }

    /// The request as it came, when it is passed through natively.
    pub(super) fn native(&self) -> Option<Arc<native::Native>> {
        match self {
            Self::Native { request, .. } => Some(request.clone()),
            _ => None,
        }
    }

    /// The chat-completions body the pipeline serves.
    pub(super) fn chat(&self) -> &[u8] {
        match self {
            Self::Chat(body) => body,
            Self::Responses { request, .. } => &request.chat,
            Self::Messages { request, .. } => &request.chat,
            Self::Native { view, .. } => view,
        }
    }

    /// A pipeline error in this API's words: the chat fields `max_tokens` and `messages` are the
    /// Responses API's `max_output_tokens` and `input`. (Anthropic's shape is applied by [`anthropic_errors`].)
    pub(super) fn error(&self, mut e: ApiError) -> ApiError {
        let responses = match self {
            Self::Responses { .. } => true,
            Self::Native { request, .. } => request.api == NativeApi::Responses,
            _ => false,
        };
        if !responses {
            return e;
        }
        // Chat's field names, and the Responses fields they were translated from.
        const RENAMED: [(&str, &str); 2] =
            [("max_tokens", "max_output_tokens"), ("messages", "input")];
        if let Some((chat, ours)) = RENAMED.iter().find(|(c, _)| e.param.as_deref() == Some(c)) {
            e.message = e
                .message
                .replace(&format!("`{chat}`"), &format!("`{ours}`"));
            e.param = Some((*ours).to_owned());
        }
        e
    }

    /// The pipeline's chat answer written in this API's shape; a finished Responses answer is
    /// kept in `conversations` (unless the request said `store: false`).
    pub(super) fn answer(
        self,
        body: AnswerBody,
        conversations: &Arc<responses::Conversations>,
    ) -> AnswerBody {
        match (self, body) {
            (Self::Chat(_), body) => body,
            (edge, AnswerBody::Error(e)) => AnswerBody::Error(edge.error(e)),
            // The upstream wrote it in the client's API.
            (Self::Native { .. }, AnswerBody::Json(json)) => AnswerBody::Json(json),
            (Self::Native { request, .. }, AnswerBody::Stream(frames)) => AnswerBody::Stream(
                translate_stream(frames, native::NativeStream::new(request.api)),
            ),
            (Self::Messages { id, .. }, AnswerBody::Json(json)) => {
                match messages::answer(&json, &id) {
                    Ok(b) => AnswerBody::Json(b),
                    Err(e) => AnswerBody::Error(e),
                }
            }
            (Self::Messages { id, .. }, AnswerBody::Stream(frames)) => {
                AnswerBody::Stream(translate_stream(frames, messages::MessagesStream::new(id)))
            }
            (Self::Responses { request, id }, AnswerBody::Json(json)) => {
                match responses::answer(&json, &id, &request.echo) {
                    Ok((b, text)) => {
                        if request.store {
                            let request = *request;
                            conversations.put(id, request.history, text);
                        }
                        AnswerBody::Json(b)
                    }
                    Err(e) => AnswerBody::Error(e),
                }
            }
            (Self::Responses { request, id }, AnswerBody::Stream(frames)) => {
                let request = *request;
                let on_complete: Option<responses::OnComplete> = request.store.then(|| {
                    let conversations = conversations.clone();
                    let (id, history) = (id.clone(), request.history);
                    Box::new(move |text: String| conversations.put(id, history, text))
                        as responses::OnComplete
                });
                AnswerBody::Stream(translate_stream(
                    frames,
                    responses::ResponsesStream::new(id, request.echo, on_complete),
                ))
            }
        }
    }
}

/// The largest error body rewritten into Anthropic's shape; the gateway's own are far smaller.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Rewrites every error answered on `/v1/messages...` (auth, limits, deadlines, panics, unknown
/// paths, upstream failures) from the gateway's OpenAI shape into Anthropic's
/// `{"type":"error","error":{"type","message"}}`, status and headers unchanged, so the
/// `anthropic` SDK raises its own exception types with the gateway's message.
pub(super) async fn anthropic_errors(request: Request, next: Next) -> Response {
    let anthropic = request.uri().path().starts_with("/v1/messages");
    let response = next.run(request).await;
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !anthropic || response.status().as_u16() < 400 || !is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let status = parts.status.as_u16();
    let bytes = match axum::body::to_bytes(body, MAX_ERROR_BODY).await {
        Ok(b) => b,
        Err(_) => bytes::Bytes::new(),
    };
    let rewritten = messages::rewrite_error(status, &bytes);
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, Body::from(rewritten))
}

/// Keeps `held` alive until the last frame of a stream has gone out.
pub(super) fn hold_until_end<T: Send + 'static>(body: &mut AnswerBody, held: T) {
    if let AnswerBody::Stream(frames) = body {
        let taken = std::mem::replace(frames, futures::stream::empty().boxed());
        *frames = taken
            .map(move |frame| {
                let _held = &held;
                frame
            })
            .boxed();
    }
}
