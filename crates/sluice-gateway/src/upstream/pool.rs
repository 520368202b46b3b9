//! Keep-alive HTTP/1.1 connections to upstreams, each driven by the request
//! that holds it.
//!
//! hyper's pooled client runs every connection as a task of its own and
//! hands a response body to the caller one frame at a time through a
//! one-slot channel, so a proxy reading it goes idle between frames and
//! writes each frame to its client on its own, even when the upstream sent
//! the whole burst in one segment. Here the request polls its connection
//! itself, in the same task as the body: every frame that has arrived is
//! read in one go, and the server writes them to the client together
//! (`docs/BENCHMARKS.md`: a streamed call through Sluice cost 8 writes to
//! the client where the upstream made 1). Nothing waits for a frame that
//! has not arrived.
//!
//! A connection returns to the pool once its answer has been read to the
//! end; an answer dropped half-read (the client went away) closes it. Idle
//! connections are checked when taken: one the upstream closed, or idle
//! longer than [`IDLE_TIMEOUT`], is dropped. A request that a pooled
//! connection could not send (closed under it) is sent once more on a new
//! connection; one that may have been sent is never resent here.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::uri::{Authority, PathAndQuery, Scheme};
use axum::http::{HeaderValue, Request, Response, Uri, header};
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{Connection, SendRequest};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tower_service::Service;

use super::{UpstreamError, message};

type Io = MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long an unused connection is kept.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Most idle connections kept per upstream host.
pub const MAX_IDLE: usize = 512;

/// hyper's half of an upstream connection: it reads and writes the socket.
type Conn = Connection<Io, Full<Bytes>>;

/// A connection and its request handle.
struct Driven {
    send: SendRequest<Full<Bytes>>,
    /// `None` once it has finished (closed or failed): dropped then, so a
    /// request or body still waiting on it gets an error instead of hanging.
    /// Boxed: hyper's connection state is large, and a `Driven` moves in and
    /// out of the idle list on every request.
    conn: Option<Pin<Box<Conn>>>,
}

impl Driven {
    /// Let the connection read and write what it can.
    fn poll_conn(&mut self, cx: &mut Context<'_>) {
        if let Some(conn) = &mut self.conn {
            if conn.as_mut().poll(cx).is_ready() {
                self.conn = None;
            }
        }
    }

    /// Whether it can take another request now (after one poll to settle
    /// what the upstream sent since it was parked: a close, say).
    fn reusable(&mut self) -> bool {
        self.poll_conn(&mut Context::from_waker(std::task::Waker::noop()));
        self.conn.is_some() && !self.send.is_closed() && self.send.is_ready()
    }
}

struct Idle {
    driven: Driven,
    since: Instant,
}

struct Host {
    scheme: Scheme,
    authority: Authority,
    idle: Vec<Idle>,
}

impl Host {
    fn is(&self, scheme: &Scheme, authority: &Authority) -> bool {
        self.scheme == *scheme && self.authority == *authority
    }
}

struct Shared {
    hosts: Mutex<Vec<Host>>,
    idle_timeout: Duration,
    /// Connections opened since start.
    opened: AtomicU64,
}

impl Shared {
    /// A parked connection to that host that can take a request now, if
    /// any (checked, and expired ones closed, outside the lock).
    fn take(&self, scheme: &Scheme, authority: &Authority) -> Option<Driven> {
        loop {
            let (candidate, expired) = {
                let mut hosts = self.hosts.lock().unwrap_or_else(PoisonError::into_inner);
                let host = hosts.iter_mut().find(|h| h.is(scheme, authority))?;
                let now = Instant::now();
                // Oldest first: those past the idle timeout go.
                let n = host
                    .idle
                    .iter()
                    .take_while(|i| now.saturating_duration_since(i.since) >= self.idle_timeout)
                    .count();
                let expired: Vec<Idle> = host.idle.drain(..n).collect();
                // The most recently used next: warmest, least likely closed.
                (host.idle.pop(), expired)
            };
            drop(expired);
            let mut idle = candidate?;
            if idle.driven.reusable() {
                return Some(idle.driven);
            }
        }
    }

    fn put(&self, scheme: &Scheme, authority: &Authority, driven: Driven) {
        let mut hosts = self.hosts.lock().unwrap_or_else(PoisonError::into_inner);
        let idle = Idle {
            driven,
            since: Instant::now(),
        };
        match hosts.iter_mut().find(|h| h.is(scheme, authority)) {
            Some(h) if h.idle.len() < MAX_IDLE => h.idle.push(idle),
            Some(_) => {}
            None => hosts.push(Host {
                scheme: scheme.clone(),
                authority: authority.clone(),
                idle: vec![idle],
            }),
        }
    }
}

/// Where requests go, worked out once (at start, not per call): the host
/// the pool keys connections by, the origin-form URI hyper's connection
/// API writes in the request line, and the `Host` header.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Absolute: what the connector connects to.
    uri: Uri,
    origin: Uri,
    scheme: Scheme,
    authority: Authority,
    host: HeaderValue,
}

impl Endpoint {
    /// An absolute `http://` or `https://` URI's endpoint.
    pub fn new(uri: Uri) -> Result<Endpoint, String> {
        let (Some(scheme), Some(authority)) = (uri.scheme().cloned(), uri.authority().cloned())
        else {
            return Err(format!("{uri}: not an absolute URL"));
        };
        let origin = Uri::from(
            uri.path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        );
        let host = HeaderValue::from_str(authority.as_str())
            .map_err(|e| format!("{uri}: bad host: {e}"))?;
        Ok(Endpoint {
            uri,
            origin,
            scheme,
            authority,
            host,
        })
    }
}

/// Connections to any number of upstream hosts, through one connector
/// (plain TCP or rustls).
#[derive(Clone)]
pub struct Pool {
    connector: HttpsConnector<HttpConnector>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").finish_non_exhaustive()
    }
}

impl Pool {
    /// A pool connecting through `connector`.
    pub fn new(connector: HttpsConnector<HttpConnector>) -> Pool {
        Pool::with_idle_timeout(connector, IDLE_TIMEOUT)
    }

    fn with_idle_timeout(connector: HttpsConnector<HttpConnector>, idle_timeout: Duration) -> Pool {
        Pool {
            connector,
            shared: Arc::new(Shared {
                hosts: Mutex::default(),
                idle_timeout,
                opened: AtomicU64::new(0),
            }),
        }
    }

    async fn connect(&self, uri: &Uri) -> Result<Driven, UpstreamError> {
        let mut connector = self.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(|e| UpstreamError::Connect(message(&*e)))?;
        let io = connector
            .call(uri.clone())
            .await
            .map_err(|e| UpstreamError::Connect(message(&*e)))?;
        self.shared.opened.fetch_add(1, Ordering::Relaxed);
        let (send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| UpstreamError::Connect(message(&e)))?;
        let mut d = Driven {
            send,
            conn: Some(Box::pin(conn)),
        };
        std::future::poll_fn(|cx| {
            d.poll_conn(cx);
            d.send.poll_ready(cx)
        })
        .await
        .map_err(|e| UpstreamError::Connect(message(&e)))?;
        Ok(d)
    }

    /// Connections opened since start, and parked now.
    pub fn connections(&self) -> Connections {
        let idle = self
            .shared
            .hosts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|h| h.idle.len() as u64)
            .sum();
        Connections {
            opened: self.shared.opened.load(Ordering::Relaxed),
            idle,
        }
    }

    /// Whether `other` is this same pool (a clone of it).
    pub fn same(&self, other: &Pool) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// Send `req` to `to` (the request's own URI is replaced) and read the
    /// answer's head; the body is read through the returned [`PooledBody`].
    pub async fn send(
        &self,
        to: &Endpoint,
        mut req: Request<Full<Bytes>>,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        *req.uri_mut() = to.origin.clone();
        req.headers_mut()
            .entry(header::HOST)
            .or_insert_with(|| to.host.clone());
        loop {
            let (mut d, pooled) = match self.shared.take(&to.scheme, &to.authority) {
                Some(d) => (d, true),
                // Boxed: connecting (TLS included) is rare and its future large.
                None => (Box::pin(self.connect(&to.uri)).await?, false),
            };
            let answer = d.send.try_send_request(req);
            let mut answer = std::pin::pin!(answer);
            let got = std::future::poll_fn(|cx| {
                d.poll_conn(cx);
                answer.as_mut().poll(cx)
            })
            .await;
            match got {
                Ok(resp) => {
                    let (parts, body) = resp.into_parts();
                    return Ok(Response::from_parts(
                        parts,
                        PooledBody {
                            body,
                            held: Some(Held {
                                driven: d,
                                pool: Arc::clone(&self.shared),
                                scheme: to.scheme.clone(),
                                authority: to.authority.clone(),
                            }),
                        },
                    ));
                }
                Err(mut e) => match e.take_message() {
                    // Never sent: a pooled connection closed under it. Once
                    // more on a new one; a new one's failure is final.
                    Some(back) if pooled => req = back,
                    Some(_) => return Err(UpstreamError::Connect(message(e.error()))),
                    None => return Err(UpstreamError::Transport(message(e.error()))),
                },
            }
        }
    }
}

/// Connection counts, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Connections {
    /// Opened since start (a connection made, TLS included, before any request on it).
    pub opened: u64,
    /// Parked for reuse now.
    pub idle: u64,
}

/// An answer's body, read while driving its connection; the connection goes
/// back to the pool when the body has been read to the end.
pub struct PooledBody {
    body: Incoming,
    /// The connection and where it goes back to; `None` once given back or closed.
    held: Option<Held>,
}

struct Held {
    driven: Driven,
    pool: Arc<Shared>,
    scheme: Scheme,
    authority: Authority,
}

impl std::fmt::Debug for PooledBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBody").finish_non_exhaustive()
    }
}

impl PooledBody {
    fn give_back(&mut self) {
        if let Some(h) = self.held.take() {
            if h.driven.conn.is_some() {
                h.pool.put(&h.scheme, &h.authority, h.driven);
            }
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(h) = &mut this.held {
            h.driven.poll_conn(cx);
        }
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        match &frame {
            Poll::Ready(None) => this.give_back(),
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => this.give_back(),
            // A failed body leaves the connection in an unknown state: closed.
            Poll::Ready(Some(Err(_))) => this.held = None,
            _ => {}
        }
        frame.map_err(BoxError::from)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A raw HTTP/1.1 server answering `ok` to each request; with `close`,
    /// each connection answers once and is closed when `close` is notified
    /// (after the client has parked it), which it reports on `closed`.
    async fn server(
        close: Option<Arc<tokio::sync::Notify>>,
    ) -> (
        String,
        Arc<AtomicUsize>,
        tokio::sync::mpsc::UnboundedReceiver<()>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1/x", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            loop {
                let (mut tcp, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                let (tx, close) = (tx.clone(), close.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        // One request: its head, then its content-length body.
                        let mut chunk = [0u8; 4096];
                        let head_end = loop {
                            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break i + 4;
                            }
                            match tcp.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        };
                        let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .map_or(0, |v| v.trim().parse().unwrap());
                        while buf.len() < head_end + len {
                            let n = tcp.read(&mut chunk).await.unwrap();
                            buf.extend_from_slice(&chunk[..n]);
                        }
                        buf.drain(..head_end + len);
                        tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await
                            .unwrap();
                        if let Some(close) = close {
                            close.notified().await;
                            drop(tcp);
                            let _ = tx.send(());
                            return;
                        }
                    }
                });
            }
        });
        (url, accepted, rx)
    }

    async fn call(pool: &Pool, url: &str) -> Result<Bytes, UpstreamError> {
        use http_body_util::BodyExt;
        let mut req = Request::new(Full::new(Bytes::from_static(b"{}")));
        *req.method_mut() = axum::http::Method::POST;
        let to = Endpoint::new(url.parse().unwrap()).unwrap();
        let resp = pool.send(&to, req).await?;
        assert_eq!(resp.status(), 200);
        Ok(resp.into_body().collect().await.unwrap().to_bytes())
    }

    fn plain(idle_timeout: Duration) -> Pool {
        Pool::with_idle_timeout(super::super::connector(&[]).unwrap(), idle_timeout)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn connections_are_kept_alive_and_reused() {
        let (url, accepted, _) = server(None).await;
        let pool = plain(IDLE_TIMEOUT);
        for _ in 0..3 {
            assert_eq!(call(&pool, &url).await.unwrap(), "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        // Idle past the timeout: a new connection.
        let pool = plain(Duration::ZERO);
        for _ in 0..2 {
            assert_eq!(call(&pool, &url).await.unwrap(), "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_connection_the_upstream_closed_is_not_reused() {
        let close = Arc::new(tokio::sync::Notify::new());
        let (url, accepted, mut closed) = server(Some(Arc::clone(&close))).await;
        let pool = plain(IDLE_TIMEOUT);
        for n in 1..=3 {
            assert_eq!(call(&pool, &url).await.unwrap(), "ok");
            // Parked in the pool, then closed by the upstream.
            close.notify_one();
            closed.recv().await.unwrap();
            // Let the I/O driver see the close (a yield polls it on this runtime).
            tokio::task::yield_now().await;
            assert_eq!(accepted.load(Ordering::SeqCst), n);
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_refused_connection_is_a_connect_error() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1/x", listener.local_addr().unwrap());
        drop(listener);
        let err = call(&plain(IDLE_TIMEOUT), &url).await.unwrap_err();
        assert!(matches!(err, UpstreamError::Connect(_)), "{err:?}");
        assert!(!err.maybe_served());
    }
}
