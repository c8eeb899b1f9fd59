//! `GET /metrics` in Prometheus' text format, on its own port (`--metrics-listen`).
//!
//! Plain HTTP without the bearer token, as scrapers expect: the page holds counters,
//! gauges and histograms only, and the model's fingerprint, dtype and device; never a
//! request's content. The gRPC port keeps its token and TLS.
//!
//! Served with axum, which tonic already links: the exporter adds no HTTP stack of its own.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

use super::metrics;

/// The flag that sets the address, named in errors.
const FLAG: &str = "--metrics-listen";

/// The metrics listener, bound (so start-up fails early on a port in use) but not yet
/// serving.
pub struct MetricsEndpoint {
    listener: TcpListener,
    addr: SocketAddr,
}

impl MetricsEndpoint {
    /// Binds `addr`; the error names the flag and the address.
    pub async fn bind(addr: SocketAddr) -> Result<MetricsEndpoint> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("{FLAG} {addr}: cannot listen for Prometheus metrics"))?;
        let addr = listener.local_addr().context("reading the metrics listener's address")?;
        Ok(MetricsEndpoint { listener, addr })
    }

    /// The bound address (the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves scrapes until the returned task is aborted.
    pub fn spawn(self) -> tokio::task::JoinHandle<()> {
        let app = axum::Router::new().route("/metrics", get(scrape)).fallback(not_found);
        tokio::spawn(async move {
            if let Err(e) = axum::serve(self.listener, app).await {
                tracing::error!("the metrics endpoint stopped: {e}");
            }
        })
    }
}

async fn scrape() -> axum::response::Response {
    match metrics().render() {
        Ok(text) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response(),
        Err(e) => {
            tracing::error!("rendering the metrics failed: {e}");
            (StatusCode::INTERNAL_SERVER_ERROR, format!("rendering the metrics failed: {e}\n"))
                .into_response()
        }
    }
}

async fn not_found() -> (StatusCode, &'static str) {
    (StatusCode::NOT_FOUND, "not found: the metrics are at /metrics\n")
}
