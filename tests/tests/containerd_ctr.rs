//! containerd -> containerd-shim-hull-v2 -> pod microVM (QEMU here) -> hull-agent -> container,
//! driven with `ctr` as a user would, against a private containerd.

use std::process::Command;
use std::time::Duration;

use hull_tests::containerd::IMAGE;
use hull_tests::require_containerd;
use hull_tests::scenario::{self, text, wait_until, RUNTIME};

#[test]
fn ctr_run_output_exit_codes_kill_exec_ps_metrics() {
    require_containerd!();
    scenario::lifecycle(&scenario::containerd());
}

#[test]
fn a_dead_vmm_ends_its_tasks_with_nothing_left() {
    require_containerd!();
    let c = scenario::containerd();
    scenario::vmm_death(&c);
    scenario::jail_death(&c);
}

/// QEMU's virtio-balloon reports the guest's free pages and drops them (`free-page-reporting`).
#[test]
fn memory_a_guest_frees_goes_back_to_the_host() {
    require_containerd!();
    scenario::freed_guest_memory_goes_back(&scenario::containerd());
}

/// QEMU's devices live in two more processes; the death of either ends the pod like the VMM's.
#[test]
fn a_dead_vhost_user_backend_ends_its_tasks_with_nothing_left() {
    require_containerd!();
    let c = scenario::containerd();
    scenario::backend_death(&c, "vsock");
    scenario::backend_death(&c, "fs");
}

/// A backend a guest subverted makes a system call its filter forbids: the filter kills it and
/// the pod ends with non-zero exits, nothing left.
#[test]
fn a_backend_killed_by_its_seccomp_filter_ends_its_tasks() {
    require_containerd!();
    let c = scenario::containerd();
    scenario::forbidden_syscall(&c, Some("vsock"));
    scenario::forbidden_syscall(&c, Some("fs"));
}

#[test]
fn bad_commands_fail_clearly_and_a_killed_shim_is_cleaned_up() {
    require_containerd!();
    let c = scenario::containerd();
    let out = c.ctr(&["run", "--rm", "--runtime", RUNTIME, IMAGE, "nocmd", "/no/such/binary"]).expect("ctr runs");
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("/no/such/binary"), "{err}");
    assert!(wait_until(Duration::from_secs(10), || c.pod_processes().is_empty()), "VMs left: {:?}", c.pod_processes());

    // The shim dies under a running task: containerd runs `containerd-shim-hull-v2 delete`,
    // which ends the VM.
    let out = c.ctr(&["run", "-d", "--runtime", RUNTIME, IMAGE, "orphan", "sleep", "1000"]).expect("ctr run -d");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!c.pod_processes().is_empty());
    let shim = Command::new("pgrep").args(["-f", &format!("containerd-shim-hull-v2 -namespace {} -id orphan", c.namespace)]).output().expect("pgrep");
    let pid: i32 = text(&shim.stdout).lines().next().and_then(|l| l.trim().parse().ok()).expect("the shim's pid");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).expect("kill the shim");
    assert!(wait_until(Duration::from_secs(20), || c.pod_processes().is_empty()), "VMs left after the shim died: {:?}\n{}", c.pod_processes(), c.log());
    let out = c.ctr(&["tasks", "ls", "-q"]).expect("ls");
    assert!(!text(&out.stdout).contains("orphan"), "{}", text(&out.stdout));
    let _ = c.ctr(&["containers", "rm", "orphan"]);
}
