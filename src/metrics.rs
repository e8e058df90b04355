//! Prometheus exposition over HTTP, for every damselfly binary: a registry of
//! `prometheus-client` metrics served as text on `GET /metrics`, and the
//! probes of the same listener: `GET /healthz` (200 while the process
//! answers) and `GET /readyz` (200 once the daemon serves what it is for,
//! as its [`Readiness`] says; 503 before).
//!
//! To expose a daemon's metrics: register them in a
//! [`prometheus_client::registry::Registry`], bind a [`TcpListener`] on the
//! `--metrics-listen` address, and spawn [`serve`] with it and the shutdown
//! future the daemon already has.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Whether the daemon is ready, asked at each `/readyz`.
pub type Readiness = Arc<dyn Fn() -> bool + Send + Sync>;

/// Serves `registry` on `GET /metrics`, and the probes, over `listener`
/// until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    ready: Readiness,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr().context("metrics listener address")?;
    let app = Router::new()
        .route("/metrics", get(move || scrape(registry.clone())))
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.clone();
                async move {
                    match tokio::task::spawn_blocking(move || ready()).await {
                        Ok(true) => (StatusCode::OK, "ready\n"),
                        _ => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
                    }
                }
            }),
        );
    tracing::info!(%addr, "serving metrics on /metrics");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .with_context(|| format!("serve metrics on {addr}"))
}

/// The registry's metrics in the Prometheus/OpenMetrics text format.
pub fn render(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry)
        .expect("writing to a String cannot fail");
    text
}

async fn scrape(registry: Arc<Registry>) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        render(&registry),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn serves_the_registry_on_metrics() {
        let mut registry = Registry::with_prefix("test");
        let requests: Counter = Counter::default();
        registry.register("requests", "Requests served", requests.clone());
        requests.inc_by(3);

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readiness: Readiness = {
            let ready = ready.clone();
            Arc::new(move || ready.load(std::sync::atomic::Ordering::SeqCst))
        };
        let server = tokio::spawn(serve(listener, Arc::new(registry), readiness, async {
            stopped.await.ok();
        }));
        let get = |path: &'static str| async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.unwrap();
            answer
        };

        let answer = get("/metrics").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains(CONTENT_TYPE), "{answer}");
        assert!(answer.contains("test_requests_total 3"), "{answer}");
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get("/readyz").await.starts_with("HTTP/1.1 503"));
        ready.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));

        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
