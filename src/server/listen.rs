//! The accept loop: who may open a connection, and how long it may take to say what it wants.
//!
//! `axum::serve` cannot set a header deadline, cap connections per address, or answer a slow
//! client with 408, so connections are served here with hyper's HTTP/1 connection directly:
//!
//! - **Per-IP cap** (`server.max_connections_per_ip`): one address flooding the port is refused
//!   with 503 at accept, before it costs a task, a buffer or a concurrency slot.
//! - **Header deadline** (`server.header_timeout_s`, hyper's header-read timer): a partial head
//!   gets 408 and the connection closes; an idle keep-alive connection is closed silently (a
//!   408 there could race a request the client is just sending).
//! - The body deadline is a layer ([`super::layers::BodyDeadlineLayer`]), since it is about a
//!   request, not a connection.
//!
//! Refusals are counted in `wattgate_connections_refused_total{reason}`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tower::Service;

use crate::error::ApiError;
use crate::metrics::Metrics;

/// What the door enforces, from `[server]`.
#[derive(Debug, Clone)]
pub struct DoorPolicy {
    /// A request's head must arrive within this.
    pub header_timeout: Duration,
    /// Connections one address may hold; 0: no cap.
    pub max_connections_per_ip: usize,
}

/// Serves `app` on `listener` until `shutdown` resolves; then stops accepting, lets each
/// connection finish its request in flight, and returns when all have closed. When `cut`
/// turns true (the grace period ran out), every connection still open is dropped with its
/// requests, whose meters then record them as `shutdown`.
pub async fn serve_connections(
    listener: TcpListener,
    app: Router,
    policy: DoorPolicy,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
    cut: watch::Receiver<bool>,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let counts = PerIp::new(policy.max_connections_per_ip);
    let policy = Arc::new(policy);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors (or a connection reset before accept): not fatal.
                    // Pause so a full fd table does not spin the loop.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(held) = counts.admit(peer.ip()) else {
            metrics
                .connections_refused
                .with_label_values(&["per_ip"])
                .inc();
            tokio::spawn(refuse(stream, policy.max_connections_per_ip));
            continue;
        };
        // Small SSE frames and JSON replies must not wait for Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        let conn = Connection {
            app: app.clone(),
            policy: policy.clone(),
            metrics: metrics.clone(),
            stop: stop_rx.clone(),
            peer,
        };
        let open = metrics.connections_open.clone();
        let mut cut = cut.clone();
        tokio::spawn(async move {
            open.inc();
            tokio::select! {
                () = conn.serve(stream) => {}
                _ = cut.wait_for(|cut| *cut) => {}
            }
            open.dec();
            drop(held);
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(stop_rx);
    // Resolves once every connection has dropped its receiver, that is, closed.
    stop_tx.closed().await;
}

/// One accepted connection.
struct Connection {
    app: Router,
    policy: Arc<DoorPolicy>,
    metrics: Arc<Metrics>,
    stop: watch::Receiver<bool>,
    peer: SocketAddr,
}

type Reply = Pin<Box<dyn Future<Output = Result<axum::response::Response, Infallible>> + Send>>;

impl Connection {
    async fn serve(mut self, stream: TcpStream) {
        let app = self.app.clone();
        let peer = self.peer;
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            let mut app = app.clone();
            Box::pin(async move { app.call(request.map(axum::body::Body::new)).await }) as Reply
        });
        let mut conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(self.policy.header_timeout)
            .serve_connection(TokioIo::new(stream), service);
        let mut stopping = *self.stop.borrow();
        if stopping {
            Pin::new(&mut conn).graceful_shutdown();
        }
        let result = loop {
            tokio::select! {
                result = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)) => break result,
                changed = self.stop.changed(), if !stopping => {
                    stopping = true;
                    if changed.is_ok() {
                        Pin::new(&mut conn).graceful_shutdown();
                    }
                }
            }
        };
        let timed_out = matches!(&result, Err(e) if e.is_timeout());
        if let Err(e) = &result {
            if !timed_out {
                tracing::debug!(peer = %self.peer, "connection ended: {e}");
            }
        }
        let parts = conn.into_parts();
        let mut io = parts.io.into_inner();
        // Bytes of a head that never completed: the client is slow, not idle. Tell it why.
        if timed_out && !parts.read_buf.is_empty() {
            self.metrics
                .connections_refused
                .with_label_values(&["header_timeout"])
                .inc();
            let error = ApiError::header_timeout(self.policy.header_timeout.as_secs_f64());
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                io.write_all(&raw_response("408 Request Timeout", &error)),
            )
            .await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
    }
}

/// Writes the per-IP refusal and closes, without reading the request.
async fn refuse(mut stream: TcpStream, cap: usize) {
    let error = ApiError::unavailable(
        format!("This address already holds {cap} open connections to the gateway (server.max_connections_per_ip). Reuse connections or close idle ones."),
        "too_many_connections",
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream
            .write_all(&raw_response("503 Service Unavailable", &error))
            .await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// An HTTP/1.1 response written straight to the socket, for connections hyper is not serving.
fn raw_response(status_line: &str, error: &ApiError) -> Vec<u8> {
    let body = error.to_json();
    let mut out = format!(
        "HTTP/1.1 {status_line}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

/// Open connections per client address.
#[derive(Clone)]
struct PerIp {
    cap: usize,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One admitted connection; its address's count drops with it.
struct Held {
    ip: IpAddr,
    open: Option<Arc<Mutex<HashMap<IpAddr, usize>>>>,
}

impl PerIp {
    fn new(cap: usize) -> Self {
        Self {
            cap,
            open: Arc::default(),
        }
    }

    /// Counts a new connection from `ip`, or `None` when the address is at its cap.
    fn admit(&self, ip: IpAddr) -> Option<Held> {
        if self.cap == 0 {
            return Some(Held { ip, open: None });
        }
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(Held {
            ip,
            open: Some(self.open.clone()),
        })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let Some(open) = &self.open else { return };
        let mut open = open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_gets_its_cap_and_its_slots_back_as_connections_close() {
        let per_ip = PerIp::new(2);
        let a: IpAddr = [127, 0, 0, 3].into();
        let b: IpAddr = [127, 0, 0, 4].into();
        let first = per_ip.admit(a).expect("1st");
        let _second = per_ip.admit(a).expect("2nd");
        assert!(per_ip.admit(a).is_none(), "a 3rd from the same address");
        assert!(per_ip.admit(b).is_some(), "another address is not affected");
        drop(first);
        assert!(
            per_ip.admit(a).is_some(),
            "a closed connection frees its place"
        );
        let unlimited = PerIp::new(0);
        let held: Vec<_> = (0..1000).filter_map(|_| unlimited.admit(a)).collect();
        assert_eq!(held.len(), 1000);
    }

    #[test]
    fn a_raw_response_is_well_formed_http() {
        let bytes = raw_response("408 Request Timeout", &ApiError::header_timeout(10.0));
        let text = String::from_utf8(bytes).expect("utf-8");
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        assert!(
            head.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
            "{head}"
        );
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).expect("json");
        assert_eq!(v["error"]["code"], "request_timeout");
    }
}
