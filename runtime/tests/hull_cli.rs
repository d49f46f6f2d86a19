//! `hull run` end to end: a real container in a real microVM (QEMU, hull's vsock device, the
//! guest image), and through a host agent with `--host`.

use std::path::Path;
use std::process::Command;

const HULL: &str = env!("CARGO_BIN_EXE_hull");

fn skip_reason() -> Option<&'static str> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root");
    }
    if !Path::new("/bin/busybox").exists() {
        return Some("needs /bin/busybox (apt-get install busybox-static)");
    }
    for bin in ["hull-agent", "hull-vmm"] {
        if !Path::new(HULL).with_file_name(bin).exists() {
            return Some("needs hull-agent and hull-vmm built beside hull (cargo test --workspace builds them)");
        }
    }
    if !Path::new("/usr/bin/qemu-system-x86_64").exists() {
        return Some("needs qemu-system-x86_64 (apt-get install qemu-system-x86)");
    }
    // Where `hull run` looks for it.
    if Path::new(HULL).parent().and_then(hull_runtime::config::guest_dir_beside).is_none() {
        return Some("needs the guest image (cargo run -p hull-guest-image -- build)");
    }
    None
}

#[test]
fn hull_run_prints_output_and_returns_the_exit_status() {
    if let Some(why) = skip_reason() {
        assert!(std::env::var_os("HULL_REQUIRE_ALL").is_none(), "prerequisite missing: {why}");
        eprintln!("SKIP hull_run: {why}");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).expect("mkdir");
    for d in ["proc", "sys", "dev", "tmp"] {
        std::fs::create_dir_all(rootfs.join(d)).expect("mkdir");
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("copy busybox");
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh")).expect("link");
    for mode in [&[][..], &["--host"][..]] {
        let out = Command::new(HULL)
            .args(["run", "--hostname", "demo"])
            .args(mode)
            .arg("--rootfs")
            .arg(&rootfs)
            .args(["--", "sh", "-c", "echo hello from $(busybox hostname) on $(busybox uname -r); echo oops >&2; exit 4"])
            .output()
            .expect("hull runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.starts_with("hello from demo on "), "{mode:?}: {stdout}");
        // In a microVM the kernel is hull's guest kernel.
        assert_eq!(stdout.trim_end().ends_with("-hull"), mode.is_empty(), "{mode:?}: {stdout}");
        assert_eq!(String::from_utf8_lossy(&out.stderr), "oops\n", "{mode:?}");
        assert_eq!(out.status.code(), Some(4), "{mode:?}");
    }

    let out = Command::new(HULL).args(["run", "--rootfs", "/nonexistent", "--", "true"]).output().expect("hull runs");
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent"));
}

#[test]
fn hull_check_says_what_runs_here_and_names_a_broken_config() {
    if !nix::unistd::geteuid().is_root() || !std::path::Path::new("/usr/bin/qemu-system-x86_64").exists() {
        assert!(std::env::var_os("HULL_REQUIRE_ALL").is_none(), "hull check needs root and QEMU under HULL_REQUIRE_ALL");
        eprintln!("SKIP hull_check: needs root and qemu-system-x86_64");
        return;
    }
    let out = Command::new(HULL).arg("check").env_remove("HULL_CONFIG").output().expect("hull runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("pods here run under: QEMU with"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("ok   QEMU: ")), "{text}");
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("hull.toml");
    std::fs::write(&bad, "vcpu = 2\n").unwrap();
    let out = Command::new(HULL).args(["check", "--config"]).arg(&bad).output().expect("hull runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.lines().any(|l| l.starts_with("FAIL config") && l.contains("hull.toml") && l.contains("vcpu")), "{text}");
}
