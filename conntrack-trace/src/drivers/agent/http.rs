//! The agent's HTTP endpoints: `/metrics` (Prometheus text), `/healthz`
//! (the process serves), `/readyz` (programs attached and metrics live),
//! `POST /alertmanager` (Alertmanager's webhook: see [`super::alerts`]);
//! optionally over TLS and behind basic authentication
//! (`--web-config-file`, [`super::webconfig`]).
//!
//! Bounded against slow or hostile clients: at most [`MAX_CONNECTIONS`] at
//! once (each is a task; past the cap new ones wait in the kernel's
//! backlog), [`HANDSHAKE`] to finish a TLS handshake, [`HEADER_READ`] to
//! send a request's headers and [`BODY_READ`] its body, and at most
//! [`webconfig::BCRYPT_AT_ONCE`] password checks at a time, off the event
//! loop.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    sync::{Semaphore, mpsc, oneshot},
};

use super::{
    alerts, metrics,
    webconfig::{self, Auth},
};

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 512;
/// Time for a client to complete the TLS handshake.
pub const HANDSHAKE: Duration = Duration::from_secs(5);
/// Time for a client to send a request's headers (hyper closes the
/// connection past it).
pub const HEADER_READ: Duration = Duration::from_secs(5);
/// Time for a client to send a webhook's body.
pub const BODY_READ: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct Shared {
    pub registry: Arc<Registry>,
    pub ready: Arc<AtomicBool>,
    /// Where `POST /alertmanager` hands firing alerts to the agent's loop
    /// (`None`: no flight recorder, nothing to pin).
    pub alerts: Option<mpsc::Sender<alerts::Request>>,
    /// Basic-auth users (`--web-config-file`).
    pub auth: Option<Arc<Auth>>,
    /// Permits for concurrent bcrypt checks.
    pub bcrypt: Arc<Semaphore>,
}

impl Shared {
    pub fn new(registry: Registry) -> Shared {
        Shared {
            registry: Arc::new(registry),
            ready: Arc::default(),
            alerts: None,
            auth: None,
            bcrypt: Arc::new(Semaphore::new(webconfig::BCRYPT_AT_ONCE)),
        }
    }
}

type Resp = Response<Full<Bytes>>;

fn owned(status: StatusCode, body: String) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Answers one request.
pub fn respond(shared: &Shared, method: &Method, path: &str) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    match path {
        "/metrics" => match metrics::encode(&shared.registry) {
            Ok(body) => {
                let mut r = Response::new(Full::new(Bytes::from(body)));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static(metrics::CONTENT_TYPE),
                );
                r
            }
            Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n"),
        },
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if shared.ready.load(Ordering::Relaxed) => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not attached\n"),
        "/" => text(
            StatusCode::OK,
            "conntrack-trace agent: /metrics /healthz /readyz, POST /alertmanager\n",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Binds `addr` (before anything is loaded, so a taken port fails first).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Whether the request may proceed: no users configured, a probe path
/// (`/healthz`, `/readyz`: kubelet probes carry no credentials and the
/// answers say nothing), credentials verified before, or a bcrypt check
/// (on a blocking thread, [`webconfig::BCRYPT_AT_ONCE`] at a time) that
/// succeeds.
async fn authorized(shared: &Shared, req: &Request<Incoming>) -> bool {
    let Some(auth) = &shared.auth else {
        return true;
    };
    if matches!(req.uri().path(), "/healthz" | "/readyz") {
        return true;
    }
    let Some((user, password)) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|h| webconfig::basic_credentials(h.as_bytes()))
    else {
        return false;
    };
    if auth.known(&user, &password) {
        return true;
    }
    let Ok(_permit) = shared.bcrypt.acquire().await else {
        return false;
    };
    let auth = auth.clone();
    tokio::task::spawn_blocking(move || auth.verify(&user, &password))
        .await
        .unwrap_or(false)
}

fn unauthorized() -> Resp {
    let mut r = text(StatusCode::UNAUTHORIZED, "unauthorized\n");
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Basic realm=\"conntrack-trace\""),
    );
    r
}

/// `POST /alertmanager`: 405 for another method, 409 without a recorder,
/// 413 past [`alerts::MAX_BODY`], 400 for what is not a version-4
/// webhook; 200 once the agent's loop pinned the incident (or when no
/// alert fires). Nothing changes on a 4xx.
async fn webhook(shared: &Shared, req: Request<Incoming>) -> Resp {
    if req.method() != Method::POST {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only POST\n");
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
        return r;
    }
    let Some(tx) = &shared.alerts else {
        return text(
            StatusCode::CONFLICT,
            "no flight recorder (--record-dir): no incident to keep\n",
        );
    };
    let too_large = || {
        owned(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body over {} bytes\n", alerts::MAX_BODY),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > alerts::MAX_BODY as u64) {
        return too_large();
    }
    let body = Limited::new(req.into_body(), alerts::MAX_BODY).collect();
    let body = match tokio::time::timeout(BODY_READ, body).await {
        Err(_) => return text(StatusCode::REQUEST_TIMEOUT, "body too slow\n"),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return too_large(),
        Ok(Err(e)) => return owned(StatusCode::BAD_REQUEST, format!("reading body: {e}\n")),
        Ok(Ok(b)) => b.to_bytes(),
    };
    let firing = match alerts::firing(&body) {
        Ok(f) => f,
        Err(e) => return owned(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    if firing.alerts.is_empty() {
        return text(StatusCode::OK, "no firing alert: nothing to keep\n");
    }
    let (reply, answer) = oneshot::channel();
    if tx.try_send(alerts::Request { firing, reply }).is_err() {
        return text(StatusCode::SERVICE_UNAVAILABLE, "busy: try again\n");
    }
    match answer.await {
        Ok(Ok(dir)) => owned(StatusCode::OK, format!("incident {}\n", dir.display())),
        Ok(Err(e)) => owned(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, "stopping\n"),
    }
}

async fn handle(shared: Shared, req: Request<Incoming>) -> Resp {
    if !authorized(&shared, &req).await {
        return unauthorized();
    }
    if req.uri().path() == alerts::PATH {
        return webhook(&shared, req).await;
    }
    respond(&shared, req.method(), req.uri().path())
}

/// One connection's requests (HTTP/1.1, keep-alive).
async fn connection<S>(stream: S, shared: Shared)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req: Request<Incoming>| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(handle(shared, req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ)
        .serve_connection(TokioIo::new(stream), svc);
    let _ = conn.await;
}

/// Serves connections until the task is dropped. One task per connection;
/// a slow or broken client only costs its own task, for a bounded time. A
/// client speaking plain HTTP to the TLS listener fails the handshake and
/// is closed.
pub async fn serve(listener: TcpListener, shared: Shared, tls: Option<Arc<rustls::ServerConfig>>) {
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Ok((stream, _)) = listener.accept().await else {
            // EMFILE and friends: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let shared = shared.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match tls {
                None => connection(stream, shared).await,
                Some(acceptor) => {
                    if let Ok(Ok(s)) =
                        tokio::time::timeout(HANDSHAKE, acceptor.accept(stream)).await
                    {
                        connection(s, shared).await;
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_the_flag() {
        let m = metrics::Metrics::default();
        let shared = Shared::new(metrics::registry(&m));
        assert_eq!(respond(&shared, &Method::GET, "/readyz").status(), 503);
        assert_eq!(respond(&shared, &Method::GET, "/healthz").status(), 200);
        shared.ready.store(true, Ordering::Relaxed);
        assert_eq!(respond(&shared, &Method::GET, "/readyz").status(), 200);
        let r = respond(&shared, &Method::GET, "/metrics");
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()[header::CONTENT_TYPE], metrics::CONTENT_TYPE);
        assert_eq!(respond(&shared, &Method::POST, "/metrics").status(), 405);
        assert_eq!(respond(&shared, &Method::GET, "/x").status(), 404);
    }
}
