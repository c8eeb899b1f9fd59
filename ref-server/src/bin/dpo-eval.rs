//! `dpo-eval`: command-line parsing and start-up only; the benchmarks live in
//! `ref_server::eval`.

use std::process::ExitCode;

use clap::Parser;
use ref_server::eval::{self, Cli};

fn main() -> ExitCode {
    dpo_common::startup::init(dpo_common::startup::Startup::SERVER); // before any thread
    match eval::run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
