//! A real KVM for the suites where this machine has none (this project's hosts offer kvm_pvm):
//! an L1 VM under QEMU/TCG with `-cpu max`, whose emulated AMD SVM with nested paging lets
//! Debian's stock kernel load kvm_amd. This machine's root filesystem is visible in L1
//! read-only over 9p, under a tmpfs overlay, so a test runs there exactly as here: the same
//! test binary, the same hull binaries, guest image, containerd and busybox.
//!
//! A real-KVM test starts with `on_real_kvm!("module::test_name")`: on a host with VT-x or
//! AMD-V it runs in place; elsewhere the test binary runs itself (that one test) inside the L1
//! VM and passes or fails with it. Everything in L1 runs under TCG: compare engines there as
//! ratios, never as times.
//!
//! The kernel is Debian's `linux-image-amd64` dependency, fetched with `apt-get download` and
//! cached under `target/kvm-host/<package>/` (unpacked, with the modules.dep busybox's depmod
//! writes). The L1 initramfs holds busybox, the modules that mount the 9p root, and /init
//! (`kvm_host_init.sh`).

use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use hull_guest_image::cpio::CpioWriter;

use crate::BUSYBOX;

/// The metapackage whose dependency names the stock kernel of this Debian release.
const KERNEL_METAPACKAGE: &str = "linux-image-amd64";
/// Loaded from the initramfs: what mounting the 9p root and the overlay needs.
const BOOT_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p", "overlay"];
/// Loaded from the full module tree once the root is mounted: KVM, and what pods and CNI use
/// (the nf_tables ones for the shim's port-forward redirect; L1's chrooted command cannot
/// autoload them; crc32c_generic first: busybox modprobe ignores libcrc32c's soft dependency).
const HOST_MODULES: &[&str] = &["kvm_amd", "tun", "veth", "bridge", "sch_ingress", "cls_u32", "act_mirred", "fuse", "crc32c_generic", "nf_tables", "nft_chain_nat", "nft_compat", "nft_redir", "xt_REDIRECT"];
/// The L1 VM's size: two vCPUs (SMP guests need two host vCPUs) and room for containerd, the
/// pod VMs and the overlay's tmpfs.
const L1_CPUS: &str = "2";
const L1_MEMORY: &str = "3072";
/// The L1 CPU: QEMU's `max` without XSAVE. QEMU's TCG (7.2 and 10.0 alike) runs a nested
/// guest's XSETBV without the SVM intercept, so L1's KVM never learns the XCR0 the pod's guest
/// set and loads its own idea of it (x87 only) on every VM entry: the guest warns "XSAVE
/// consistency problem" and, when it restores state XCR0 no longer holds, faults into a triple
/// fault early in boot (measured: about one boot in ten at loglevel 7). Without XSAVE in L1,
/// the guest never enables it.
const L1_CPU: &str = "max,-xsave";
/// L1's KVM with shadow paging instead of nested paging: TCG's emulation of nested paging lost
/// guest writes (a guest spinning on a lock nobody held) and faulted guests at random points;
/// with shadow paging the pod's guest runs on ordinary paging, TCG's best-trodden path.
/// Measured: 17 pods in a row without a guest failure, against one in four to one in ten
/// with nested paging; boots ~15% slower.
const KVM_AMD_PARAMS: &str = "npt=0";
/// How often a run is repeated when L1 itself failed (see `l1_failed`).
const L1_RETRIES: usize = 3;
/// Set in the environment of a test re-run inside the L1 VM.
const INNER_ENV: &str = "HULL_IN_KVM_HOST";
/// What a test run inside L1 may take, boot to power-off.
const RUN_LIMIT: Duration = Duration::from_secs(900);
/// L1's /init rewrites `heartbeat` every 3 s of L1's clock while the command runs. This long
/// without a new beat, L1 has stopped (its kernel, or QEMU's emulation of the CPU under it).
const HEARTBEAT_LIMIT: Duration = Duration::from_secs(60);
/// Until the first beat: L1's boot, its modules and the 9p root.
const FIRST_BEAT_LIMIT: Duration = Duration::from_secs(180);
/// How long an L1 that still beats at RUN_LIMIT gets to write what its processes wait on.
const DUMP_LIMIT: Duration = Duration::from_secs(30);

/// One L1 VM at a time: each keeps both host cores busy, and the suites' timeouts assume it.
static L1: Mutex<()> = Mutex::new(());

/// Where a real-KVM test runs.
pub enum RealKvm {
    /// This host (or this L1 VM) has a hardware-backed /dev/kvm: run the test body here.
    Here,
    /// The test ran inside the L1 VM and passed there.
    RanInside,
    /// It cannot run: the reason, in one line.
    Missing(String),
}

/// Runs a test on a real KVM: in place, or by running `test` (its name in the test binary,
/// `module::function`) inside the L1 VM. Panics with the inner output when it fails there.
#[macro_export]
macro_rules! on_real_kvm {
    ($test:expr) => {
        match $crate::kvm_host::real_kvm($test) {
            $crate::kvm_host::RealKvm::Here => {}
            $crate::kvm_host::RealKvm::RanInside => return,
            $crate::kvm_host::RealKvm::Missing(why) => {
                if std::env::var_os("HULL_REQUIRE_ALL").is_some() {
                    panic!("prerequisite missing under HULL_REQUIRE_ALL: {why}");
                }
                eprintln!("SKIP {}: {why}", module_path!());
                return;
            }
        }
    };
}

pub fn real_kvm(test: &str) -> RealKvm {
    if std::env::var_os(INNER_ENV).is_some() || hull_runtime::host::Host::probe().kvm == hull_runtime::host::Kvm::Hardware {
        return RealKvm::Here;
    }
    if let Some(why) = missing() {
        return RealKvm::Missing(why);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let args = [test, "--exact", "--nocapture", "--test-threads=1"];
    let host = match KvmHost::prepare() {
        Ok(host) => host,
        Err(e) => panic!("{test}: the L1 KVM host could not be prepared: {e:#}"),
    };
    let mut run = host.run(&exe, &args);
    for _ in 0..L1_RETRIES {
        let Ok(failed) = &run else { break };
        let Some(why) = l1_failed(failed) else { break };
        // Not hull's failure: the emulated machine under the test broke (see `l1_failed`).
        // Said loudly, with what the test had printed, and the run is repeated on a fresh L1 VM.
        eprintln!(
            "{test}: the L1 KVM host failed ({why}) after {:.0} s; running the test again on a fresh L1 VM.\n--- output ---\n{}\n--- L1 console (tail) ---\n{}",
            failed.elapsed.as_secs_f64(),
            tail(&failed.output, 20),
            tail(&failed.console, 40)
        );
        run = host.run(&exe, &args);
    }
    match run {
        Ok(run) if run.status == Some(0) => {
            eprintln!("{test} ran in the L1 KVM host ({:.0} s):\n{}", run.elapsed.as_secs_f64(), run.output);
            RealKvm::RanInside
        }
        Ok(run) => panic!(
            "{test} in the L1 KVM host: exit status {:?} after {:.0} s{}\n--- output ---\n{}\n--- L1 console (tail) ---\n{}{}",
            run.status,
            run.elapsed.as_secs_f64(),
            l1_failed(&run).map(|why| format!(" (L1 failed: {why}, {L1_RETRIES} times retried)")).unwrap_or_default(),
            run.output,
            tail(&run.console, 60),
            run.dump.as_deref().map(|d| format!("\n--- L1's processes at the time limit ---\n{d}")).unwrap_or_default()
        ),
        Err(e) => panic!("{test}: the L1 KVM host did not run: {e:#}"),
    }
}

/// Why L1 itself failed under a run, or None: its kernel said so on the console, or it stopped
/// beating (see `l1_kernel_failed`, `HEARTBEAT_LIMIT`). A test that hangs while L1 beats, or
/// fails, is the test's failure.
pub fn l1_failed(run: &Run) -> Option<String> {
    l1_kernel_failed(&run.console).or_else(|| run.silent.map(|s| format!("no heartbeat for {:.0} s: L1 stopped", s.as_secs_f64())))
}

/// The first line of L1's console that says L1's own kernel failed (a panic, an oops, a soft
/// lockup), or None. hull runs in L1 as processes; only L1's kernel, or QEMU's emulation of the
/// CPU under it, can make L1's kernel fail. Measured under QEMU's TCG with nested SVM, about
/// once in fifteen pod boots: a corrupted stack end in the vCPU thread, a page fault loop
/// with the guest's GS base after a VM exit, both CPUs soft-locked in KVM's PIT and vCPU.
pub fn l1_kernel_failed(console: &str) -> Option<String> {
    const SIGNS: &[&str] = &["Kernel panic", "BUG: ", "Oops", "general protection fault"];
    console.lines().find(|l| SIGNS.iter().any(|s| l.contains(s))).map(|l| l.trim().to_owned())
}

/// Why the L1 VM cannot run here, or None.
pub fn missing() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root for the L1 KVM host".into());
    }
    for (tool, package) in [("qemu-system-x86_64", "qemu-system-x86"), ("apt-get", "apt"), ("dpkg-deb", "dpkg")] {
        if Command::new("sh").args(["-c", &format!("command -v {tool}")]).stdout(Stdio::null()).status().map(|s| !s.success()).unwrap_or(true) {
            return Some(format!("needs {tool} for the L1 KVM host (apt-get install {package})"));
        }
    }
    if !Path::new(BUSYBOX).exists() {
        return Some(format!("needs {BUSYBOX} for the L1 KVM host (apt-get install busybox-static)"));
    }
    crate::missing_guest_image()
}

/// The L1 VM's kernel and initramfs, ready to boot.
pub struct KvmHost {
    vmlinuz: PathBuf,
    initramfs: PathBuf,
    modules: PathBuf,
}

/// What one run inside the L1 VM gave.
pub struct Run {
    /// The command's exit status; None when it never finished (L1 did not boot, timed out).
    pub status: Option<i32>,
    /// The command's stdout and stderr, interleaved as written.
    pub output: String,
    /// The L1 kernel's console.
    pub console: String,
    pub elapsed: Duration,
    /// Set when L1 stopped beating: how long it had been silent when it was killed.
    pub silent: Option<Duration>,
    /// What L1's processes waited on when the run reached RUN_LIMIT (L1 still beating).
    pub dump: Option<String>,
}

impl KvmHost {
    /// Fetches (once per kernel version) and unpacks Debian's stock kernel, and writes the
    /// L1 initramfs beside it.
    pub fn prepare() -> Result<KvmHost> {
        let _one = L1.lock().unwrap_or_else(|p| p.into_inner());
        let cache = cache_root();
        std::fs::create_dir_all(&cache).with_context(|| format!("create {}", cache.display()))?;
        let package = kernel_package()?;
        let version = package.strip_prefix("linux-image-").context("kernel package name")?.to_owned();
        let unpacked = cache.join(&package);
        if !unpacked.join("lib/modules").join(&version).join("modules.dep").exists() {
            unpack_kernel(&package, &version, &unpacked)?;
        }
        let modules = unpacked.join("lib/modules");
        let initramfs = cache.join(format!("{package}-l1.cpio"));
        write_initramfs(&initramfs, &modules, &version)?;
        Ok(KvmHost { vmlinuz: unpacked.join("boot").join(format!("vmlinuz-{version}")), initramfs, modules })
    }

    /// Runs `program args` inside a fresh L1 VM, with this process's working directory and the
    /// environment the suites read, and powers the VM off after it.
    pub fn run(&self, program: &Path, args: &[&str]) -> Result<Run> {
        let _one = L1.lock().unwrap_or_else(|p| p.into_inner());
        let out = tempfile::Builder::new().prefix("kvm-host-").tempdir().context("tempdir for the L1 run")?;
        let cwd = std::env::current_dir().context("working directory")?;
        let mut script = String::from("set -u\n");
        script += &format!("MODULES={}\n", quote(self.modules.as_os_str().as_bytes()));
        script += &format!("HOST_MODULES='{}'\n", HOST_MODULES.join(" "));
        script += &format!("KVM_AMD_PARAMS='{KVM_AMD_PARAMS}'\n");
        // The command, run by /init chrooted, in /run/kvm-host (a 9p share of `out`) with its output.
        let mut cmd = format!("cd {}\n", quote(cwd.as_os_str().as_bytes()));
        cmd += &format!("export {INNER_ENV}=1 HOME=/root\n");
        for var in ["PATH", "HULL_REQUIRE_ALL", "RUST_BACKTRACE", "RUST_LOG", "HULL_BENCH_KVM"] {
            if let Some(v) = std::env::var_os(var) {
                cmd += &format!("export {var}={}\n", quote(v.as_bytes()));
            }
        }
        cmd += "exec";
        for a in std::iter::once(program.as_os_str().as_bytes()).chain(args.iter().map(|a| a.as_bytes())) {
            cmd += " ";
            cmd += &quote(a);
        }
        cmd += "\n";
        std::fs::write(out.path().join("env"), script).context("write the L1 run's env")?;
        std::fs::write(out.path().join("cmd"), cmd).context("write the L1 run's command")?;
        let console = out.path().join("console.log");

        let started = Instant::now();
        let mut qemu = Command::new("qemu-system-x86_64")
            .args(["-machine", "q35,accel=tcg", "-cpu", L1_CPU, "-smp", L1_CPUS, "-m", L1_MEMORY])
            .args(["-nodefaults", "-no-reboot", "-display", "none", "-monitor", "none"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-kernel")
            .arg(&self.vmlinuz)
            .arg("-initrd")
            .arg(&self.initramfs)
            // A soft lockup of L1's kernel ends the run at once instead of at RUN_LIMIT.
            .args(["-append", "console=ttyS0 rdinit=/init panic=-1 softlockup_panic=1 loglevel=4"])
            // multidevs=remap: without it the host's /proc and /sys collide in 9p inode
            // numbers and the overlay above shows one for the other.
            .args(["-virtfs", "local,path=/,mount_tag=hostroot,security_model=passthrough,readonly=on,multidevs=remap"])
            .arg("-virtfs")
            .arg(format!("local,path={},mount_tag=out,security_model=passthrough,multidevs=remap", out.path().display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(out.path().join("qemu.err")).context("create qemu.err")?)
            .spawn()
            .context("start qemu-system-x86_64 for the L1 KVM host")?;
        let read = |name: &str| std::fs::read(out.path().join(name)).map(|b| String::from_utf8_lossy(&b).into_owned());
        let (mut silent, mut dump, mut killed) = (None, None, None);
        let (mut beat, mut beat_at) = (None, started);
        loop {
            if qemu.try_wait().context("wait for the L1 VM")?.is_some() {
                break;
            }
            let now = Instant::now();
            let heartbeat = read("heartbeat").ok().filter(|b| !b.is_empty());
            if heartbeat.is_some() && heartbeat != beat {
                (beat, beat_at) = (heartbeat, now);
            }
            let quiet = now - beat_at;
            if quiet > if beat.is_some() { HEARTBEAT_LIMIT } else { FIRST_BEAT_LIMIT } {
                silent = Some(quiet);
                killed = Some(format!("killed: no heartbeat for {:.0} s", quiet.as_secs_f64()));
            } else if now - started > RUN_LIMIT {
                // The test hangs in a live L1: ask for what every process waits on, then end it.
                std::fs::write(out.path().join("dump-request"), b"").context("ask L1 for its processes")?;
                let asked = Instant::now();
                while asked.elapsed() < DUMP_LIMIT && dump.is_none() {
                    std::thread::sleep(Duration::from_secs(1));
                    dump = read("dump").ok();
                }
                killed = Some(format!("killed after {} s", RUN_LIMIT.as_secs()));
            }
            if killed.is_some() {
                qemu.kill().context("kill the L1 VM")?;
                qemu.wait().context("wait for the killed L1 VM")?;
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        let elapsed = started.elapsed();
        let mut console_text = read("console.log").unwrap_or_default();
        let qemu_err = read("qemu.err").unwrap_or_default();
        if !qemu_err.is_empty() {
            console_text += &format!("\n--- qemu stderr ---\n{qemu_err}");
        }
        if let Some(killed) = killed {
            console_text += &format!("\n--- {killed} ---");
        }
        let status = read("status").ok().and_then(|s| s.trim().parse().ok());
        Ok(Run { status, output: read("output").unwrap_or_default(), console: console_text, elapsed, silent, dump })
    }
}

/// target/kvm-host, beside target/guest.
fn cache_root() -> PathBuf {
    crate::guest_image_dir().parent().expect("target dir").join("kvm-host")
}

/// `linux-image-<version>`: the dependency of the metapackage apt knows now.
fn kernel_package() -> Result<String> {
    let depends = || -> Result<Option<String>> {
        let out = Command::new("apt-cache").args(["depends", KERNEL_METAPACKAGE]).output().context("run apt-cache")?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text.lines().filter_map(|l| l.trim().strip_prefix("Depends: ")).find(|d| d.starts_with("linux-image-")).map(str::to_owned))
    };
    if let Some(p) = depends()? {
        return Ok(p);
    }
    apt_update()?;
    depends()?.with_context(|| format!("apt knows no dependency of {KERNEL_METAPACKAGE} even after apt-get update"))
}

fn apt_update() -> Result<()> {
    let st = Command::new("apt-get").args(["update", "-qq"]).status().context("run apt-get update")?;
    ensure!(st.success(), "apt-get update failed: {st}");
    Ok(())
}

/// Downloads the package, unpacks it into `dest` and writes its modules.dep.
fn unpack_kernel(package: &str, version: &str, dest: &Path) -> Result<()> {
    let work = dest.with_extension(format!("partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let download = || Command::new("apt-get").args(["download", "-qq", package]).current_dir(&work).output();
    let mut out = download().context("run apt-get download")?;
    if !out.status.success() {
        // The package lists may be older than the mirror: refresh once.
        apt_update()?;
        out = download().context("run apt-get download")?;
    }
    ensure!(out.status.success(), "apt-get download {package}: {}", String::from_utf8_lossy(&out.stderr));
    let deb = std::fs::read_dir(&work)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download {package} left no .deb"))?;
    let tree = work.join("tree");
    let st = Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree).status().context("run dpkg-deb")?;
    ensure!(st.success(), "dpkg-deb -x {}: {st}", deb.display());
    let st = Command::new(BUSYBOX).arg("depmod").arg("-b").arg(&tree).arg(version).status().context("run busybox depmod")?;
    ensure!(st.success(), "busybox depmod for {version}: {st}");
    let _ = std::fs::remove_dir_all(dest);
    std::fs::rename(&tree, dest).with_context(|| format!("move the unpacked kernel to {}", dest.display()))?;
    std::fs::remove_dir_all(&work)?;
    Ok(())
}

/// The modules.dep entries (path: deps) of `names` and everything they need.
fn module_closure(dep: &str, names: &[&str]) -> Result<Vec<(String, Vec<String>)>> {
    let entries: Vec<(&str, Vec<&str>)> = dep
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(path, deps)| (path, deps.split_whitespace().collect()))
        .collect();
    let name_of = |path: &str| Path::new(path).file_stem().map(|s| s.to_string_lossy().replace('-', "_")).unwrap_or_default();
    let mut wanted: Vec<String> = Vec::new();
    for name in names {
        let (path, deps) = entries.iter().find(|(p, _)| name_of(p) == *name).with_context(|| format!("no module {name} in modules.dep"))?;
        for p in std::iter::once(*path).chain(deps.iter().copied()) {
            if !wanted.iter().any(|w| w == p) {
                wanted.push(p.to_owned());
            }
        }
    }
    wanted
        .into_iter()
        .map(|p| {
            let deps = entries.iter().find(|(e, _)| *e == p).map(|(_, d)| d.iter().map(|s| s.to_string()).collect()).with_context(|| format!("{p} is not in modules.dep"))?;
            Ok((p, deps))
        })
        .collect()
}

fn write_initramfs(path: &Path, modules: &Path, version: &str) -> Result<()> {
    let tree = modules.join(version);
    let dep = std::fs::read_to_string(tree.join("modules.dep")).context("read modules.dep")?;
    let boot = module_closure(&dep, BOOT_MODULES)?;
    let partial = path.with_extension("partial");
    let mut cpio = CpioWriter::new(std::io::BufWriter::new(std::fs::File::create(&partial)?));
    for d in ["bin", "dev", "proc", "sys", "lib", "lib/modules", "host", "out", "newroot", "upper"] {
        cpio.dir(d, 0o755)?;
    }
    cpio.char_dev("dev/console", 0o600, 5, 1)?;
    cpio.file("bin/busybox", 0o755, &std::fs::read(BUSYBOX).context("read busybox")?)?;
    cpio.file("init", 0o755, include_bytes!("kvm_host_init.sh"))?;
    let root = format!("lib/modules/{version}");
    cpio.dir(&root, 0o755)?;
    let mut dirs: Vec<String> = Vec::new();
    let mut dep_text = String::new();
    for (module, deps) in &boot {
        let mut at = root.clone();
        for part in Path::new(module).parent().into_iter().flat_map(|p| p.iter()) {
            at = format!("{at}/{}", part.to_string_lossy());
            if !dirs.contains(&at) {
                cpio.dir(&at, 0o755)?;
                dirs.push(at.clone());
            }
        }
        let bytes = std::fs::read(tree.join(module)).with_context(|| format!("read module {module}"))?;
        cpio.file(&format!("{root}/{module}"), 0o644, &bytes)?;
        dep_text += &format!("{module}: {}\n", deps.join(" "));
    }
    cpio.file(&format!("{root}/modules.dep"), 0o644, dep_text.as_bytes())?;
    let mut file = cpio.finish()?.into_inner().map_err(|e| e.into_error())?;
    file.flush()?;
    std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o644))?;
    std::fs::rename(&partial, path)?;
    Ok(())
}

/// A shell word for `bytes`.
fn quote(bytes: &[u8]) -> String {
    format!("'{}'", String::from_utf8_lossy(bytes).replace('\'', r"'\''"))
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    #[test]
    fn closure_follows_modules_dep() {
        let dep = "kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/netfs/netfs.ko\nkernel/net/9p/9pnet.ko:\nkernel/fs/netfs/netfs.ko:\nkernel/x/kvm-amd.ko: kernel/x/kvm.ko\nkernel/x/kvm.ko:\n";
        let got = super::module_closure(dep, &["9p", "kvm_amd"]).unwrap();
        let paths: Vec<&str> = got.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, ["kernel/fs/9p/9p.ko", "kernel/net/9p/9pnet.ko", "kernel/fs/netfs/netfs.ko", "kernel/x/kvm-amd.ko", "kernel/x/kvm.ko"]);
        assert!(super::module_closure(dep, &["nope"]).is_err());
    }

    #[test]
    fn l1_kernel_failures_are_told_from_a_normal_console() {
        let normal = "[    1.0] NMI watchdog: Perf NMI watchdog permanently disabled\n[   30.5] kvm [189]: vcpu0, guest rIP: 0xffffffff81003abf Unhandled WRMSR(0xc0010007) = 0xffff\n";
        assert_eq!(super::l1_kernel_failed(normal), None);
        for line in ["[  120.6] watchdog: BUG: soft lockup - CPU#0 stuck for 26s! [kvm-pit/253:255]", "[  326.6] Kernel panic - not syncing: corrupted stack end detected inside scheduler"] {
            assert_eq!(super::l1_kernel_failed(&format!("{normal}{line}\n")).as_deref(), Some(line));
        }
    }

    #[test]
    fn an_l1_that_stopped_beating_failed_and_a_test_that_hung_in_a_live_one_did_not() {
        let run = |silent| super::Run { status: None, output: String::new(), console: String::new(), elapsed: super::RUN_LIMIT, silent, dump: None };
        assert_eq!(super::l1_failed(&run(None)), None, "a timed-out test in a beating L1 is the test's failure");
        let why = super::l1_failed(&run(Some(std::time::Duration::from_secs(61)))).expect("a silent L1 failed");
        assert!(why.contains("no heartbeat for 61 s"), "{why}");
    }
}
