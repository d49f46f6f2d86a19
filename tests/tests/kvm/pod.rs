//! Pods on the builtin hypervisor on a real KVM (here on a VT-x/AMD-V host, else in the L1 KVM
//! host), end to end: containerd → containerd-shim-hull-v2 → `hull-vmm boot` (hull's own
//! VMM, devices in process but the share's, whose jailed `hull-vmm vhost-user fs` it drives) →
//! hull-agent → container. The shim runs with its default
//! configuration, `hypervisor = "auto"`, which must pick the builtin engine on such a host.

use hull_tests::containerd::IMAGE;
use hull_tests::require_containerd;
use hull_tests::scenario::{self, text, RUNTIME};

#[test]
fn ctr_pods_on_the_builtin_engine_chosen_by_auto() {
    require_containerd!();
    hull_tests::on_real_kvm!("pod::ctr_pods_on_the_builtin_engine_chosen_by_auto");
    let check = hull_tests::binary("hull");
    let out = std::process::Command::new(&check).arg("check").output().expect("hull check");
    let said = text(&out.stdout);
    assert!(said.contains("pods here run under: the builtin hull-vmm"), "hull check must say what auto picks here: {said}{}", text(&out.stderr));

    let c = scenario::containerd();
    let out = c
        .ctr(&[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            IMAGE,
            "kvmpod",
            "sh",
            "-c",
            "echo hello from $(hostname); grep -o 'virtio_mmio.device=[^ ]*' /proc/cmdline | head -1; exit 3",
        ])
        .expect("ctr runs");
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "stdout: {stdout}\nstderr: {}\ncontainerd log:\n{}", text(&out.stderr), c.log());
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.first(), Some(&"hello from kvmpod"), "{stdout}");
    assert!(lines.get(1).is_some_and(|l| l.starts_with("virtio_mmio.device=4K@0xd0000000:")), "the guest sits on hull-vmm's virtio-mmio devices: {stdout}");
    assert!(c.pod_processes().is_empty(), "left behind: {:?}", c.pod_processes());

    scenario::lifecycle(&c);
    // hull-vmm's own virtio-balloon, reporting only.
    scenario::freed_guest_memory_goes_back(&c);
    // hull-vmm's virtio-pmem: the root image in a read-only KVM slot.
    scenario::root_image_write(&c);
    scenario::vmm_death(&c);
    scenario::jail_death(&c);
    scenario::forbidden_syscall(&c, None);
    // The share's jailed file server, which hull-vmm drives over vhost-user.
    scenario::backend_death(&c, "fs");
    scenario::forbidden_syscall(&c, Some("fs"));
}

/// QEMU with KVM restores pods from a snapshot (its migration state carries the KVM vCPUs,
/// kvmclock and irqchip; the pod's devices are hot-plugged): two `ctr run`s, the first making
/// the snapshot, both restored, each with its own output, exit code and hostname.
#[test]
fn ctr_pods_restored_from_a_snapshot_on_qemu_with_kvm() {
    require_containerd!();
    hull_tests::on_real_kvm!("pod::ctr_pods_restored_from_a_snapshot_on_qemu_with_kvm");
    let c = scenario::containerd();
    let config = c.dir.path().join("hull.toml");
    std::fs::write(&config, format!("hypervisor = \"qemu\"\nsnapshots = true\nsnapshot_dir = \"{}\"\n", c.dir.path().join("snapshots").display())).expect("config");
    let config = config.to_string_lossy().into_owned();
    for (id, code) in [("restored-1", 4), ("restored-2", 5)] {
        scenario::step(id);
        let script = format!("echo hello from $(hostname); exit {code}");
        let out = c.ctr(&["run", "--rm", "--runtime", RUNTIME, "--runtime-config-path", &config, IMAGE, id, "sh", "-c", &script]).expect("ctr runs");
        assert_eq!(out.status.code(), Some(code), "stdout: {}\nstderr: {}\ncontainerd log:\n{}", text(&out.stdout), text(&out.stderr), c.log());
        assert_eq!(text(&out.stdout), format!("hello from {id}\n"));
    }
    let log = c.log();
    let ready: Vec<&str> = log.lines().filter(|l| l.contains("pod VM ready")).collect();
    assert_eq!(ready.len(), 2, "{log}");
    assert!(ready.iter().all(|l| l.contains("restored=true")), "both pods restored, not booted: {ready:?}\n{log}");
    assert!(log.contains("engine=Qemu(Kvm)"), "QEMU with KVM ran them: {log}");
    assert!(c.pod_processes().is_empty(), "left behind: {:?}", c.pod_processes());
}

/// The builtin engine restores pods from its own snapshot (`hull-vmm ctl ... snapshot` of a
/// template booted with the pod's devices, `hull-vmm boot --restore` per pod, each with its own
/// vsock CID and share backend): two `ctr run`s, the first making the snapshot, both restored,
/// each with its own output, exit code, hostname and random numbers, and its container's
/// rootfs served by its own virtio-fs backend (the share is first mounted after the restore).
#[test]
fn ctr_pods_restored_from_a_snapshot_on_the_builtin_engine() {
    require_containerd!();
    hull_tests::on_real_kvm!("pod::ctr_pods_restored_from_a_snapshot_on_the_builtin_engine");
    let c = scenario::containerd();
    let config = c.dir.path().join("hull.toml");
    std::fs::write(&config, format!("hypervisor = \"builtin\"\nsnapshots = true\nsnapshot_dir = \"{}\"\n", c.dir.path().join("snapshots").display())).expect("config");
    let config = config.to_string_lossy().into_owned();
    let mut random = Vec::new();
    for (id, code) in [("restored-1", 4), ("restored-2", 5)] {
        scenario::step(id);
        let script = format!("echo hello from $(hostname); head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; exit {code}");
        let started = std::time::Instant::now();
        let out = c.ctr(&["run", "--rm", "--runtime", RUNTIME, "--runtime-config-path", &config, IMAGE, id, "sh", "-c", &script]).expect("ctr runs");
        eprintln!("{id}: ctr run --rm took {:?}", started.elapsed());
        let stdout = text(&out.stdout);
        assert_eq!(out.status.code(), Some(code), "stdout: {stdout}\nstderr: {}\ncontainerd log:\n{}", text(&out.stderr), c.log());
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.first(), Some(&format!("hello from {id}").as_str()), "{stdout}");
        random.push(lines.get(1).map(|l| l.to_string()).unwrap_or_default());
    }
    assert_eq!(random[0].len(), 32, "{random:?}");
    assert_ne!(random[0], random[1], "two pods restored from one snapshot draw different random numbers");
    let log = c.log();
    let ready: Vec<&str> = log.lines().filter(|l| l.contains("pod VM ready")).collect();
    assert_eq!(ready.len(), 2, "{log}");
    assert!(ready.iter().all(|l| l.contains("restored=true")), "both pods restored, not booted: {ready:?}\n{log}");
    assert!(log.contains("engine=Builtin"), "the builtin engine ran them: {log}");
    assert!(log.contains("snapshot made"), "{log}");
    for line in log.lines().filter(|l| ["pod VM ready", "snapshot made", "sandbox created in the pod VM", "VM running", "booting the pod VM"].iter().any(|w| l.contains(w))) {
        eprintln!("{line}");
    }
    assert!(c.pod_processes().is_empty(), "left behind: {:?}", c.pod_processes());
}
