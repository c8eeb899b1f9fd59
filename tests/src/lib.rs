//! Helpers for the cross-crate tests: the workspace's real binaries, started on ephemeral
//! loopback ports, with tiny random models written by the tests themselves.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use dpo_common::testing::workspace_root;

pub mod faults;

/// Path of a workspace binary in the current profile's target directory, building it
/// first if `cargo test` was not run for the whole workspace.
pub fn binary(name: &str) -> PathBuf {
    // target/debug/deps/this_test-HASH → target/debug/NAME
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target dir").to_path_buf();
    let path = dir.join(name);
    if !path.exists() {
        let status = Command::new(env!("CARGO"))
            // By binary name alone: `dpo-eval` is a binary of the `policy-trainer` package.
            .args(["build", "--bin", name])
            .current_dir(workspace_root())
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build --bin {name} failed");
    }
    path
}

/// A `ref-server serve` child process, killed on drop.
pub struct Server {
    pub child: Child,
    pub url: String,
    pub log: PathBuf,
}

impl Server {
    /// Starts `ref-server serve --listen 127.0.0.1:0 ARGS`, reads the bound address from
    /// its `listening on` line and waits (`ref-server health --wait`) until SERVING.
    pub fn start(model: &Path, extra: &[&str], log_dir: &Path) -> Server {
        Self::start_at("127.0.0.1:0", model, extra, log_dir)
    }

    /// [`Server::start`] listening on `listen` (a fixed address, for a server started
    /// again where clients expect it).
    pub fn start_at(listen: &str, model: &Path, extra: &[&str], log_dir: &Path) -> Server {
        Self::start_with_env(listen, model, extra, &[], log_dir)
    }

    /// [`Server::start_at`] with environment variables set for the server (test hooks).
    pub fn start_with_env(
        listen: &str,
        model: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
        log_dir: &Path,
    ) -> Server {
        let log = log_dir.join("ref-server.log");
        let mut child = Command::new(binary("ref-server"))
            .envs(env.iter().copied())
            .arg("serve")
            .arg("--model")
            .arg(model)
            .args(["--listen", listen])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("server log"))
            .spawn()
            .expect("start ref-server");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("read ref-server stdout");
        let addr = line.trim().strip_prefix("listening on ").unwrap_or_else(|| {
            panic!(
                "unexpected first line from ref-server: {line:?}; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
        let url = format!("http://{addr}");
        // The one way to wait for a server: its own client, with a deadline, stopping
        // early if the server exits.
        let waited = Command::new(binary("ref-server"))
            .args(["health", "--server", &url, "--wait", "60"])
            .args(["--server-pid", &child.id().to_string()])
            .stdout(Stdio::null())
            .output()
            .expect("run ref-server health");
        assert!(
            waited.status.success(),
            "ref-server never became SERVING: {}; log:\n{}",
            String::from_utf8_lossy(&waited.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Server { child, url, log }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads a JSONL file into JSON values.
pub fn read_jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}

/// The records of one `kind` ("train", "eval") of a trainer's metrics log.
pub fn of_kind(records: &[serde_json::Value], kind: &str) -> Vec<serde_json::Value> {
    records.iter().filter(|r| r["kind"] == kind).cloned().collect()
}

/// A record's number `key`, failing the test naming the key when it is missing.
pub fn number(record: &serde_json::Value, key: &str) -> f64 {
    record[key].as_f64().unwrap_or_else(|| panic!("{key} missing in {record}"))
}
