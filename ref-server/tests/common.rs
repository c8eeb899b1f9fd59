//! Test fixture: a tiny random checkpoint and the real `ref-server` binary on an ephemeral
//! loopback port (the address read back from its `listening on` line; readiness by the
//! clients' own wait for a SERVING health check, never by sleeping a fixed time).

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use dpo_common::logprob::{response_logprobs, Sequence};
use dpo_common::model::load::{load_model, LoadedModel};
use dpo_common::model::Mode;
use dpo_common::testing::{write_tiny_checkpoint, TinySpec};
use dpo_proto::client::{ClientOptions, ReplicaClient};

pub const BIN: &str = env!("CARGO_BIN_EXE_ref-server");

pub fn tiny_model(dir: &Path) -> PathBuf {
    let path = dir.join("tiny");
    write_tiny_checkpoint(&path, &TinySpec::default(), DType::F32, None).expect("tiny checkpoint");
    path
}

pub fn load_local(model: &Path) -> LoadedModel {
    load_model(model, Mode::Frozen, DType::F32, &Device::Cpu).expect("local model")
}

/// Summed log-probs computed in-process, one sequence at a time.
pub fn local_scores(m: &LoadedModel, seqs: &[Sequence]) -> Vec<f64> {
    seqs.iter()
        .map(|s| {
            response_logprobs(&m.model, std::slice::from_ref(s)).unwrap().sums_vec().unwrap()[0]
        })
        .collect()
}

pub struct Server {
    pub child: Child,
    pub addr: String,
    pub url: String,
}

/// A server's stderr, line by line, as it is written (each line also echoed to the test's
/// stderr).
pub struct Logs {
    rx: tokio::sync::mpsc::UnboundedReceiver<String>,
    /// Every line received so far.
    pub seen: Vec<String>,
}

impl Logs {
    /// Waits (up to `timeout`) for the next line containing `needle` and returns it.
    pub async fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        let found = tokio::time::timeout(timeout, async {
            while let Some(line) = self.rx.recv().await {
                self.seen.push(line.clone());
                if line.contains(needle) {
                    return Some(line);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(line)) => line,
            Ok(None) => panic!("the server's stderr ended without a line containing {needle:?}"),
            Err(_) => panic!("no line containing {needle:?} on the server's stderr in {timeout:?}"),
        }
    }

    /// Reads the remaining lines until the server closes its stderr.
    pub async fn rest(&mut self) -> &[String] {
        while let Some(line) = self.rx.recv().await {
            self.seen.push(line);
        }
        &self.seen
    }
}

impl Server {
    pub fn start(model: &Path, extra: &[&str], envs: &[(&str, &str)]) -> Server {
        Self::spawn(model, extra, envs, Stdio::inherit())
    }

    /// [`Server::start`], with the server's stderr readable by the test.
    pub fn start_with_logs(model: &Path, extra: &[&str], envs: &[(&str, &str)]) -> (Server, Logs) {
        let mut server = Self::spawn(model, extra, envs, Stdio::piped());
        let stderr = server.child.stderr.take().expect("stderr");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[ref-server] {line}");
                let _ = tx.send(line);
            }
        });
        (server, Logs { rx, seen: Vec::new() })
    }

    /// [`Server::start`] on a given address instead of an ephemeral port.
    pub fn start_on(model: &Path, listen: &str) -> Server {
        Self::spawn_on(model, listen, &[], &[], Stdio::inherit())
    }

    fn spawn(model: &Path, extra: &[&str], envs: &[(&str, &str)], stderr: Stdio) -> Server {
        Self::spawn_on(model, "127.0.0.1:0", extra, envs, stderr)
    }

    fn spawn_on(
        model: &Path,
        listen: &str,
        extra: &[&str],
        envs: &[(&str, &str)],
        stderr: Stdio,
    ) -> Server {
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--model"]).arg(model).args(["--listen", listen]).args(extra);
        cmd.env_remove("DPO_AUTH_TOKEN");
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child =
            cmd.stdout(Stdio::piped()).stderr(stderr).spawn().expect("start ref-server");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("read the listening line");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        let url = format!("http://{addr}");
        Server { child, addr, url }
    }

    pub fn options(&self) -> ClientOptions {
        ClientOptions { url: self.url.clone(), ..ClientOptions::default() }
    }

    /// Connects and waits until the model is loaded (the clients' own wait, with a
    /// deadline).
    pub async fn ready_client(&self, opts: &ClientOptions) -> ReplicaClient {
        ReplicaClient::wait_until_serving(opts, Duration::from_secs(120))
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.send_sigterm();
        self.wait_exit()
    }

    /// Sends SIGTERM and returns at once.
    pub fn send_sigterm(&self) {
        let pid = self.child.id().to_string();
        let ok = Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
        assert!(ok.success());
    }

    /// Waits (up to 30 s) for the process to exit.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                return st;
            }
            assert!(Instant::now() < deadline, "server did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
