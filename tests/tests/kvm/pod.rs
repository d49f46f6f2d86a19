//! A pod on the builtin hypervisor, end to end: containerd → containerd-shim-hull-v2 →
//! `hull-vmm boot` (hull's own KVM VMM, devices in process) → hull-agent → container, on this
//! machine's real /dev/kvm. Where /dev/kvm is kvm_pvm every guest kernel instruction is
//! emulated and the boot takes minutes; the test waits for it.

use std::time::Instant;

use hull_tests::containerd::{Containerd, IMAGE};
use hull_tests::require_containerd;

const RUNTIME: &str = "io.containerd.hull.v2";

#[test]
fn ctr_runs_a_container_in_a_builtin_vmm_pod() {
    require_containerd!();
    if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        if std::env::var_os("HULL_REQUIRE_ALL").is_some() {
            panic!("prerequisite missing under HULL_REQUIRE_ALL: needs a usable /dev/kvm");
        }
        eprintln!("SKIP {}: needs a usable /dev/kvm", module_path!());
        return;
    }
    let c = Containerd::start("disabled_plugins = [\"io.containerd.grpc.v1.cri\"]").expect("containerd starts");
    c.import_busybox().expect("image import");
    let config = c.dir.path().join("hull-builtin.toml");
    std::fs::write(&config, "hypervisor = \"builtin\"\nboot_timeout_secs = 1500\n").expect("config");
    let started = Instant::now();
    let out = c
        .ctr(&[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            "--runtime-config-path",
            &config.to_string_lossy(),
            IMAGE,
            "kvmpod",
            "sh",
            "-c",
            "echo hello from $(hostname); grep -o 'virtio_mmio.device=[^ ]*' /proc/cmdline | head -1; cat /proc/sys/kernel/osrelease; exit 3",
        ])
        .expect("ctr runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("builtin pod: {:.0} s from ctr run to exit", started.elapsed().as_secs_f64());
    assert_eq!(out.status.code(), Some(3), "stdout: {stdout}\nstderr: {}\ncontainerd log:\n{}", String::from_utf8_lossy(&out.stderr), c.log());
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.first(), Some(&"hello from kvmpod"), "{stdout}");
    assert!(lines.get(1).is_some_and(|l| l.starts_with("virtio_mmio.device=4K@0xd0000000:")), "the guest sits on hull-vmm's virtio-mmio devices: {stdout}");
    assert!(lines.get(2).is_some_and(|l| l.ends_with("-hull")), "hull's guest kernel: {stdout}");
    // --rm: the pod is gone, and with it every process.
    assert!(c.pod_processes().is_empty(), "left behind: {:?}", c.pod_processes());
}
