//! Prometheus exposition over HTTP, for every damselfly binary: a registry of
//! `prometheus-client` metrics served as text on `GET /metrics`.
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

/// Serves `registry` on `GET /metrics` over `listener` until `shutdown`
/// completes.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr().context("metrics listener address")?;
    let app = Router::new().route("/metrics", get(move || scrape(registry.clone())));
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
        let server = tokio::spawn(serve(listener, Arc::new(registry), async {
            stopped.await.ok();
        }));

        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains(CONTENT_TYPE), "{answer}");
        assert!(answer.contains("test_requests_total 3"), "{answer}");

        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
