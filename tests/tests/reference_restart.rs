//! A restart of the reference server in the middle of a run, as a user meets it: real
//! processes on loopback, `ref-server serve` killed with SIGKILL after the trainer has
//! logged step 2 and started again on the same port a few seconds later.
//!
//! Checks: the run completes with every step logged and the losses of an undisturbed run
//! (reference scores do not depend on which server process computed them); a server that
//! comes back with another model ends the run with an error naming both fingerprints.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use candle_core::DType;
use dpo_common::testing::{write_tiny_checkpoint, TinySpec};
use dpo_tests::faults::{
    assert_same_losses, free_port, short_run as trainer, train_losses, two_models, wait_for_step,
};
use dpo_tests::Server;

/// Starts a run against a server on a fixed port, kills the server (SIGKILL) once step 2
/// is logged, starts `restart_with` there 3 s later and returns the run's exit status and
/// stderr.
fn run_through_a_restart(
    dir: &Path,
    model: &Path,
    restart_with: &Path,
) -> (std::process::ExitStatus, String, PathBuf) {
    let listen = format!("127.0.0.1:{}", free_port());
    let url = format!("http://{listen}");
    let first_log = dir.join("first");
    std::fs::create_dir_all(&first_log).unwrap();
    let mut server = Server::start_at(&listen, model, &[], &first_log);
    let out = dir.join("restarted-run");
    let stderr_path = dir.join("trainer.stderr");
    let mut run = trainer(model, &url, &out, true)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    wait_for_step(&mut run, &out, 2);
    assert!(run.try_wait().unwrap().is_none(), "the run ended before the server was killed");
    server.child.kill().unwrap(); // SIGKILL
    server.child.wait().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let second_log = dir.join("second");
    std::fs::create_dir_all(&second_log).unwrap();
    let _restarted = Server::start_at(&listen, restart_with, &[], &second_log);
    let status = run.wait().unwrap();
    (status, std::fs::read_to_string(&stderr_path).unwrap(), out)
}

#[test]
fn a_run_survives_its_reference_server_killed_and_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    write_tiny_checkpoint(&model, &TinySpec::default(), DType::F32, None).unwrap();
    let (status, stderr, out) = run_through_a_restart(dir.path(), &model, &model);
    assert!(status.success(), "the run did not survive the restart:\n{stderr}");
    assert!(stderr.contains("retrying"), "the server's absence went unnoticed:\n{stderr}");
    assert!(!stderr.contains("(0 retries)"), "{stderr}");

    // The same flags, undisturbed, against a server of its own.
    let server = Server::start(&model, &[], dir.path());
    let calm = dir.path().join("undisturbed-run");
    let undisturbed = trainer(&model, &server.url, &calm, false).output().unwrap();
    assert!(undisturbed.status.success(), "{}", String::from_utf8_lossy(&undisturbed.stderr));

    assert_same_losses(&train_losses(&out), &train_losses(&calm), 6);
}

#[test]
fn a_server_back_with_another_model_ends_the_run_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let [(model, was), (other, now)] = two_models(dir.path());
    assert_ne!(was, now);
    let (status, stderr, out) = run_through_a_restart(dir.path(), &model, &other);
    assert!(!status.success(), "a run went on against another model:\n{stderr}");
    assert!(stderr.contains("another model"), "{stderr}");
    assert!(stderr.contains(&was) && stderr.contains(&now), "{stderr}");
    assert!(train_losses(&out).len() < 6);
}
