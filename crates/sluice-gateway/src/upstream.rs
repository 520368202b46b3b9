//! The proxy's client to upstream providers.
//!
//! HTTP/1.1 keep-alive connections over rustls (ring, the webpki roots plus a
//! provider's own `tls_ca_file`), each driven by the request holding it
//! ([`pool`]), with every provider's endpoint URIs parsed once at start. A call builds one
//! `http::Request` from a cloned URI and sends it: no URL re-parsing, no
//! redirect or retry layers (Sluice retries itself, and an LLM API does not
//! redirect). Profiles of the proxy at saturation put reqwest's own layers
//! (URL conversions, redirect and retry wrappers) at a tenth of a proxied
//! call's CPU; see docs/BENCHMARKS.md.
//!
//! A provider whose URL the environment routes through an HTTP proxy
//! (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, `NO_PROXY`, in either case) is
//! called through reqwest instead, which speaks to proxies.
//!
//! The caller's deadline (`upstream_timeout_s` from the first attempt on a
//! model) covers an attempt from its send to the last byte of its body,
//! streamed or not.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Body as _;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::time::Instant;

pub mod pool;
pub use pool::{Endpoint, Pool};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type UpBody = UnsyncBoxBody<Bytes, BoxError>;

/// Why an upstream call or its body failed.
#[derive(Debug)]
pub enum UpstreamError {
    /// The request's deadline passed.
    TimedOut,
    /// No connection could be made: the request was not sent.
    Connect(String),
    /// Sending or reading failed once the request may have been sent.
    Transport(String),
    /// No URL for that provider and endpoint (a bug: every endpoint is parsed at start).
    NoUrl(String),
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::TimedOut => f.write_str("no complete answer within upstream_timeout_s"),
            UpstreamError::Connect(e) | UpstreamError::Transport(e) => f.write_str(e),
            UpstreamError::NoUrl(p) => write!(f, "no upstream URL for {p}"),
        }
    }
}

impl std::error::Error for UpstreamError {}

impl UpstreamError {
    /// Whether the provider may have received the request (and may bill
    /// it): anything but a failure to connect.
    pub fn maybe_served(&self) -> bool {
        !matches!(self, UpstreamError::Connect(_) | UpstreamError::NoUrl(_))
    }
}

/// A send's error, its causes in one line (hyper's own message is only
/// "client error (Connect)"): `Connect` when no connection was made.
fn send_error(e: &(dyn std::error::Error + 'static), connect: bool) -> UpstreamError {
    let text = message(e);
    if connect {
        UpstreamError::Connect(text)
    } else {
        UpstreamError::Transport(text)
    }
}

/// An error and its causes, in one line.
fn message(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// One endpoint of a provider.
struct Target {
    path: &'static str,
    endpoint: pool::Endpoint,
    /// Set when the environment's proxy settings intercept this URL.
    via_proxy: Option<reqwest::Url>,
}

/// What calling one provider takes.
struct ProviderClient {
    /// The provider's key, as its wire sends it (marked sensitive: never logged).
    auth: Option<(header::HeaderName, HeaderValue)>,
    /// Providers trusting only the public roots share one pool.
    clients: Clients,
    targets: Vec<Target>,
}

/// Every provider's endpoints and the clients to call them.
pub struct Upstreams {
    providers: Vec<ProviderClient>,
}

/// The clients for one set of trusted roots: direct, and through an env proxy.
#[derive(Clone)]
struct Clients {
    direct: Pool,
    proxied: reqwest::Client,
}

impl Clients {
    /// Trusting the webpki roots, plus the CA certificates in `extra_ca` (PEM).
    fn new(extra_ca: Option<&[u8]>) -> Result<Clients, String> {
        let extra = extra_certificates(extra_ca)?;
        let direct = Pool::new(connector(&extra)?);
        let mut proxied = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // An LLM API does not redirect; a redirect is passed on, never followed with the key.
            .redirect(reqwest::redirect::Policy::none());
        for cert in &extra {
            let cert =
                reqwest::Certificate::from_der(cert).map_err(|e| format!("tls_ca_file: {e}"))?;
            proxied = proxied.add_root_certificate(cert);
        }
        let proxied = proxied
            .build()
            .map_err(|e| format!("cannot build the upstream HTTP client: {e}"))?;
        Ok(Clients { direct, proxied })
    }
}

/// The certificates in a PEM file's text (none for `None`).
fn extra_certificates(
    pem: Option<&[u8]>,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    match pem {
        None => Ok(Vec::new()),
        Some(pem) => CertificateDer::pem_slice_iter(pem)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("tls_ca_file: {e}")),
    }
}

/// The connector upstream connections are made with: TCP (TCP_NODELAY,
/// keepalive, a 10 s connect timeout), then TLS for `https://`, trusting
/// the webpki roots and `extra` (plain `http://` goes as it is).
pub fn connector(
    extra: &[rustls::pki_types::CertificateDer<'static>],
) -> Result<hyper_rustls::HttpsConnector<HttpConnector>, String> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    for cert in extra {
        roots
            .add(cert.clone())
            .map_err(|e| format!("tls_ca_file: {e}"))?;
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("cannot set up TLS for upstreams: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    http.set_keepalive(Some(Duration::from_secs(60)));
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http))
}

impl std::fmt::Debug for Upstreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstreams")
            .field("providers", &self.providers.len())
            .finish_non_exhaustive()
    }
}

/// An upstream's answer: status and headers, and a body read within the deadline.
pub struct Answer {
    /// The upstream's status.
    pub status: StatusCode,
    /// The upstream's headers.
    pub headers: HeaderMap,
    body: UpBody,
    deadline: Instant,
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Answer")
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl Upstreams {
    /// Parse every provider's endpoint URLs (`paths` under each base URL) and build the clients.
    pub fn new(proxy: &crate::config::Proxy, paths: &[&'static str]) -> Result<Self, String> {
        let env_proxies = hyper_util::client::proxy::matcher::Matcher::from_env();
        let default = Clients::new(None)?;
        let providers = proxy
            .providers
            .iter()
            .map(|p| {
                let targets = paths
                    .iter()
                    .map(|path| target(p, path, &env_proxies))
                    .collect::<Result<Vec<_>, String>>()?;
                let clients = match &p.tls_ca {
                    None => default.clone(),
                    Some(pem) => {
                        Clients::new(Some(pem)).map_err(|e| format!("provider {}: {e}", p.name))?
                    }
                };
                Ok(ProviderClient {
                    auth: auth(p)?,
                    clients,
                    targets,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Upstreams { providers })
    }

    /// Upstream connections, over every pool (providers trusting the same
    /// roots share one).
    pub fn connections(&self) -> pool::Connections {
        let mut seen: Vec<&Pool> = Vec::new();
        let mut total = pool::Connections::default();
        for p in &self.providers {
            if seen.iter().any(|s| s.same(&p.clients.direct)) {
                continue;
            }
            seen.push(&p.clients.direct);
            let c = p.clients.direct.connections();
            total.opened += c.opened;
            total.idle += c.idle;
        }
        total
    }

    /// `POST` `body` (JSON) to a provider's endpoint with `headers` added,
    /// its answer (body included) due by `deadline`.
    pub async fn post(
        &self,
        provider: usize,
        path: &str,
        mut headers: HeaderMap,
        body: Bytes,
        deadline: Instant,
    ) -> Result<Answer, UpstreamError> {
        let Some((p, target)) = self.providers.get(provider).and_then(|p| {
            let t = p.targets.iter().find(|t| t.path == path)?;
            Some((p, t))
        }) else {
            return Err(UpstreamError::NoUrl(path.to_owned()));
        };
        let clients = &p.clients;
        if let Some((name, value)) = &p.auth {
            headers.insert(name.clone(), value.clone());
        }
        let sent = async {
            match &target.via_proxy {
                None => {
                    let mut req = Request::new(Full::new(body));
                    *req.method_mut() = Method::POST;
                    *req.headers_mut() = headers;
                    req.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                    let (parts, body) = clients
                        .direct
                        .send(&target.endpoint, req)
                        .await?
                        .into_parts();
                    Ok((parts, body.map_err(BoxError::from).boxed_unsync()))
                }
                Some(url) => {
                    // Boxed: reqwest's future is large and this path is the rare one.
                    let r = Box::pin(
                        clients
                            .proxied
                            .post(url.clone())
                            .headers(headers)
                            .header(header::CONTENT_TYPE, "application/json")
                            .body(body)
                            .send(),
                    )
                    .await
                    .map_err(|e| send_error(&e, e.is_connect()))?;
                    let (parts, body) = axum::http::Response::<reqwest::Body>::from(r).into_parts();
                    Ok((parts, body.map_err(BoxError::from).boxed_unsync()))
                }
            }
        };
        let (parts, body) = tokio::time::timeout_at(deadline, sent)
            .await
            .map_err(|_| UpstreamError::TimedOut)??;
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body,
            deadline,
        })
    }
}

/// The provider's key as its wire sends it: `authorization: Bearer` (OpenAI)
/// or `x-api-key` (Anthropic).
fn auth(p: &crate::config::Provider) -> Result<Option<(header::HeaderName, HeaderValue)>, String> {
    let Some(k) = &p.api_key else { return Ok(None) };
    let (name, value) = match p.wire {
        crate::config::Wire::OpenAi => (header::AUTHORIZATION, format!("Bearer {k}")),
        crate::config::Wire::Anthropic => (header::HeaderName::from_static("x-api-key"), k.clone()),
    };
    let mut value = HeaderValue::try_from(value).map_err(|_| {
        format!(
            "provider {}: the API key is not a valid header value",
            p.name
        )
    })?;
    value.set_sensitive(true);
    Ok(Some((name, value)))
}

/// A provider's endpoint `path`, and whether the environment proxies it.
fn target(
    p: &crate::config::Provider,
    path: &'static str,
    env_proxies: &hyper_util::client::proxy::matcher::Matcher,
) -> Result<Target, String> {
    let url = format!("{}/{path}", p.base_url);
    let bad = |e: &dyn std::fmt::Display| format!("provider {}: bad URL {url}: {e}", p.name);
    let uri: Uri = url.parse().map_err(|e| bad(&e))?;
    let endpoint = pool::Endpoint::new(uri.clone()).map_err(|e| bad(&e))?;
    let via_proxy = match env_proxies.intercept(&uri) {
        None => None,
        Some(_) => {
            tracing::info!(
                "provider {}: {url} is called through the HTTP proxy set in the environment",
                p.name
            );
            Some(reqwest::Url::parse(&url).map_err(|e| bad(&e))?)
        }
    };
    Ok(Target {
        path,
        endpoint,
        via_proxy,
    })
}

impl Answer {
    /// The whole body.
    pub async fn bytes(self) -> Result<Bytes, UpstreamError> {
        match tokio::time::timeout_at(self.deadline, self.body.collect()).await {
            Ok(Ok(c)) => Ok(c.to_bytes()),
            Ok(Err(e)) => Err(send_error(&*e, false)),
            Err(_) => Err(UpstreamError::TimedOut),
        }
    }

    /// The body's data as it arrives; the deadline ends it with an error.
    pub fn stream(
        self,
    ) -> impl futures_util::Stream<Item = Result<Bytes, UpstreamError>> + Send + 'static {
        let sleep = Box::pin(tokio::time::sleep_until(self.deadline));
        futures_util::stream::unfold(
            (self.body, sleep, false),
            move |(mut body, mut sleep, done)| async move {
                if done {
                    return None;
                }
                loop {
                    let frame = std::future::poll_fn(|cx| {
                        if let Poll::Ready(f) = Pin::new(&mut body).poll_frame(cx) {
                            return Poll::Ready(Some(f));
                        }
                        match sleep.as_mut().poll(cx) {
                            Poll::Ready(()) => Poll::Ready(None),
                            Poll::Pending => Poll::Pending,
                        }
                    })
                    .await;
                    match frame {
                        None => {
                            return Some((Err(UpstreamError::TimedOut), (body, sleep, true)));
                        }
                        Some(None) => return None,
                        Some(Some(Err(e))) => {
                            return Some((Err(send_error(&*e, false)), (body, sleep, true)));
                        }
                        Some(Some(Ok(f))) => {
                            // Trailers carry no data: skip them.
                            if let Ok(data) = f.into_data() {
                                return Some((Ok(data), (body, sleep, false)));
                            }
                        }
                    }
                }
            },
        )
    }
}
