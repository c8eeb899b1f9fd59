//! `dpo-eval`: command-line parsing and start-up only; the benchmarks live in
//! `ref_server::eval`.

use std::process::ExitCode;

use clap::Parser;
use ref_server::eval::{self, Cli};

fn main() -> ExitCode {
    dpo_common::model::ops::fix_thread_count(); // before any other thread exists
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    match eval::run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
