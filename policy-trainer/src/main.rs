//! `policy-trainer`: DPO training of a Llama policy against a reference server. Flag
//! parsing and start-up only; the work lives in the library (`policy_trainer::train`).

use clap::{Parser, Subcommand};
use policy_trainer::args::TrainArgs;

#[derive(Parser)]
#[command(version, about = "DPO fine-tuning of a Llama policy against a ref-server reference")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train with DPO; writes best/, last/, metrics.jsonl and the chart under --out.
    /// A flag given twice takes its last value (so wrappers can set defaults).
    #[command(args_override_self = true)]
    Train(Box<TrainArgs>),
}

fn main() -> std::process::ExitCode {
    dpo_common::startup::init(dpo_common::startup::Startup::TRAINER);
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(args) => policy_trainer::train::run(*args).map(|summary| {
            println!("{summary}");
        }),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
