//! The hull-agent binary's command line. (Its presence also makes `cargo test` build the
//! binary that the suites in tests/ drive.)

use std::process::Command;

const AGENT: &str = env!("CARGO_BIN_EXE_hull-agent");

#[test]
fn version_is_printed() {
    let out = Command::new(AGENT).arg("--version").output().expect("hull-agent runs");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("hull-agent "));
}

#[test]
fn a_bad_listen_address_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(AGENT)
        .args(["--listen", "tcp:1234", "--state-dir"])
        .arg(dir.path())
        .output()
        .expect("hull-agent runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tcp:1234"), "stderr: {err}");
}
