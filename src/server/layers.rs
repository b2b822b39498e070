//! Layers of the HTTP stack that no well-kept crate provides with the semantics needed here.
//!
//! `tower_http::timeout::RequestBodyTimeoutLayer` restarts its timer on every frame, so a client
//! that sends one byte every few seconds never trips it and holds its connection (and, before
//! this layer, a concurrency slot) for as long as it likes. [`BodyDeadlineLayer`] is a total
//! deadline for the whole body, counted from when its headers arrived.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use prometheus::IntCounter;
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

/// The error a request body reports once its deadline passed; handlers answer it with 408.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?} of its headers")]
pub struct BodyTimedOut(pub Duration);

impl BodyTimedOut {
    /// Whether `error` (as a body stream reports it) is a passed deadline.
    pub fn is(error: &axum::Error) -> bool {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
        while let Some(e) = source {
            if e.is::<BodyTimedOut>() {
                return true;
            }
            source = e.source();
        }
        false
    }
}

/// Gives every request body `timeout` from the moment its request reaches the stack.
#[derive(Clone)]
pub struct BodyDeadlineLayer {
    timeout: Duration,
    expired: IntCounter,
}

impl BodyDeadlineLayer {
    /// `expired` counts the bodies that missed their deadline.
    pub fn new(timeout: Duration, expired: IntCounter) -> Self {
        Self { timeout, expired }
    }
}

impl<S> Layer<S> for BodyDeadlineLayer {
    type Service = BodyDeadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BodyDeadline {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`BodyDeadlineLayer`] makes.
#[derive(Clone)]
pub struct BodyDeadline<S> {
    inner: S,
    layer: BodyDeadlineLayer,
}

impl<S> Service<Request<Body>> for BodyDeadline<S>
where
    S: Service<Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let deadline = Instant::now() + self.layer.timeout;
        let (timeout, expired) = (self.layer.timeout, self.layer.expired.clone());
        self.inner.call(request.map(|inner| {
            Body::new(DeadlineBody {
                inner,
                deadline,
                timeout,
                sleep: None,
                expired: Some(expired),
            })
        }))
    }
}

/// A body that fails with [`BodyTimedOut`] once `deadline` passes.
struct DeadlineBody {
    inner: Body,
    deadline: Instant,
    timeout: Duration,
    /// Made only when the body first has to wait, so a body already in costs no timer.
    sleep: Option<Pin<Box<Sleep>>>,
    /// Taken when the deadline is reported, so it is counted once and the body then ends.
    expired: Option<IntCounter>,
}

impl DeadlineBody {
    fn expire(&mut self) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        match self.expired.take() {
            Some(counter) => {
                counter.inc();
                Poll::Ready(Some(Err(Box::new(BodyTimedOut(self.timeout)))))
            }
            None => Poll::Ready(None),
        }
    }
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if this.expired.is_none() || Instant::now() >= this.deadline {
            return this.expire();
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => {
                let deadline = this.deadline;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => this.expire(),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn counter() -> IntCounter {
        IntCounter::new("t", "t").expect("counter")
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickled_body_fails_at_its_total_deadline_not_per_frame() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
        let expired = counter();
        let body = Body::new(DeadlineBody {
            inner: Body::from_stream(tokio_stream_from(rx)),
            deadline: Instant::now() + Duration::from_secs(3),
            timeout: Duration::from_secs(3),
            sleep: None,
            expired: Some(expired.clone()),
        });
        // A byte every second: each frame is on time, the whole body is not.
        tokio::spawn(async move {
            for _ in 0..10 {
                if tx.send(Ok(Bytes::from_static(b"x"))).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        let started = Instant::now();
        let mut stream = body.into_data_stream();
        let mut got = 0;
        let error = loop {
            match stream.next().await {
                Some(Ok(b)) => got += b.len(),
                Some(Err(e)) => break e,
                None => panic!("the body ended without its deadline"),
            }
        };
        assert!(BodyTimedOut::is(&error), "{error}");
        assert_eq!(got, 3);
        assert_eq!(started.elapsed(), Duration::from_secs(3));
        assert_eq!(expired.get(), 1);
        assert!(
            stream.next().await.is_none(),
            "the body ends after its error"
        );
    }

    fn tokio_stream_from(
        mut rx: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
    ) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> {
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }
}
