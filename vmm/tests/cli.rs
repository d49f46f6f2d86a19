//! The hull-vmm command line. (Its presence also makes `cargo test` build the binary that the
//! QEMU suites in tests/ start.)

use std::process::Command;

const VMM: &str = env!("CARGO_BIN_EXE_hull-vmm");

#[test]
fn vhost_user_vsock_names_a_socket_it_cannot_create() {
    let out = Command::new(VMM)
        .args(["vhost-user", "vsock", "--socket", "/nonexistent/dir/vu.sock", "--uds", "/nonexistent/dir/vsock.sock"])
        .output()
        .expect("hull-vmm runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/dir/vsock.sock"), "stderr: {err}");
}
