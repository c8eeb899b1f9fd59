//! `ref-server health`: whether a server is SERVING, now or (with `--wait`) within a
//! deadline (for a fleet, once one replica serves the model every replica reports). The one way scripts and tests wait for a server they started: read its
//! `listening on` line, then `ref-server health --server URL --wait SECS --server-pid PID`.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use dpo_proto::client::ReplicaClient;
use dpo_proto::connect::ConnectArgs;
use dpo_proto::fleet::RefClient;

#[derive(Debug, Clone, clap::Args)]
pub struct HealthArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Wait up to this many seconds for the server to be SERVING (retrying while it is not
    /// listening yet or still loading its model) instead of answering at once.
    #[arg(long, value_name = "SECONDS")]
    pub wait: Option<u64>,
    /// With --wait: give up as soon as this process has exited (the server a script has
    /// just started), instead of waiting out the deadline.
    #[arg(long, value_name = "PID", requires = "wait")]
    pub server_pid: Option<u32>,
}

/// Prints `SERVING` and succeeds when the server is SERVING; without `--wait`, a server
/// that is up but still loading exits 1 with a message, and an unreachable one is an error.
pub async fn run(args: &HealthArgs) -> Result<ExitCode> {
    let opts = args.connect.options()?;
    let fleet = opts.url.contains(',') || opts.url.trim_start().starts_with("dns:");
    let Some(wait) = args.wait else {
        if fleet {
            bail!(
                "without --wait, health checks one server: give one URL (with --wait, a list \
                 or dns:/// name is SERVING once one replica is)"
            );
        }
        let client = ReplicaClient::connect(&opts).await?;
        if client.health().await? {
            println!("SERVING");
            return Ok(ExitCode::SUCCESS);
        }
        eprintln!("{} is up but NOT_SERVING (still loading the model?)", client.url());
        return Ok(ExitCode::from(1));
    };
    let patience = Duration::from_secs(wait);
    // One server: its health check alone, which needs no token. A fleet: a replica
    // SERVING the model every replica found reports (ModelInfo: the token if required).
    let waiting = async {
        match fleet {
            true => RefClient::wait_until_serving(&opts, patience).await.map(drop),
            false => ReplicaClient::wait_until_serving(&opts, patience).await.map(drop),
        }
    };
    match args.server_pid {
        None => {
            waiting.await?;
        }
        Some(pid) => tokio::select! {
            waited = waiting => { waited?; }
            () = exited(pid) => bail!(
                "the server process {pid} exited before {} was SERVING",
                opts.url
            ),
        },
    }
    println!("SERVING");
    Ok(ExitCode::SUCCESS)
}

/// Resolves once process `pid` has exited.
async fn exited(pid: u32) {
    while process_alive(pid) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether `pid` is a running process. A zombie (exited, not yet reaped by its parent)
/// counts as exited: a script's background server stays one until the script waits.
fn process_alive(pid: u32) -> bool {
    if std::path::Path::new("/proc/self/stat").exists() {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return false;
        };
        // "PID (COMMAND) STATE ...": the command may hold spaces and parentheses.
        let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
        return !matches!(state, Some("Z" | "X") | None);
    }
    // Without /proc: `kill -0` says whether the process exists.
    std::process::Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_finished_child_is_not() {
        assert!(process_alive(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Exited but not reaped yet: a zombie.
        std::thread::sleep(Duration::from_millis(200));
        assert!(!process_alive(pid));
        child.wait().unwrap();
        assert!(!process_alive(pid));
    }
}
