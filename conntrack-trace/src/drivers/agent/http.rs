//! The agent's HTTP endpoints: `/metrics` (Prometheus text), `/healthz`
//! (the process serves), `/readyz` (programs attached and metrics live).

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use super::metrics;

#[derive(Clone)]
pub struct Shared {
    pub registry: Arc<Registry>,
    pub ready: Arc<AtomicBool>,
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
            "conntrack-trace agent: /metrics /healthz /readyz\n",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Binds `addr` (before anything is loaded, so a taken port fails first).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves connections until the task is dropped. One task per connection;
/// a slow or broken client only costs its own task.
pub async fn serve(listener: TcpListener, shared: Shared) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // EMFILE and friends: back off instead of spinning.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let r = respond(&shared, req.method(), req.uri().path());
                async move { Ok::<_, Infallible>(r) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            let _ = conn.await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_the_flag() {
        let m = metrics::Metrics::default();
        let shared = Shared {
            registry: Arc::new(metrics::registry(&m)),
            ready: Arc::default(),
        };
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
