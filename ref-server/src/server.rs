//! The transport: bind the listener, announce the address, serve `Reference` (behind the
//! bearer-token check), `grpc.health.v1` and server reflection, optionally over TLS, load
//! the model in the background, and shut down gracefully on SIGINT/SIGTERM (in-flight
//! requests finish; new connections are refused). Every call is counted by the
//! [`GrpcMetricsLayer`]; with `--metrics-listen` the metrics are served on their own port.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result};
use dpo_proto::v1;
use dpo_proto::v1::reference_server::ReferenceServer;
use tonic::transport::server::Router;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic_health::ServingStatus;
use tower_layer::Stack;

use crate::auth::BearerAuth;
use crate::config::{LimitArgs, StoreArgs};
use crate::engine::Engine;
use crate::message_limit::MessageLimit;
use crate::metrics::endpoint::MetricsEndpoint;
use crate::metrics::grpc::GrpcMetricsLayer;
use crate::metrics::{metrics, ModelState, StoreCounters};
use crate::service::ReferenceService;

/// Everything `ref-server serve` needs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub model: PathBuf,
    /// A PEFT LoRA adapter directory merged into `model` before serving.
    pub adapter: Option<PathBuf>,
    pub device: String,
    pub dtype: String,
    pub listen: String,
    pub limits: LimitArgs,
    pub store: StoreArgs,
    pub token: Option<String>,
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Where to serve Prometheus metrics (`GET /metrics`); `None`: not served.
    pub metrics_listen: Option<SocketAddr>,
}

const REFERENCE_SERVICE: &str = "dpo.v1.Reference";

/// Every route behind the [`GrpcMetricsLayer`].
type MeteredRouter = Router<Stack<GrpcMetricsLayer, tower_layer::Identity>>;

/// The model once loaded; the service answers `UNAVAILABLE` until it is set.
type EngineCell = Arc<OnceLock<Arc<Engine>>>;

/// Serves until SIGINT/SIGTERM (then finishes in-flight requests) or until loading the
/// model fails (returned as the error).
pub async fn serve(opts: ServeOptions) -> Result<()> {
    // A mistyped path fails before the address is announced; loading itself runs after.
    if !opts.model.exists() {
        anyhow::bail!("the model {} does not exist", opts.model.display());
    }
    // Installed before the address is announced, so a SIGTERM right after start-up is
    // already a graceful shutdown rather than the default kill.
    let shutdown_requested = shutdown_signal()?;
    let listener = tokio::net::TcpListener::bind(&opts.listen)
        .await
        .with_context(|| format!("cannot listen on {}", opts.listen))?;
    let addr: SocketAddr = listener.local_addr().context("reading the bound address")?;
    let metrics_endpoint = match opts.metrics_listen {
        Some(at) => Some(MetricsEndpoint::bind(at).await?),
        None => None,
    };

    let (reporter, health) = tonic_health::server::health_reporter();
    set_serving(&reporter, ServingStatus::NotServing).await;
    let engine_cell: EngineCell = Arc::new(OnceLock::new());
    let router = services(&opts, health, engine_cell.clone())?;

    announce(addr, &opts)?;
    let exporter = metrics_endpoint.map(|endpoint| {
        tracing::info!("serving Prometheus metrics on http://{}/metrics", endpoint.local_addr());
        endpoint.spawn()
    });
    let load_failed = load_in_background(&opts, engine_cell, reporter);
    let served = serve_until_shutdown(router, listener, shutdown_requested, load_failed).await;
    if let Some(exporter) = exporter {
        exporter.abort();
    }
    served
}

/// The health status of the whole server and of the `Reference` service, which move
/// together (both follow the model's loading).
async fn set_serving(reporter: &tonic_health::server::HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    reporter.set_service_status(REFERENCE_SERVICE, status).await;
}

/// Every service behind one router, over TLS when a certificate is given: health,
/// reflection (both versions grpcurl may ask for) and `Reference` behind the bearer-token
/// check and the request-size limit; every call counted by the metrics layer.
fn services(
    opts: &ServeOptions,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    engine_cell: EngineCell,
) -> Result<MeteredRouter> {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("building the reflection service")?;

    let reference = ReferenceServer::new(ReferenceService::new(engine_cell))
        .max_decoding_message_size(opts.limits.max_message_bytes)
        .max_encoding_message_size(usize::MAX);
    let reference = tonic::service::interceptor::InterceptedService::new(
        reference,
        BearerAuth::new(opts.token.clone()),
    );
    let reference = MessageLimit::new(reference, opts.limits.max_message_bytes);

    let mut builder = Server::builder().layer(GrpcMetricsLayer);
    if let Some((cert, key)) = &opts.tls {
        builder =
            builder.tls_config(tls_config(cert, key)?).context("invalid TLS certificate or key")?;
    }
    Ok(builder
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(reference))
}

fn tls_config(cert: &Path, key: &Path) -> Result<ServerTlsConfig> {
    let read = |p: &Path, what: &str| {
        std::fs::read(p).with_context(|| format!("cannot read the TLS {what} {}", p.display()))
    };
    let identity = Identity::from_pem(read(cert, "certificate")?, read(key, "key")?);
    Ok(ServerTlsConfig::new().identity(identity))
}

/// Prints `listening on ADDR` to stdout: the one line scripts wait for (everything else
/// goes to stderr).
fn announce(addr: SocketAddr, opts: &ServeOptions) -> Result<()> {
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {addr}").context("writing to stdout")?;
        out.flush().context("writing to stdout")?;
    }
    tracing::info!(
        %addr,
        tls = opts.tls.is_some(),
        auth = opts.token.is_some(),
        "serving; loading the model {}",
        opts.model.display()
    );
    Ok(())
}

/// Loads the model on a blocking thread while the server already answers (health:
/// NOT_SERVING; `Reference`: UNAVAILABLE). Once loaded the engine is set and health
/// reports SERVING; a failure arrives on the returned channel. The sender is dropped on
/// success, so the receiver then resolves to an error.
fn load_in_background(
    opts: &ServeOptions,
    engine_cell: EngineCell,
    reporter: tonic_health::server::HealthReporter,
) -> tokio::sync::oneshot::Receiver<anyhow::Error> {
    let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<anyhow::Error>();
    let opts = opts.clone();
    metrics().model_state(ModelState::Loading);
    tokio::spawn(async move {
        let started = std::time::Instant::now();
        let loaded = tokio::task::spawn_blocking(move || {
            Engine::load(
                &opts.model,
                opts.adapter.as_deref(),
                &opts.device,
                &opts.dtype,
                &opts.limits,
                &opts.store,
            )
        })
        .await;
        match loaded {
            Ok(Ok(engine)) => {
                metrics().model_loaded(&engine.model_info(), started.elapsed());
                // The store's counters, read at every scrape.
                let stats = Arc::clone(engine.score_stats());
                metrics().set_store_source(move || {
                    let s = stats.snapshot();
                    StoreCounters {
                        hits: s.hits,
                        misses: s.misses,
                        single_flight_waits: s.single_flight_waits,
                        evictions: s.evictions,
                    }
                });
                let _ = engine_cell.set(Arc::new(engine));
                set_serving(&reporter, ServingStatus::Serving).await;
                tracing::info!("SERVING");
            }
            Ok(Err(e)) => {
                metrics().model_state(ModelState::Failed);
                let _ = failed_tx.send(e);
            }
            Err(e) => {
                metrics().model_state(ModelState::Failed);
                let _ = failed_tx.send(anyhow::anyhow!("model loading panicked: {e}"));
            }
        }
    });
    failed_rx
}

/// Serves the listener until a shutdown signal (in-flight requests finish first) or a
/// failed model load, which is returned as the error.
async fn serve_until_shutdown(
    router: MeteredRouter,
    listener: tokio::net::TcpListener,
    shutdown_requested: impl std::future::Future<Output = ()>,
    load_failed: tokio::sync::oneshot::Receiver<anyhow::Error>,
) -> Result<()> {
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let mut load_error = None;
    let shutdown = async {
        tokio::select! {
            _ = shutdown_requested => tracing::info!("shutting down: finishing in-flight requests"),
            // A dropped sender means the model loaded: that branch is then disabled.
            Ok(e) = load_failed => load_error = Some(e),
        }
    };
    router.serve_with_incoming_shutdown(incoming, shutdown).await.context("serving")?;
    if let Some(e) = load_error {
        return Err(e);
    }
    tracing::info!("stopped");
    Ok(())
}

/// Installs the SIGINT/SIGTERM handlers; the future resolves when either arrives.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    Ok(async move {
        #[cfg(unix)]
        let term = term.recv();
        #[cfg(not(unix))]
        let term = std::future::pending::<Option<()>>();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
    })
}
