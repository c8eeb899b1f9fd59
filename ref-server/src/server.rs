//! The transport: bind the listener, announce the address, serve `Reference` (behind the
//! bearer-token check), `grpc.health.v1` and server reflection, optionally over TLS, load
//! the model in the background, and shut down gracefully on SIGINT/SIGTERM (in-flight
//! requests finish; new connections are refused).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result};
use dpo_proto::v1;
use dpo_proto::v1::reference_server::ReferenceServer;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic_health::ServingStatus;

use crate::auth::BearerAuth;
use crate::config::LimitArgs;
use crate::engine::Engine;
use crate::message_limit::MessageLimit;
use crate::service::ReferenceService;

/// Everything `ref-server serve` needs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub model: PathBuf,
    pub device: String,
    pub dtype: String,
    pub listen: String,
    pub limits: LimitArgs,
    pub token: Option<String>,
    pub tls: Option<(PathBuf, PathBuf)>,
}

const REFERENCE_SERVICE: &str = "dpo.v1.Reference";

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

    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_service_status("", ServingStatus::NotServing).await;
    reporter.set_service_status(REFERENCE_SERVICE, ServingStatus::NotServing).await;

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

    let engine_cell: Arc<OnceLock<Arc<Engine>>> = Arc::new(OnceLock::new());
    let reference = ReferenceServer::new(ReferenceService::new(engine_cell.clone()))
        .max_decoding_message_size(opts.limits.max_message_bytes)
        .max_encoding_message_size(usize::MAX);
    let reference = tonic::service::interceptor::InterceptedService::new(
        reference,
        BearerAuth::new(opts.token.clone()),
    );
    let reference = MessageLimit::new(reference, opts.limits.max_message_bytes);

    let mut builder = Server::builder();
    if let Some((cert, key)) = &opts.tls {
        let read = |p: &PathBuf, what: &str| {
            std::fs::read(p).with_context(|| format!("cannot read the TLS {what} {}", p.display()))
        };
        let identity = Identity::from_pem(read(cert, "certificate")?, read(key, "key")?);
        builder = builder
            .tls_config(ServerTlsConfig::new().identity(identity))
            .context("invalid TLS certificate or key")?;
    }
    let router = builder
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(reference);

    // The one line scripts wait for; everything else goes to stderr.
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

    let (load_failed_tx, load_failed_rx) = tokio::sync::oneshot::channel::<anyhow::Error>();
    {
        let opts = opts.clone();
        let reporter = reporter.clone();
        tokio::spawn(async move {
            let loaded = tokio::task::spawn_blocking(move || {
                Engine::load(&opts.model, &opts.device, &opts.dtype, &opts.limits)
            })
            .await;
            match loaded {
                Ok(Ok(engine)) => {
                    let _ = engine_cell.set(Arc::new(engine));
                    reporter.set_service_status("", ServingStatus::Serving).await;
                    reporter.set_service_status(REFERENCE_SERVICE, ServingStatus::Serving).await;
                    tracing::info!("SERVING");
                }
                Ok(Err(e)) => {
                    let _ = load_failed_tx.send(e);
                }
                Err(e) => {
                    let _ = load_failed_tx.send(anyhow::anyhow!("model loading panicked: {e}"));
                }
            }
        });
    }

    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let mut load_error = None;
    let shutdown = async {
        tokio::select! {
            _ = shutdown_requested => tracing::info!("shutting down: finishing in-flight requests"),
            // A dropped sender means the model loaded: that branch is then disabled.
            Ok(e) = load_failed_rx => load_error = Some(e),
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
