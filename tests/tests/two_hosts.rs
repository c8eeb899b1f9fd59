//! The reference server and the trainer on two "hosts": two Linux network namespaces joined
//! by a veth pair, each with its own address and no other route between them. The server
//! binds its namespace's address with bearer-token auth on; the trainer, in the other
//! namespace, trains a few steps across the link.
//!
//! Needs root (CAP_NET_ADMIN) and `ip` from iproute2, as CI has. Skipping is not passing:
//! when the namespaces cannot be made the test fails and says why.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

use candle_core::DType;
use dpo_common::testing::{workspace_root, write_tiny_checkpoint, TinySpec};
use dpo_tests::{binary, read_jsonl};

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip` (iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Two namespaces `a` (10.x.y.1) and `b` (10.x.y.2) on a veth pair; removed on drop.
struct Hosts {
    a: String,
    b: String,
    addr_a: String,
}

impl Hosts {
    fn create() -> Result<Hosts, String> {
        let id = std::process::id();
        let hosts = Hosts {
            a: format!("dpo-a-{id}"),
            b: format!("dpo-b-{id}"),
            addr_a: format!("10.213.{}.1", id % 250),
        };
        let addr_b = format!("10.213.{}.2", id % 250);
        let (veth_a, veth_b) = (format!("va{id}"), format!("vb{id}"));
        ip(&["netns", "add", &hosts.a])?;
        ip(&["netns", "add", &hosts.b])?;
        ip(&["link", "add", &veth_a, "type", "veth", "peer", "name", &veth_b])?;
        ip(&["link", "set", &veth_a, "netns", &hosts.a])?;
        ip(&["link", "set", &veth_b, "netns", &hosts.b])?;
        for (ns, veth, addr) in [(&hosts.a, &veth_a, &hosts.addr_a), (&hosts.b, &veth_b, &addr_b)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", veth])?;
            ip(&["-n", ns, "link", "set", veth, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(hosts)
    }

    fn command(ns: &str, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program);
        c
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // Deleting a namespace removes its end of the veth pair, and with it the pair.
        let _ = ip(&["netns", "del", &self.a]);
        let _ = ip(&["netns", "del", &self.b]);
    }
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn train(hosts: &Hosts, model: &Path, url: &str, token: Option<&Path>, out: &Path) -> Output {
    let mut c = Hosts::command(&hosts.b, &binary("policy-trainer"));
    c.arg("train").arg("--model").arg(model).args(["--ref-server", url]).arg("--data");
    c.arg(workspace_root().join("tests/fixtures/prefs_small.jsonl")).arg("--out").arg(out);
    c.args(["--template", "raw", "--max-length", "128", "--val-size", "8", "--batch-size", "4"]);
    c.args(["--micro-batch", "4", "--lr", "3e-3", "--max-steps", "3", "--eval-every", "3"]);
    c.args(["--ref-timeout", "20", "--no-progress"]);
    if let Some(t) = token {
        c.arg("--auth-token-file").arg(t);
    }
    c.env_remove("DPO_AUTH_TOKEN");
    c.output().expect("run policy-trainer")
}

#[test]
fn trainer_and_server_in_separate_network_namespaces_with_auth() {
    let hosts = Hosts::create().unwrap_or_else(|e| {
        panic!("cannot create the two network namespaces this test needs (run as root with iproute2): {e}")
    });
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    write_tiny_checkpoint(&model, &TinySpec::default(), DType::F32, None).unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret-token\n").unwrap();

    let log = dir.path().join("server.log");
    let mut server = Hosts::command(&hosts.a, &binary("ref-server"));
    server.arg("serve").arg("--model").arg(&model);
    server.args(["--listen", &format!("{}:0", hosts.addr_a)]).arg("--auth-token-file").arg(&token);
    let mut server = Killed(
        server
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start ref-server in namespace a"),
    );
    let mut line = String::new();
    BufReader::new(server.0.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.trim().strip_prefix("listening on ").unwrap_or_else(|| {
        panic!(
            "ref-server said {line:?}; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    assert!(addr.starts_with(&hosts.addr_a), "bound to {addr}, not namespace a's address");
    let url = format!("http://{addr}");

    // Health across the link, from host b (health needs no token).
    let health = Hosts::command(&hosts.b, &binary("ref-server"))
        .args(["health", "--server", &url, "--wait", "60"])
        .args(["--server-pid", &server.0.id().to_string()])
        .output()
        .unwrap();
    assert!(
        health.status.success(),
        "server never SERVING from namespace b: {}",
        String::from_utf8_lossy(&health.stderr)
    );
    // The root namespace has no route to it: the two hosts really are apart.
    let from_root = Command::new(binary("ref-server")).args(["health", "--server", &url]).output();
    assert!(!from_root.unwrap().status.success(), "the server is reachable outside the namespaces");

    // Without the token the server refuses the trainer, and the trainer says so.
    let refused = train(&hosts, &model, &url, None, &dir.path().join("no-token"));
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.to_lowercase().contains("unauthenticated") || stderr.contains("token"),
        "{stderr}"
    );

    let out_dir = dir.path().join("run");
    let ok = train(&hosts, &model, &url, Some(&token), &out_dir);
    assert!(ok.status.success(), "trainer failed:\n{}", String::from_utf8_lossy(&ok.stderr));
    let records = read_jsonl(&out_dir.join(policy_trainer::metrics::METRICS_FILE));
    let steps = records.iter().filter(|r| r["kind"] == "train").count();
    assert_eq!(steps, 3, "three steps across the link");
    let first_eval = records.iter().find(|r| r["kind"] == "eval").unwrap();
    let loss = first_eval["loss"].as_f64().unwrap();
    assert!((loss - std::f64::consts::LN_2).abs() < 1e-5, "step-0 loss {loss} is not ln 2");
    assert!(out_dir.join("best/best.json").is_file() && out_dir.join("last").is_dir());
    drop(server);
}
