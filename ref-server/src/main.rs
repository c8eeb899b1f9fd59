//! `ref-server`: command-line parsing and start-up only; the work lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use dpo_common::template::Template;
use dpo_proto::token::load_token;
use ref_server::config::{LimitArgs, StoreArgs};
use ref_server::connect::ConnectArgs;
use ref_server::engine::Engine;
use ref_server::health_cli::{self, HealthArgs};
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
    /// Exit 0 iff the server's health check reports SERVING (with --wait: once it does).
    Health(HealthArgs),
    /// Print the server's ModelInfo as JSON.
    Info(ConnectArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Model: a Hugging Face directory or a .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// A LoRA adapter in PEFT's format (a LoRA run's best/ or last/), added into --model's
    /// weights: the model served is base + adapter, as `--save-merged` would write it.
    #[arg(long, value_name = "DIR")]
    adapter: Option<PathBuf>,
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
    #[command(flatten, next_help_heading = "Score store")]
    store: StoreArgs,
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
    /// Serve Prometheus metrics (`GET /metrics`, plain HTTP, no token: counters only) on
    /// this address, e.g. 0.0.0.0:9090; port 0 picks a free port (logged) [default: off].
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
}

// `--server` comes from the shared connection flags, without their default URL: the
// command needs it or --model, not both.
#[derive(clap::Args)]
#[command(mut_arg("server", |a| a
    .default_value(None::<&str>)
    .required_unless_present("model")
    .conflicts_with("model")
    .help("Score against this running server (else --model)")))]
struct ScoreArgs {
    /// Input JSONL (`-` = stdin).
    #[arg(long, default_value = "-")]
    input: PathBuf,
    /// Output JSONL (`-` = stdout).
    #[arg(long, default_value = "-")]
    output: PathBuf,
    /// Score with this model loaded here instead (Hugging Face directory or .gguf).
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
    #[command(flatten, next_help_heading = "Connection (with --server)")]
    connect: ConnectArgs,
}

fn main() -> ExitCode {
    // Before the runtime's threads exist (see the function's note).
    dpo_common::startup::init(dpo_common::startup::Startup::SERVER);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("ref-server: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async_main())
}

async fn async_main() -> ExitCode {
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
                adapter: a.adapter,
                device: a.device,
                dtype: a.dtype,
                listen: a.listen,
                limits: a.limits,
                store: a.store,
                tls,
                metrics_listen: a.metrics_listen,
            })
            .await?;
        }
        Command::Score(a) => {
            // clap lets exactly one of --server and --model through.
            let scorer = match &a.model {
                None => Scorer::remote(a.connect.connect().await?).await?,
                Some(model) => {
                    let (model, device, dtype) = (model.clone(), a.device.clone(), a.dtype.clone());
                    let engine = tokio::task::spawn_blocking(move || {
                        Engine::load(
                            &model,
                            None,
                            &device,
                            &dtype,
                            &LimitArgs::default_for_cli(),
                            &StoreArgs::none(),
                        )
                    })
                    .await
                    .context("model loading panicked")??;
                    Scorer::Local(Arc::new(engine))
                }
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
        Command::Health(a) => return health_cli::run(&a).await,
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
        "score_store": i.score_store.as_ref().map(|s| serde_json::json!({
            "enabled": s.enabled,
            "path": s.path,
            "entries": s.entries,
            "bytes": s.bytes,
            "max_bytes": s.max_bytes,
            "hits": s.hits,
            "misses": s.misses,
            "single_flight_waits": s.single_flight_waits,
            "evictions": s.evictions,
            "forward_tokens": s.forward_tokens,
        })),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("ref-server").chain(args.iter().copied()))
    }

    fn connect(args: &[&str]) -> ConnectArgs {
        match parse(args).unwrap().command {
            Command::Health(h) => h.connect,
            Command::Info(c) => c,
            Command::Score(s) => s.connect,
            Command::Serve(_) => panic!("serve has no connection flags"),
        }
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_client_command_takes_the_connection_flags() {
        let flags = [
            "--server",
            "https://h:1",
            "--tls-ca",
            "ca.pem",
            "--tls-domain",
            "localhost",
            "--auth-token-file",
            "t",
            "--connect-timeout",
            "2",
        ];
        for cmd in ["health", "info", "score"] {
            let c = connect(&[&[cmd][..], &flags].concat());
            assert_eq!(c.server.as_deref(), Some("https://h:1"), "{cmd}");
            assert_eq!(c.tls_ca, Some(PathBuf::from("ca.pem")), "{cmd}");
            assert_eq!(c.tls_domain.as_deref(), Some("localhost"), "{cmd}");
            assert_eq!(c.auth_token_file, Some(PathBuf::from("t")), "{cmd}");
            assert_eq!(c.connect_timeout, 2, "{cmd}");
        }
        // health and info default to serve's default address.
        assert_eq!(connect(&["health"]).server.as_deref(), Some("http://127.0.0.1:50051"));
        assert_eq!(connect(&["info"]).connect_timeout, 10);
    }

    #[test]
    fn health_waits_only_when_asked() {
        let Command::Health(h) = parse(&["health"]).unwrap().command else { panic!() };
        assert_eq!((h.wait, h.server_pid), (None, None));
        let args = ["health", "--server", "http://h:1", "--wait", "30", "--server-pid", "42"];
        let Command::Health(h) = parse(&args).unwrap().command else { panic!() };
        assert_eq!((h.wait, h.server_pid), (Some(30), Some(42)));
        // A process to watch only makes sense while waiting.
        assert!(parse(&["health", "--server-pid", "42"]).is_err());
    }

    #[test]
    fn metrics_listen_takes_a_socket_address() {
        let Command::Serve(s) = parse(&["serve", "--model", "m"]).unwrap().command else {
            panic!()
        };
        assert_eq!(s.metrics_listen, None);
        let args = ["serve", "--model", "m", "--metrics-listen", "0.0.0.0:9090"];
        let Command::Serve(s) = parse(&args).unwrap().command else { panic!() };
        assert_eq!(s.metrics_listen, Some("0.0.0.0:9090".parse().unwrap()));
        let bad = parse(&["serve", "--model", "m", "--metrics-listen", "9090"]).err().unwrap();
        assert!(bad.to_string().contains("--metrics-listen"), "{bad}");
    }

    #[test]
    fn the_score_store_is_off_unless_named() {
        let Command::Serve(s) = parse(&["serve", "--model", "m"]).unwrap().command else {
            panic!()
        };
        assert_eq!((s.store.score_store, s.store.score_store_max_mb), (None, 1024));
        let args =
            ["serve", "--model", "m", "--score-store", "s.redb", "--score-store-max-mb", "64"];
        let Command::Serve(s) = parse(&args).unwrap().command else { panic!() };
        assert_eq!(s.store.score_store, Some(PathBuf::from("s.redb")));
        assert_eq!(s.store.max_bytes(), Ok(64 << 20));
        // The store's other flags mean nothing without one.
        assert!(parse(&["serve", "--model", "m", "--score-store-reset"]).is_err());
        assert!(parse(&["serve", "--model", "m", "--score-store-max-mb", "8"]).is_err());
    }

    #[test]
    fn score_needs_exactly_one_of_server_and_model() {
        assert!(parse(&["score", "--model", "m.gguf"]).is_ok());
        assert_eq!(connect(&["score", "--model", "m.gguf"]).server, None);
        assert!(parse(&["score", "--server", "http://h:1"]).is_ok());
        let neither = parse(&["score"]).err().expect("neither");
        assert!(neither.to_string().contains("--server"), "{neither}");
        assert!(parse(&["score", "--server", "http://h:1", "--model", "m"]).is_err());
    }
}
