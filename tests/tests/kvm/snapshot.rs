//! hull-vmm's own snapshots on a real KVM (here on a VT-x/AMD-V host, else in the L1 KVM host):
//! a VM booted from hull's kernel and root image to its agent is paused and saved
//! (`hull-vmm ctl ... snapshot DIR`), and two VMs are restored from the save at once, each with
//! a vsock CID and host socket of its own. The muxer drops every packet whose source CID is not
//! its VM's, so a restored agent answers only if the guest took its new CID (the transport
//! reset the vsock device sends after a restore): without it, the agent is never reached.
//! A restore into a VM made differently (memory size) is refused, naming the difference.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hull_runtime::agent::client::AgentConn;
use hull_tests::{binary, guest_image_dir, missing_guest_image};

fn missing() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root for /dev/kvm".into());
    }
    missing_guest_image()
}

const MEMORY_MIB: &str = "256";

/// One hull-vmm: its directory holds its vsock socket, API socket, console and log.
struct Vmm {
    child: Child,
    dir: PathBuf,
}

impl Vmm {
    /// `hull-vmm boot` with the pod VM's devices (vsock, rng, balloon, the root image on pmem)
    /// and `how`: the kernel and its command line, or `--restore DIR`.
    fn start(dir: &Path, cid: u32, memory_mib: &str, how: &[String]) -> Vmm {
        std::fs::create_dir_all(dir).expect("VM dir");
        let guest = guest_image_dir();
        let log = std::fs::File::create(dir.join("hull-vmm.log")).expect("log");
        let child = Command::new(binary("hull-vmm"))
            .args(["boot", "--vcpus", "2", "--memory-mib", memory_mib, "--rng", "--free-page-reporting"])
            .args(["--guest-cid", &cid.to_string()])
            .arg("--pmem")
            .arg(guest.join(hull_runtime::config::ROOT_IMAGE))
            .arg("--vsock-uds")
            .arg(dir.join("vsock.sock"))
            .arg("--api-socket")
            .arg(dir.join("api.sock"))
            .arg("--console")
            .arg(dir.join("console.log"))
            .args(how)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("hull-vmm starts");
        Vmm { child, dir: dir.into() }
    }

    fn log(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("hull-vmm.log")).unwrap_or_default();
        let console = std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default();
        let tail: Vec<&str> = console.lines().rev().take(40).collect();
        format!("hull-vmm log:\n{log}\nconsole (last lines):\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"))
    }

    fn ctl(&self, request: &str) -> String {
        let out = Command::new(binary("hull-vmm")).arg("ctl").arg("--api-socket").arg(self.dir.join("api.sock")).arg(request).output().expect("hull-vmm ctl");
        assert!(out.status.success(), "ctl {request}: {}\n{}", String::from_utf8_lossy(&out.stderr), self.log());
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Waits until the agent answers a health check over this VM's hybrid vsock.
    async fn agent(&mut self, within: Duration) -> AgentConn {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("hull-vmm exited ({status}) before its agent answered\n{}", self.log());
            }
            // Bounded: a guest that never answers leaves a connection waiting for its OK.
            let attempt = async {
                let conn = AgentConn::connect_hybrid_vsock(&self.dir.join("vsock.sock")).await.ok()?;
                conn.check().await.unwrap_or(false).then_some(conn)
            };
            if let Ok(Some(conn)) = tokio::time::timeout(Duration::from_secs(3), attempt).await {
                return conn;
            }
            assert!(Instant::now() < deadline, "no agent within {within:?}\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "hull-vmm still runs after {within:?}\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_vm_saved_at_agent_ready_restores_twice_each_with_its_own_cid() {
    hull_tests::skip_if_missing!(missing());
    hull_tests::on_real_kvm!("snapshot::a_vm_saved_at_agent_ready_restores_twice_each_with_its_own_cid");
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    let dir = tempfile::tempdir().expect("tempdir");
    let snap = dir.path().join("snapshot");
    let guest = guest_image_dir();
    let root_words = hull_runtime::hypervisor::GuestRoot::Image(PathBuf::new()).cmdline().join(" ");
    let boot = vec!["--kernel".to_string(), guest.join(hull_runtime::config::GUEST_KERNEL).to_string_lossy().into_owned(), "--append".into(), format!("panic=-1 loglevel=4 {root_words}")];

    let started = Instant::now();
    let mut template = Vmm::start(&dir.path().join("template"), 3, MEMORY_MIB, &boot);
    rt.block_on(template.agent(Duration::from_secs(300)));
    let booted = started.elapsed();
    assert_eq!(template.ctl("pause"), "ok (was: running)");
    let saved = template.ctl(&format!("snapshot {}", snap.display()));
    assert!(saved.starts_with("ok ("), "{saved}");
    template.ctl("stop");
    assert!(template.wait_exit(Duration::from_secs(30)).success(), "{}", template.log());
    let memory = std::fs::metadata(snap.join("memory")).expect("memory file");
    eprintln!("booted to agent in {booted:?}; saved: {saved}; memory file {} bytes apparent", memory.len());

    let restore = vec!["--restore".to_string(), snap.to_string_lossy().into_owned()];
    // One at a time, each timed as the boot was; the second starts while the first runs.
    let mut restored = Vec::new();
    for (cid, name) in [(4, "one"), (5, "two")] {
        let started = Instant::now();
        let mut vm = Vmm::start(&dir.path().join(format!("restored-{cid}")), cid, MEMORY_MIB, &restore);
        rt.block_on(async {
            let conn = vm.agent(Duration::from_secs(120)).await;
            let took = started.elapsed();
            let setup = vm.log().lines().find(|l| l.contains("VM running")).map(|l| l.trim().to_string()).unwrap_or_default();
            eprintln!("restored VM {name} to agent in {took:?}, restored/booted = {:.2} ({setup})", took.as_secs_f64() / booted.as_secs_f64());
            let mut req = hull_proto::agent::CreateSandboxRequest::new();
            req.sandbox_id = format!("restored-{name}");
            req.hostname = format!("restored-{name}");
            req.wall_clock_ns = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_nanos() as u64;
            req.entropy = vec![7; 32];
            conn.create_sandbox(&req).await.unwrap_or_else(|e| panic!("CreateSandbox in a restored VM: {e}\n{}", vm.log()));
        });
        restored.push(vm);
    }
    for (vm, cid) in restored.iter_mut().zip([4, 5]) {
        let log = vm.log();
        assert!(log.contains("restored=true"), "{log}");
        assert!(log.contains("transport reset sent"), "the vsock device told the guest: {log}");
        assert!(log.contains("the guest took the transport reset"), "{log}");
        // The agent's own view of its CID, as it logged CreateSandbox (colours stripped).
        let plain = hull_tests::strip_ansi(&std::fs::read_to_string(vm.dir.join("console.log")).unwrap_or_default());
        assert!(plain.contains(&format!("vsock_cid={cid}")), "the guest took CID {cid}: {log}");
        vm.ctl("stop");
        assert!(vm.wait_exit(Duration::from_secs(30)).success(), "{log}");
    }

    // A VM of another size cannot take the snapshot: refused before anything runs.
    let mut other = Vmm::start(&dir.path().join("other"), 6, "512", &restore);
    let status = other.wait_exit(Duration::from_secs(60));
    let log = other.log();
    assert!(!status.success(), "{log}");
    assert!(log.contains("The snapshot was made with 256 MiB of memory; this VM has 512 MiB"), "{log}");
}
