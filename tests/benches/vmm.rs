//! hull-vmm in one run:
//! - process start → first KVM_RUN (ms, p50 of 20): `hull-vmm boot` with a tiny guest, timed
//!   from spawn to its "first KVM_RUN" log line;
//! - RSS of the VM's processes once hull's guest kernel and agent are up, 128 MiB guest:
//!   `hull-vmm boot` (builtin engine, KVM) vs QEMU + hull's vhost-user backends (same kernel
//!   and initramfs), as a ratio. Where /dev/kvm is kvm_pvm the builtin boot takes minutes;
//! - pod VM start → agent ready under QEMU (with a share: QEMU and both backends), every process
//!   jailed (`hull-vmm jail`, the default) vs unjailed, alternating, p50 of 5 each, as a ratio;
//! - pod VM start → agent ready under QEMU booting the ELF vmlinux vs the bzImage, alternating,
//!   p50 of 5 each, as a ratio, and the guest RAM each had touched at agent ready;
//! - the same for this build's guest image against an earlier build's (`guest`: the directory
//!   `HULL_BENCH_BASELINE_GUEST` names, a copy of that build's target/guest);
//! - a whole earlier build against this one (`stack`: the checkout `HULL_BENCH_BASELINE_HULL`
//!   names, built with its release `hull` and its target/guest): `hull run --verbose` of
//!   `/bin/true` in a busybox rootfs under QEMU, each build with its own runtime, kernel command
//!   line and guest, alternating, p50 of 5 of the "microVM ready in" it reports;
//! - vsock throughput through the vhost-user backend under QEMU: 256 MiB each way between a
//!   host process and a container's stdio in the guest, MB/s.
//!
//! Run with `scripts/bench` (release build). Needs root, /dev/kvm, QEMU and the guest image.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hull_proto::stdio::StreamKind;
use hull_runtime::host::Host;
use hull_runtime::hypervisor::{Binaries, Engine, GuestRoot, Share, Vm, VmDir, VmSpec};
use hull_runtime::pod::share::{share_storage, FS_TAG};
use hull_tests::proc_memory::status_kib;
use hull_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: usize = 256;

/// A 64-bit ELF "kernel" that resets the machine through the i8042 at once.
fn reset_guest(dir: &std::path::Path) -> std::path::PathBuf {
    let code = [0xb0, 0xfe, 0xe6, 0x64, 0xf4]; // mov al, 0xfe; out 0x64, al; hlt
    let load = 0x10_0000u64;
    let mut e = b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0".to_vec();
    e.extend(2u16.to_le_bytes());
    e.extend(0x3eu16.to_le_bytes());
    e.extend(1u32.to_le_bytes());
    e.extend(load.to_le_bytes());
    e.extend(64u64.to_le_bytes());
    e.extend(0u64.to_le_bytes());
    e.extend(0u32.to_le_bytes());
    for v in [64u16, 56, 1, 64, 0, 0] {
        e.extend(v.to_le_bytes());
    }
    e.extend(1u32.to_le_bytes());
    e.extend(5u32.to_le_bytes());
    for v in [120u64, load, load, code.len() as u64, code.len() as u64, 0x1000] {
        e.extend(v.to_le_bytes());
    }
    e.extend(code);
    let p = dir.join("reset.elf");
    std::fs::write(&p, e).expect("kernel");
    p
}

fn start_to_first_run(dir: &std::path::Path) -> f64 {
    let kernel = reset_guest(dir);
    let mut times = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let mut child = Command::new(binary("hull-vmm"))
            .args(["--log-level", "debug", "boot", "--memory-mib", "128", "--console", "/dev/null", "--kernel"])
            .arg(&kernel)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("hull-vmm");
        let reader = BufReader::new(child.stderr.take().expect("stderr"));
        // Read to the end: hull-vmm must not meet a closed pipe.
        let mut first_run = None;
        for line in reader.lines().map_while(Result::ok) {
            if first_run.is_none() && line.contains("first KVM_RUN") {
                first_run = Some(t.elapsed());
            }
        }
        times.push(first_run.expect("hull-vmm logs its first KVM_RUN"));
        let st = child.wait().expect("wait");
        assert!(st.success(), "hull-vmm: {st}");
    }
    times.sort();
    times[times.len() / 2].as_secs_f64() * 1000.0
}

/// The median of `v` (sorted in place), the upper one of an even count.
fn p50(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

fn config() -> VmSpec {
    let guest = guest_image_dir();
    VmSpec {
        kernel: guest.join(hull_runtime::config::GUEST_KERNEL),
        root: hull_runtime::hypervisor::GuestRoot::Image(guest.join(hull_runtime::config::ROOT_IMAGE)),
        vcpus: 1,
        memory_mib: 128,
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

async fn start(spec: &VmSpec, dir: &std::path::Path, engine: Engine) -> Vm {
    let hypervisor = engine.hypervisor(&Binaries { qemu: "qemu-system-x86_64".into(), vmm: binary("hull-vmm") });
    Vm::start(hypervisor.as_ref(), spec, VmDir::new(dir)).await.expect("VM starts")
}

fn qemu_engine() -> Engine {
    Engine::Qemu(Host::probe().qemu_accel().0)
}

/// RSS (MiB) of every process of a VM booted to its agent.
async fn booted_rss(dir: &std::path::Path, engine: Engine) -> (f64, Duration) {
    let t = Instant::now();
    let vm = start(&config(), dir, engine).await;
    vm.wait_for_agent(Duration::from_secs(1800)).await.expect("agent answers");
    let boot = t.elapsed();
    // Let the guest settle (the agent has just come up).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let kib: u64 = vm.pids().iter().map(|&p| rss_kib(p)).sum();
    vm.kill().await;
    (kib as f64 / 1024.0, boot)
}

async fn vsock_throughput(dir: &std::path::Path) -> (f64, f64) {
    let rootfs = dir.join("rootfs");
    busybox_rootfs(&rootfs).expect("rootfs");
    let mut cfg = config();
    std::fs::create_dir_all(dir.join("vm")).expect("workdir");
    cfg.memory_mib = 256;
    cfg.share = Some(Share { tag: FS_TAG.into(), dir: rootfs });
    let vm = start(&cfg, &dir.join("vm"), qemu_engine()).await;
    let conn = vm.wait_for_agent(Duration::from_secs(120)).await.expect("agent");
    let mut req = hull_proto::agent::CreateSandboxRequest::new();
    req.sandbox_id = "bench".into();
    conn.client.create_sandbox(ctx(), &req).await.expect("CreateSandbox");
    let root = "/run/hull/rootfs";

    // Guest -> host.
    let count = format!("count={MIB}");
    conn.create_on("out", &default_spec(&["dd", "if=/dev/zero", "bs=1M", &count], root), stdio(false, true, false), vec![share_storage(root)])
        .await
        .expect("create");
    let mut out = conn.attach("out", "", StreamKind::Stdout).await.expect("stdout");
    let t = Instant::now();
    conn.start("out").await.expect("start");
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0usize;
    loop {
        let n = out.read(&mut buf).await.expect("read");
        if n == 0 {
            break;
        }
        total += n;
    }
    let out_rate = total as f64 / 1e6 / t.elapsed().as_secs_f64();
    assert_eq!(total, MIB << 20);
    conn.wait("out", "").await.expect("wait");
    conn.remove("out").await.expect("remove");

    // Host -> guest.
    conn.create_on("in", &default_spec(&["dd", "of=/dev/null", "bs=1M"], root), stdio(true, false, false), vec![share_storage(root)])
        .await
        .expect("create");
    let mut input = conn.attach("in", "", StreamKind::Stdin).await.expect("stdin");
    conn.start("in").await.expect("start");
    let chunk = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    for _ in 0..MIB {
        input.write_all(&chunk).await.expect("write");
    }
    input.shutdown().await.expect("eof");
    let st = conn.wait("in", "").await.expect("wait");
    let in_rate = (MIB << 20) as f64 / 1e6 / t.elapsed().as_secs_f64();
    assert_eq!(st.exit_status, 0);
    vm.kill().await;
    (out_rate, in_rate)
}

/// Start → agent ready (s, p50 of 5 each) with every VM process jailed and without, alternating
/// so that both meet the same host.
async fn jailed_vs_unjailed(dir: &std::path::Path) -> (f64, f64) {
    let shared = dir.join("jail-share");
    std::fs::create_dir_all(&shared).expect("share");
    let (mut jailed, mut direct) = (Vec::new(), Vec::new());
    for round in 0..10 {
        let mut cfg = config();
        cfg.share = Some(Share { tag: FS_TAG.into(), dir: shared.clone() });
        let jail = round % 2 == 0;
        cfg.jail = jail.then(|| hull_runtime::config::Config::default().jail()).flatten();
        let vm_dir = dir.join(format!("jail-{round}"));
        std::fs::create_dir_all(&vm_dir).expect("dir");
        let t = Instant::now();
        let vm = start(&cfg, &vm_dir, qemu_engine()).await;
        vm.wait_for_agent(Duration::from_secs(600)).await.expect("agent answers");
        let took = t.elapsed().as_secs_f64();
        vm.kill().await;
        if jail { jailed.push(took) } else { direct.push(took) }
    }
    (p50(&mut jailed), p50(&mut direct))
}

/// The guest RAM a VM's VMM has touched, in KiB: QEMU's guest memory is a shared memfd, and
/// under TCG every page the guest touches is in QEMU's own mappings.
fn guest_ram_touched_kib(pid: u32) -> u64 {
    status_kib(pid, "RssShmem:")
}

/// What `alternating` measured of each configuration: the p50 of start → agent ready, and the
/// guest RAM the last VM had touched at agent ready and 5 s later (idle: the guest's free page
/// reports are in), in KiB.
struct Boots {
    p50: f64,
    touched_kib: u64,
    idle_kib: u64,
}

impl Boots {
    /// This configuration (`name`) against `other` (`other_name`): times, guest RAM at agent
    /// ready and 5 s later, each with its ratio (`ratio` names it, "a/b").
    fn versus(&self, other: &Boots, name: &str, other_name: &str, ratio: &str) -> String {
        let mib = |k: u64| k as f64 / 1024.0;
        format!(
            "{name} {:.2} s, {other_name} {:.2} s, {ratio} = {:.2}; guest RAM touched at agent ready: {:.1} MiB vs {:.1} MiB, {ratio} = {:.2}; 5 s later: {:.1} MiB vs {:.1} MiB, {ratio} = {:.2}",
            self.p50,
            other.p50,
            self.p50 / other.p50,
            mib(self.touched_kib),
            mib(other.touched_kib),
            self.touched_kib as f64 / other.touched_kib as f64,
            mib(self.idle_kib),
            mib(other.idle_kib),
            self.idle_kib as f64 / other.idle_kib as f64,
        )
    }
}

/// Pod VM start → agent ready under QEMU (unjailed, 256 MiB) for two VM configurations,
/// alternating, 5 each.
async fn alternating(dir: &std::path::Path, name: &str, configs: [VmSpec; 2]) -> [Boots; 2] {
    let mut times = [Vec::new(), Vec::new()];
    let mut touched = [(0u64, 0u64); 2];
    for round in 0..10 {
        let k = round % 2;
        let mut cfg = configs[k].clone();
        cfg.memory_mib = 256;
        let vm_dir = dir.join(format!("{name}-{round}"));
        std::fs::create_dir_all(&vm_dir).expect("dir");
        let t = Instant::now();
        let vm = start(&cfg, &vm_dir, qemu_engine()).await;
        vm.wait_for_agent(Duration::from_secs(600)).await.expect("agent answers");
        times[k].push(t.elapsed().as_secs_f64());
        if round >= 8 {
            let at_ready = guest_ram_touched_kib(vm.vmm_pid());
            tokio::time::sleep(Duration::from_secs(5)).await;
            touched[k] = (at_ready, guest_ram_touched_kib(vm.vmm_pid()));
        }
        vm.kill().await;
    }
    let [mut a, mut b] = times;
    [Boots { p50: p50(&mut a), touched_kib: touched[0].0, idle_kib: touched[0].1 }, Boots { p50: p50(&mut b), touched_kib: touched[1].0, idle_kib: touched[1].1 }]
}

/// The ELF vmlinux pods boot against the bzImage it comes from.
async fn vmlinux_vs_bzimage(dir: &std::path::Path) -> [Boots; 2] {
    let mut bz = config();
    bz.kernel = guest_image_dir().join("bzImage");
    alternating(dir, "kernel", [config(), bz]).await
}

/// The root on virtio-pmem (the erofs image, read in place) against the same files as an
/// initramfs unpacked into guest memory.
async fn image_vs_initramfs(dir: &std::path::Path) -> [Boots; 2] {
    let mut initramfs = config();
    initramfs.root = GuestRoot::Initramfs(guest_image_dir().join("initramfs.cpio"));
    alternating(dir, "root", [config(), initramfs]).await
}

/// `hull run --verbose` of `/bin/true` under QEMU: the "microVM ready in" seconds it reports,
/// and the whole run's.
fn hull_run(hull: &std::path::Path, guest: &std::path::Path, rootfs: &std::path::Path, config: &std::path::Path) -> (f64, f64) {
    let t = Instant::now();
    let out = Command::new(hull)
        .args(["run", "--hypervisor", "qemu", "--verbose", "--guest"])
        .arg(guest)
        .arg("--rootfs")
        .arg(rootfs)
        .args(["--", "/bin/true"])
        .env("HULL_CONFIG", config)
        .output()
        .expect("hull runs");
    let took = t.elapsed().as_secs_f64();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{} run: {err}", hull.display());
    let ready = err.split("microVM ready in ").nth(1).and_then(|r| r.split(' ').next()).and_then(|v| v.parse().ok());
    (ready.unwrap_or_else(|| panic!("{} run said no ready time: {err}", hull.display())), took)
}

/// This build (`hull`, its guest) against the earlier one built in the checkout `baseline`,
/// alternating, p50 of 5 each: [ready, whole run] for this build, then for the baseline.
fn stack_vs_baseline(dir: &std::path::Path, baseline: &std::path::Path) -> [[f64; 2]; 2] {
    let rootfs = dir.join("stack-rootfs");
    busybox_rootfs(&rootfs).expect("rootfs");
    // Neither build reads a config of the host's: defaults, each with its own guest.
    let config = dir.join("stack.toml");
    std::fs::write(&config, "").expect("config");
    // Earlier builds put their binaries in target/release, later ones under the target triple.
    let old = ["target/x86_64-unknown-linux-gnu/release/hull", "target/release/hull"].map(|p| baseline.join(p)).into_iter().find(|p| p.exists()).expect("the baseline checkout has a release hull");
    let builds = [(binary("hull"), guest_image_dir()), (old, baseline.join("target/guest"))];
    let mut runs = [[Vec::new(), Vec::new()], [Vec::new(), Vec::new()]];
    for round in 0..10 {
        let k = round % 2;
        let (ready, took) = hull_run(&builds[k].0, &builds[k].1, &rootfs, &config);
        runs[k][0].push(ready);
        runs[k][1].push(took);
    }
    runs.map(|r| r.map(|mut v| p50(&mut v)))
}

/// This build's guest image (kernel and root) against another build's, from the
/// directory `HULL_BENCH_BASELINE_GUEST` names (a copy of an earlier build's target/guest).
async fn guest_vs_baseline(dir: &std::path::Path, baseline: &std::path::Path) -> [Boots; 2] {
    let mut old = config();
    old.kernel = baseline.join(hull_runtime::config::GUEST_KERNEL);
    let image = baseline.join(hull_runtime::config::ROOT_IMAGE);
    old.root = if image.exists() { GuestRoot::Image(image) } else { GuestRoot::Initramfs(baseline.join("initramfs.cpio")) };
    alternating(dir, "guest", [config(), old]).await
}

#[tokio::main]
async fn main() {
    if let Some(why) = missing_prerequisite().or_else(missing_guest_image) {
        println!("SKIP vmm bench: {why}");
        return;
    }
    // `cargo bench --bench vmm -- jail rss` runs only the rows named (start, jail, kernel, root,
    // guest, stack, vsock, rss).
    let only: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let row = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    let dir = tempfile::tempdir().expect("tempdir");
    if row("start") {
        println!("hull-vmm process start -> first KVM_RUN: {:.1} ms (p50 of 20)", start_to_first_run(dir.path()));
    }

    if row("jail") {
        let (jailed, direct) = jailed_vs_unjailed(dir.path()).await;
        println!("pod VM start -> agent ready (QEMU/{:?}, with a share), p50 of 5: jailed {jailed:.2} s, unjailed {direct:.2} s, jailed/unjailed = {:.2}", Host::probe().qemu_accel().0, jailed / direct);
    }

    if row("kernel") {
        let [elf, bz] = vmlinux_vs_bzimage(dir.path()).await;
        println!(
            "pod VM start -> agent ready (QEMU/{:?}, 256 MiB), p50 of 5: vmlinux {:.2} s, bzImage {:.2} s, vmlinux/bzImage = {:.2}; guest RAM touched at agent ready: vmlinux {:.1} MiB, bzImage {:.1} MiB, vmlinux/bzImage = {:.2}",
            Host::probe().qemu_accel().0,
            elf.p50,
            bz.p50,
            elf.p50 / bz.p50,
            elf.touched_kib as f64 / 1024.0,
            bz.touched_kib as f64 / 1024.0,
            elf.touched_kib as f64 / bz.touched_kib as f64
        );
    }

    if row("root") {
        let [image, initramfs] = image_vs_initramfs(dir.path()).await;
        println!("pod VM start -> agent ready (QEMU/{:?}, 256 MiB), p50 of 5: {}", Host::probe().qemu_accel().0, image.versus(&initramfs, "root image on virtio-pmem", "initramfs", "image/initramfs"));
    }

    if row("guest") {
        match std::env::var_os("HULL_BENCH_BASELINE_GUEST") {
            None => println!("SKIP guest row: HULL_BENCH_BASELINE_GUEST names no earlier build's guest image directory to compare with"),
            Some(baseline) => {
                let baseline = std::path::PathBuf::from(baseline);
                let size = |p: std::path::PathBuf| std::fs::metadata(&p).map(|m| m.len() as f64 / 1e6).unwrap_or(0.0);
                let [new, old] = guest_vs_baseline(dir.path(), &baseline).await;
                println!(
                    "pod VM start -> agent ready (QEMU/{:?}, 256 MiB), p50 of 5: {}; initramfs {:.1} MB vs {:.1} MB",
                    Host::probe().qemu_accel().0,
                    new.versus(&old, "this guest image", &baseline.display().to_string(), "this/baseline"),
                    size(guest_image_dir().join("initramfs.cpio")),
                    size(baseline.join("initramfs.cpio")),
                );
            }
        }
    }

    if row("stack") {
        match std::env::var_os("HULL_BENCH_BASELINE_HULL") {
            None => println!("SKIP stack row: HULL_BENCH_BASELINE_HULL names no earlier build's checkout to compare with"),
            Some(baseline) => {
                let baseline = std::path::PathBuf::from(baseline);
                let [[ready, run], [old_ready, old_run]] = stack_vs_baseline(dir.path(), &baseline);
                println!(
                    "hull run --verbose /bin/true (QEMU/{:?}, 256 MiB), p50 of 5: microVM ready this build {ready:.2} s, {} {old_ready:.2} s, this/baseline = {:.2}; whole run {run:.2} s vs {old_run:.2} s, this/baseline = {:.2}",
                    Host::probe().qemu_accel().0,
                    baseline.display(),
                    ready / old_ready,
                    run / old_run
                );
            }
        }
    }

    if row("vsock") {
        let (out_rate, in_rate) = vsock_throughput(dir.path()).await;
        println!("vsock through the vhost-user backend (QEMU/{:?}), {MIB} MiB: guest->host {out_rate:.0} MB/s, host->guest {in_rate:.0} MB/s", Host::probe().qemu_accel().0);
    }
    if !row("rss") {
        return;
    }

    let q = dir.path().join("qemu");
    let b = dir.path().join("builtin");
    for d in [&q, &b] {
        std::fs::create_dir_all(d).expect("dir");
    }
    let (qemu_rss, qemu_boot) = booted_rss(&q, qemu_engine()).await;
    let (hull_rss, hull_boot) = booted_rss(&b, Engine::Builtin).await;
    println!(
        "RSS with the agent up, 128 MiB guest: hull-vmm {hull_rss:.1} MiB (boot {:.0} s), QEMU + backends {qemu_rss:.1} MiB (boot {:.1} s), hull/QEMU = {:.2}",
        hull_boot.as_secs_f64(),
        qemu_boot.as_secs_f64(),
        hull_rss / qemu_rss
    );
}
