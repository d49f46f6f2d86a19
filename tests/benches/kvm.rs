//! The builtin engine against QEMU with KVM, on a real KVM, in one run: in place on a VT-x/AMD-V
//! host, else in the L1 KVM host (`hull_tests::kvm_host`), where QEMU uses L1's kvm_amd and
//! everything runs under TCG, so only the ratios mean anything. Same kernel, initramfs, 2 vCPUs
//! and 256 MiB for both:
//! - VMM start → agent answering, median of `ROUNDS` (`hull-vmm boot` vs QEMU with hull's
//!   vhost-user backends);
//! - host memory of a VM at agent ready, its processes summed by PSS (guest RAM shared between
//!   QEMU and the backends counts once): outside guest RAM (what the VMM costs), and guest RAM
//!   the guest touched, separately; and the same 5 s later, once the guest's free page reports
//!   are in;
//! - a pod through containerd: `ctr run --rm IMAGE ID sh -c 'echo ready'` with the shim on
//!   each engine (`--runtime-config-path`), and runc as the baseline, median of `ROUNDS`; and
//!   pods restored from a snapshot against booted ones, on each engine.
//!
//! Run with `scripts/bench` (root, containerd, QEMU, the guest image, and a real KVM or what
//! the L1 KVM host needs). `HULL_BENCH_KVM=builtin` runs only the `ctr run` rows of runc and the
//! builtin engine, booted and restored: about a third of the pods. Under TCG the L1 host itself
//! fails about once in fifteen pod boots (see `kvm_host::l1_kernel_failed`), so the whole bench,
//! some thirty boots, often needs every retry.

use std::path::Path;
use std::time::{Duration, Instant};

use hull_runtime::hypervisor::{Accel, Binaries, Engine, Vm, VmDir, VmSpec};
use hull_tests::containerd::{Containerd, IMAGE};
use hull_tests::kvm_host::{real_kvm, RealKvm};
use hull_tests::*;

const ROUNDS: usize = 5;
const MEMORY_MIB: u32 = 256;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn spec() -> VmSpec {
    let guest = guest_image_dir();
    VmSpec {
        kernel: guest.join(hull_runtime::config::GUEST_KERNEL),
        root: hull_runtime::hypervisor::GuestRoot::Image(guest.join(hull_runtime::config::ROOT_IMAGE)),
        vcpus: 2,
        memory_mib: MEMORY_MIB,
        guest_cid: 3,
        cmdline_extra: vec![],
        vmm_extra: vec![],
        share: None,
        nic: None,
        log_cap: 1 << 20,
        open_files: 4096,
        jail: None,
    }
}

/// A VM's host memory in KiB by PSS: outside guest RAM, guest RAM the guest touched, and the
/// root image's pages the guest read through virtio-pmem. Guest RAM is the mapping exactly the
/// guest's size (a memfd in both VMMs, shared with the backends); the image is the mapping of
/// `root.erofs` (page cache every pod on the host maps, so one VM's PSS is all of it). The VMs
/// here serve no share, so the builtin one has no fs backend.
#[derive(Default, Clone, Copy)]
struct Memory {
    own_kib: u64,
    guest_kib: u64,
    image_kib: u64,
}

fn memory(pids: &[u32]) -> Memory {
    let guest_size = u64::from(MEMORY_MIB) * 1024;
    let mut m = Memory::default();
    for pid in pids {
        let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
        let (mut size, mut image) = (0, false);
        for line in smaps.lines() {
            let mut words = line.split_whitespace();
            match words.next() {
                // A mapping's first line: its address range, and its file last.
                Some(range) if range.contains('-') && !range.ends_with(':') => image = line.ends_with(hull_runtime::config::ROOT_IMAGE),
                Some("Size:") => size = words.next().and_then(|v| v.parse().ok()).unwrap_or(0),
                Some("Pss:") => {
                    let pss: u64 = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                    if image {
                        m.image_kib += pss;
                    } else if size == guest_size {
                        m.guest_kib += pss;
                    } else {
                        m.own_kib += pss;
                    }
                }
                _ => {}
            }
        }
    }
    m
}

/// Boots a VM to its agent `ROUNDS` times: the median time, and the memory of the last one at
/// agent ready and 5 s later (idle: the guest's free page reports are in).
async fn boots(engine: Engine, dir: &Path) -> (Duration, Memory, Memory) {
    let hypervisor = engine.hypervisor(&Binaries { qemu: "qemu-system-x86_64".into(), vmm: binary("hull-vmm") });
    let mut times = Vec::new();
    let (mut mem, mut idle) = (Memory::default(), Memory::default());
    for i in 0..ROUNDS {
        let d = dir.join(format!("{i}"));
        std::fs::create_dir_all(&d).expect("VM dir");
        let t = Instant::now();
        let vm = Vm::start(hypervisor.as_ref(), &spec(), VmDir::new(&d)).await.expect("VM starts");
        vm.wait_for_agent(Duration::from_secs(300)).await.expect("agent answers");
        times.push(t.elapsed());
        if i + 1 == ROUNDS {
            mem = memory(&vm.pids());
            tokio::time::sleep(Duration::from_secs(5)).await;
            idle = memory(&vm.pids());
        }
        vm.kill().await;
    }
    (median(times), mem, idle)
}

fn ctr_run(c: &Containerd, runtime: &str, config: Option<&Path>, id: &str) -> Duration {
    let mut args = vec!["run", "--rm", "--runtime", runtime];
    let config = config.map(|p| p.to_string_lossy().into_owned());
    if let Some(p) = &config {
        args.extend(["--runtime-config-path", p.as_str()]);
    }
    args.extend([IMAGE, id, "sh", "-c", "echo ready"]);
    let t = Instant::now();
    let out = c.ctr(&args).expect("ctr runs");
    let took = t.elapsed();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout) == "ready\n", "{runtime} {config:?}: {}\n{}", String::from_utf8_lossy(&out.stderr), c.log());
    took
}

/// VMM start → agent answering, and the memory of a VM at agent ready, on each engine.
async fn vm_rows(dir: &Path, accel: Accel) {
    let (builtin_boot, builtin_mem, builtin_idle) = boots(Engine::Builtin, &dir.join("builtin")).await;
    let (qemu_boot, qemu_mem, qemu_idle) = boots(Engine::Qemu(accel), &dir.join("qemu")).await;
    println!("VMM start -> agent answering, 2 vCPUs, {MEMORY_MIB} MiB, median of {ROUNDS}: builtin {:.0} ms, QEMU/KVM {:.0} ms, builtin/QEMU = {:.2}", ms(builtin_boot), ms(qemu_boot), ms(builtin_boot) / ms(qemu_boot));
    let mib = |k: u64| k as f64 / 1024.0;
    println!(
        "host memory of a VM at agent ready (PSS): outside guest RAM builtin {:.1} MiB, QEMU + backends {:.1} MiB, builtin/QEMU = {:.2}; guest RAM touched builtin {:.1} MiB, QEMU {:.1} MiB; both together builtin/QEMU = {:.2}",
        mib(builtin_mem.own_kib),
        mib(qemu_mem.own_kib),
        builtin_mem.own_kib as f64 / qemu_mem.own_kib as f64,
        mib(builtin_mem.guest_kib),
        mib(qemu_mem.guest_kib),
        (builtin_mem.own_kib + builtin_mem.guest_kib) as f64 / (qemu_mem.own_kib + qemu_mem.guest_kib) as f64
    );
    println!(
        "root image pages mapped at agent ready (host page cache, shared by every pod): builtin {:.1} MiB, QEMU {:.1} MiB",
        mib(builtin_mem.image_kib),
        mib(qemu_mem.image_kib)
    );
    println!(
        "5 s later (idle): outside guest RAM builtin {:.1} MiB, QEMU + backends {:.1} MiB; guest RAM touched builtin {:.1} MiB, QEMU {:.1} MiB, builtin/QEMU = {:.2}",
        mib(builtin_idle.own_kib),
        mib(qemu_idle.own_kib),
        mib(builtin_idle.guest_kib),
        mib(qemu_idle.guest_kib),
        builtin_idle.guest_kib as f64 / qemu_idle.guest_kib as f64
    );
}

async fn bench() {
    if let Some(why) = missing_prerequisite().or_else(missing_guest_image).or_else(hull_tests::containerd::missing) {
        eprintln!("SKIP kvm bench: {why}");
        return;
    }
    let accel = hull_runtime::host::Host::probe().qemu_accel().0;
    assert!(matches!(accel, Accel::Kvm), "QEMU must use KVM here, not {accel:?}");
    let dir = tempfile::tempdir().expect("tempdir");

    // Unset: every row; `builtin`: the ctr rows of runc and the builtin engine; `timeline`.
    let only = std::env::var("HULL_BENCH_KVM").ok();
    let only_builtin = only.as_deref() == Some("builtin");
    if only.is_none() {
        vm_rows(dir.path(), accel).await;
    }
    let c = Containerd::start("disabled_plugins = [\"io.containerd.grpc.v1.cri\"]").expect("containerd starts");
    c.import_busybox().expect("image");
    // Pods restored from a snapshot on each engine: the warm-up run makes the snapshot.
    let snapshots = format!("snapshots = true\nsnapshot_dir = \"{}\"\n", dir.path().join("snapshots").display());
    let configs: Vec<_> = [("builtin", "builtin", ""), ("qemu", "qemu", ""), ("qemu-restored", "qemu", snapshots.as_str()), ("builtin-restored", "builtin", snapshots.as_str())]
        .iter()
        .map(|(name, h, extra)| {
            let p = dir.path().join(format!("{name}.toml"));
            std::fs::write(&p, format!("hypervisor = \"{h}\"\nvcpus = 2\nmemory_mib = {MEMORY_MIB}\n{extra}")).expect("config");
            p
        })
        .collect();
    let hull = "io.containerd.hull.v2";
    if only.as_deref() == Some("timeline") {
        // Where a builtin pod's time goes, restored and booted: the shims' log lines, and the
        // restored pod's console and hull-vmm log (kept by debug_console).
        let kept = dir.path().join("timeline.toml");
        std::fs::write(&kept, format!("hypervisor = \"builtin\"\nvcpus = 2\nmemory_mib = {MEMORY_MIB}\ndebug_console = true\n{snapshots}")).expect("config");
        ctr_run(&c, hull, Some(kept.as_path()), "warm-restored");
        for (name, config) in [("restored", &kept), ("booted", &configs[0]), ("restored-after-booted", &kept)] {
            let before = c.log().len();
            let took = ctr_run(&c, hull, Some(config.as_path()), &format!("timeline-{name}"));
            let log = strip_ansi(&c.log()[before..]);
            println!("builtin {name}, ctr run --rm took {took:?}:\n{log}");
            for (file, text) in hull_tests::containerd::kept_pod_logs(&log) {
                println!("--- {file} ---\n{text}");
            }
        }
        return;
    }
    let runs: Vec<(&str, &str, Option<&Path>)> = [
        ("runc", "io.containerd.runc.v2", None),
        ("builtin", hull, Some(configs[0].as_path())),
        ("qemu", hull, Some(configs[1].as_path())),
        ("qemu-restored", hull, Some(configs[2].as_path())),
        ("builtin-restored", hull, Some(configs[3].as_path())),
    ]
    .into_iter()
    .filter(|(name, ..)| !only_builtin || !name.starts_with("qemu"))
    .collect();
    // Warm the page cache and each path once.
    for (name, runtime, config) in &runs {
        ctr_run(&c, runtime, *config, &format!("warm-{name}"));
    }
    let mut times = vec![Vec::new(); runs.len()];
    for round in 0..ROUNDS {
        for (i, (name, runtime, config)) in runs.iter().enumerate() {
            let took = ctr_run(&c, runtime, *config, &format!("run-{name}-{round}"));
            // As it goes: an L1 that fails mid-bench shows how far it got.
            eprintln!("{name}, round {round}: {:.0} ms", ms(took));
            times[i].push(took);
        }
    }
    // A restore that fails boots the pod instead: say how many were restored, and why not.
    let log = strip_ansi(&c.log());
    let restored = log.lines().filter(|l| l.contains("pod VM ready") && l.contains("restored=true")).count();
    println!("pods restored from a snapshot: {restored}");
    for line in log.lines().filter(|l| (l.contains("snapshot") && (l.contains("WARN") || l.contains("made"))) || (l.contains("pod VM ready") && l.contains("run-builtin")) || l.contains("its agent answering")) {
        println!("{line}");
    }
    let medians: std::collections::HashMap<&str, Duration> = runs.iter().map(|r| r.0).zip(times.into_iter().map(median)).collect();
    let (runc, builtin, builtin_restored) = (medians["runc"], medians["builtin"], medians["builtin-restored"]);
    if let (Some(&qemu), Some(&restored)) = (medians.get("qemu"), medians.get("qemu-restored")) {
        qemu_ctr_rows(runc, builtin, qemu, restored);
    }
    println!(
        "ctr run --rm (echo), median of {ROUNDS}: hull builtin restored from a snapshot {:.0} ms, booted {:.0} ms; restored/booted = {:.2}, restored/runc = {:.1}, booted/runc = {:.1}",
        ms(builtin_restored),
        ms(builtin),
        ms(builtin_restored) / ms(builtin),
        ms(builtin_restored) / ms(runc),
        ms(builtin) / ms(runc)
    );
}

fn qemu_ctr_rows(runc: Duration, builtin: Duration, qemu: Duration, restored: Duration) {
    println!(
        "ctr run --rm (echo), median of {ROUNDS}: hull builtin {:.0} ms, hull QEMU/KVM {:.0} ms, runc {:.0} ms; builtin/QEMU = {:.2}, builtin/runc = {:.1}, QEMU/runc = {:.1}",
        ms(builtin),
        ms(qemu),
        ms(runc),
        ms(builtin) / ms(qemu),
        ms(builtin) / ms(runc),
        ms(qemu) / ms(runc)
    );
    println!(
        "ctr run --rm (echo), median of {ROUNDS}: hull QEMU/KVM restored from a snapshot {:.0} ms, booted {:.0} ms; restored/booted = {:.2}, restored/runc = {:.1}",
        ms(restored),
        ms(qemu),
        ms(restored) / ms(qemu),
        ms(restored) / ms(runc)
    );
}

#[tokio::main]
async fn main() {
    match real_kvm("kvm-bench") {
        RealKvm::Here => bench().await,
        // real_kvm printed what the run inside printed.
        RealKvm::RanInside => {}
        RealKvm::Missing(why) => eprintln!("SKIP kvm bench: {why}"),
    }
}
