//! `ref-server`: command-line parsing and start-up only; the work lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use dpo_common::template::Template;
use dpo_proto::client::{ClientOptions, RefClient};
use dpo_proto::token::load_token;
use ref_server::config::LimitArgs;
use ref_server::engine::Engine;
use ref_server::score_cli::{self, ScoreOptions, Scorer};
use ref_server::server::{serve, ServeOptions};

#[derive(Parser)]
#[command(
    name = "ref-server",
    version,
    about = "The frozen DPO reference model as a gRPC scoring service"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the dpo.v1.Reference gRPC API (plus grpc.health.v1 and reflection).
    Serve(ServeArgs),
    /// Score a JSONL file against a server (--server) or a local model (--model).
    Score(ScoreArgs),
    /// Exit 0 iff the server's health check reports SERVING.
    Health(ConnectArgs),
    /// Print the server's ModelInfo as JSON.
    Info(ConnectArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Model: a Hugging Face directory or a .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Address to listen on; port 0 picks a free port (printed as `listening on IP:PORT`).
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: String,
    #[command(flatten)]
    limits: LimitArgs,
    /// File holding the bearer token clients must send (else env DPO_AUTH_TOKEN; neither:
    /// no authentication).
    #[arg(long)]
    auth_token_file: Option<PathBuf>,
    /// PEM certificate chain to serve TLS with (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ConnectArgs {
    /// Server URL, http://HOST:PORT or https://HOST:PORT.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    server: String,
    /// PEM CA certificate to trust for https:// (default: system roots).
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Server name to check the certificate against (default: the URL's host).
    #[arg(long)]
    tls_domain: Option<String>,
    /// Bearer token file (else env DPO_AUTH_TOKEN).
    #[arg(long)]
    auth_token_file: Option<PathBuf>,
    /// Seconds to wait for the connection.
    #[arg(long, default_value_t = 10)]
    connect_timeout: u64,
}

impl ConnectArgs {
    async fn connect(&self) -> Result<RefClient> {
        let opts = ClientOptions {
            url: self.server.clone(),
            token: load_token(self.auth_token_file.as_deref())?,
            ca_cert: self.tls_ca.clone(),
            tls_domain: self.tls_domain.clone(),
            connect_timeout: Duration::from_secs(self.connect_timeout),
            ..ClientOptions::default()
        };
        Ok(RefClient::connect(&opts).await?)
    }
}

#[derive(clap::Args)]
struct ScoreArgs {
    /// Input JSONL (`-` = stdin).
    #[arg(long, default_value = "-")]
    input: PathBuf,
    /// Output JSONL (`-` = stdout).
    #[arg(long, default_value = "-")]
    output: PathBuf,
    /// Score against this running server ...
    #[arg(long, conflicts_with = "model", required_unless_present = "model")]
    server: Option<String>,
    /// ... or load this model locally (Hugging Face directory or .gguf).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Local model: `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Local model: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Prompt template: `alpaca` (the prompt is an instruction) or `raw`.
    #[arg(long, default_value = "alpaca")]
    template: Template,
    /// Input lines per request.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Server: PEM CA certificate for https://.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Server: name to check the certificate against.
    #[arg(long)]
    tls_domain: Option<String>,
    /// Server: bearer token file (else env DPO_AUTH_TOKEN).
    #[arg(long)]
    auth_token_file: Option<PathBuf>,
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: logs redirected to a file stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

#[tokio::main]
async fn main() -> ExitCode {
    init_logging();
    match run(Cli::parse()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ref-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Serve(a) => {
            let tls = a.tls_cert.zip(a.tls_key);
            serve(ServeOptions {
                token: load_token(a.auth_token_file.as_deref())?,
                model: a.model,
                device: a.device,
                dtype: a.dtype,
                listen: a.listen,
                limits: a.limits,
                tls,
            })
            .await?;
        }
        Command::Score(a) => {
            let scorer = match (&a.server, &a.model) {
                (Some(url), _) => Scorer::Remote(Box::new(
                    ConnectArgs {
                        server: url.clone(),
                        tls_ca: a.tls_ca.clone(),
                        tls_domain: a.tls_domain.clone(),
                        auth_token_file: a.auth_token_file.clone(),
                        connect_timeout: 10,
                    }
                    .connect()
                    .await?,
                )),
                (None, Some(model)) => {
                    let (model, device, dtype) = (model.clone(), a.device.clone(), a.dtype.clone());
                    let engine = tokio::task::spawn_blocking(move || {
                        Engine::load(&model, &device, &dtype, &LimitArgs::default_for_cli())
                    })
                    .await
                    .context("model loading panicked")??;
                    Scorer::Local(Arc::new(engine))
                }
                (None, None) => unreachable!("clap requires --server or --model"),
            };
            let opts = ScoreOptions {
                input: a.input,
                output: a.output,
                template: a.template,
                batch_size: a.batch_size,
            };
            let n = score_cli::run(&scorer, &opts).await?;
            tracing::info!("scored {n} lines");
        }
        Command::Health(a) => {
            let serving = a.connect().await?.health().await?;
            if serving {
                println!("SERVING");
            } else {
                eprintln!("{} is up but NOT_SERVING (still loading the model?)", a.server);
                return Ok(ExitCode::from(1));
            }
        }
        Command::Info(a) => {
            let info = a.connect().await?.model_info().await?;
            println!("{}", serde_json::to_string_pretty(&info_json(&info))?);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn info_json(i: &dpo_proto::client::ModelInfo) -> serde_json::Value {
    serde_json::json!({
        "architecture": i.architecture,
        "vocab_size": i.vocab_size,
        "max_sequence_length": i.max_sequence_length,
        "dtype": i.dtype,
        "device": i.device,
        "fingerprint": i.fingerprint,
        "source": i.source,
        "eos_token_id": i.eos_token_id,
        "bos_token_id": i.bos_token_id,
        "adds_bos": i.adds_bos,
        "num_parameters": i.num_parameters,
        "max_tokens_per_item": i.max_tokens_per_item,
        "max_tokens_per_request": i.max_tokens_per_request,
        "max_items_per_request": i.max_items_per_request,
        "max_message_bytes": i.max_message_bytes,
        "batch_token_budget": i.batch_token_budget,
    })
}
