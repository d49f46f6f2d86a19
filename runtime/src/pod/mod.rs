//! A pod: one microVM with its agent, its share and its network, booted and destroyed the same
//! way for the shim and for `hull run`.
//!
//! - `state`: the pod's state directory (sole owner of its layout).
//! - `share`: what the guest sees of the host (the virtio-fs share).
//! - `network`: the pod's CNI interface carried into the VM.
//! - `forward`: containerd's port-forward dials relayed into the VM.
//! - `cgroup`: the pod's cgroup, where the VM's host processes live.
//! - `spec`: a container's OCI spec rewritten for the guest, and the VM's size.

pub mod cgroup;
pub mod forward;
pub mod network;
pub mod share;
pub mod spec;
pub mod state;

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::agent::{AgentConn, ClientError};
use crate::config::Config;
use crate::host::{Host, HostError};
use crate::hypervisor::jail::UidLease;
use crate::hypervisor::snapshot::Snapshots;
use crate::hypervisor::{Binaries, Engine, HypervisorError, Nic, Share, Vm, VmDir, VmSpec};
use network::{NetworkError, PodNetwork};
use state::{PodDir, StateError};

#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("{0} Choose the qemu or auto hypervisor.")]
    Engine(#[from] HostError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("The pod VM did not boot: {0}")]
    Boot(#[from] HypervisorError),
    #[error("The pod's agent refused the sandbox: {0}")]
    Agent(#[from] ClientError),
    #[error("The pod's network cannot reach its VM: {0}")]
    Network(#[from] NetworkError),
    #[error(transparent)]
    Share(#[from] share::ShareError),
    #[error("The pod's VM cannot be put in the pod's cgroup: {0}")]
    Cgroup(#[from] cgroup::CgroupError),
}

/// What a pod is booted with, besides the config.
pub struct PodSpec<'a> {
    pub id: &'a str,
    pub hostname: &'a str,
    /// The pod's network namespace (CRI's, from the sandbox spec); its interface is carried
    /// into the VM.
    pub netns: Option<&'a Path>,
    /// The host directory the guest sees through virtio-fs: by default the pod's own share
    /// (a read-only view of the pod's mounts, where the shim binds each container's rootfs;
    /// pod/share.rs); `hull run` shares its
    /// one rootfs directly, so that nothing is mounted over the user's directory.
    pub share: Option<&'a Path>,
    /// The pod's sysctls (the sandbox spec's `linux.sysctl`), set in the guest sandbox.
    pub sysctls: std::collections::HashMap<String, String>,
    /// The pod's cgroup (the sandbox spec's `linux.cgroupsPath`): the VM's host processes and
    /// the shim live there (pod/cgroup.rs).
    pub cgroups_path: Option<&'a str>,
}

pub struct Pod {
    pub id: String,
    pub dir: PodDir,
    pub conn: Arc<AgentConn>,
    pub vmm_pid: u32,
    /// What runs the VM, and why it was chosen.
    pub engine: Engine,
    pub engine_why: &'static str,
    /// debug_console: keep the console log beside the state directory when the pod ends.
    keep_console: bool,
    vm: Vm,
    /// Relays containerd's port-forward dials (pods with a network namespace); ends with the VM.
    forwarder: std::sync::Mutex<Option<forward::PortForwarder>>,
    /// The pod's cgroup, left when the VM is gone.
    cgroup: std::sync::Mutex<Option<cgroup::PodCgroup>>,
    /// The jail uid this pod's VM processes run as, held while the pod lives.
    _jail_uid: Option<UidLease>,
    /// The one destroy: a second caller (a Shutdown after a Delete that timed out) waits for it.
    destroyed: tokio::sync::OnceCell<bool>,
    /// Set when the destroy starts: the VM's exit from then on is the one asked for.
    ending: std::sync::atomic::AtomicBool,
}

impl Pod {
    /// Boots the pod's VM and creates the sandbox in its agent. On failure nothing is left:
    /// the VM's processes are killed and the state directory is removed.
    pub async fn boot(config: &Config, dir: PodDir, spec: PodSpec<'_>) -> Result<Pod, PodError> {
        // Joined first: everything the VM is, it is inside the pod's cgroup from its start.
        let mut cgroup = match spec.cgroups_path.map(cgroup::PodCgroup::join) {
            Some(Ok(c)) => Some(c),
            Some(Err(e @ cgroup::CgroupError::NoHierarchy)) => {
                tracing::warn!(sandbox_id = %spec.id, error = %e, "the pod's VM stays in the shim's cgroup");
                None
            }
            Some(Err(e)) => return Err(e.into()),
            None => None,
        };
        let result = Self::boot_vm(config, &dir, &spec).await;
        match result {
            Ok(pod) => {
                if let Some(c) = &cgroup {
                    tracing::info!(sandbox_id = %spec.id, cgroups = ?c.dirs().collect::<Vec<_>>(), "pod VM in the pod's cgroup");
                }
                *pod.cgroup.lock().unwrap_or_else(|p| p.into_inner()) = cgroup;
                Ok(pod)
            }
            Err(e) => {
                // Every path out of boot_vm has killed and reaped what it started.
                if let Some(c) = cgroup.as_mut() {
                    c.leave();
                }
                remove_state(&dir);
                Err(e)
            }
        }
    }

    async fn boot_vm(config: &Config, dir: &PodDir, spec: &PodSpec<'_>) -> Result<Pod, PodError> {
        let id = spec.id;
        let (engine, why) = Host::probe().engine(config.hypervisor)?;
        tracing::info!(sandbox_id = %id, hypervisor = ?config.hypervisor, engine = ?engine, why, vcpus = config.vcpus, memory_mib = config.memory_mib, snapshots = config.snapshots, "booting the pod VM");
        dir.create()?;
        if let Some(path) = spec.cgroups_path {
            // For `delete`, should this shim die: it removes the cgroup when the pod is gone.
            dir.record_cgroup(path)?;
        }
        if spec.share.is_none() {
            share::prepare(dir)?;
        }
        let started = Instant::now();
        let net: Option<PodNetwork> = match spec.netns {
            Some(ns) => {
                // Recorded first: whatever setup leaves, cleanup_pod can find.
                dir.record_netns(ns)?;
                let ns = ns.to_path_buf();
                tokio::task::spawn_blocking(move || network::setup(&ns)).await.map_err(NetworkError::Thread)??
            }
            None => None,
        };
        let (jail, jail_uid) = match config.jail() {
            Some(jail) => {
                let (jail, lease) = jail.lease(config.jail_uids)?;
                tracing::info!(sandbox_id = %id, jail_uid = lease.uid, "pod VM jail uid leased");
                (Some(jail), Some(lease))
            }
            None => (None, None),
        };
        let vm_spec = VmSpec {
            kernel: config.kernel.clone(),
            root: config.root(),
            vcpus: config.vcpus,
            memory_mib: config.memory_mib,
            guest_cid: pod_cid(),
            cmdline_extra: config.debug_console.then(|| "loglevel=7".to_string()).into_iter().chain(config.kernel_params.split_whitespace().map(String::from)).collect(),
            vmm_extra: vec![],
            share: Some(Share { tag: share::FS_TAG.into(), dir: spec.share.map(Path::to_path_buf).unwrap_or_else(|| dir.shared()) }),
            nic: net.as_ref().map(|n| Nic { tap_fd: n.tap.as_raw_fd(), mac: n.mac.clone() }),
            log_cap: config.vm_log_kib * 1024,
            open_files: config.vm_open_files,
            jail,
        };
        let binaries = Binaries { qemu: config.qemu.clone(), vmm: config.vmm.clone() };
        let (vm, restored, conn) = match Self::restore(config, engine, dir, &vm_spec).await {
            Some((vm, conn)) => (vm, true, conn),
            None => (Vm::start(engine.hypervisor(&binaries).as_ref(), &vm_spec, dir.vm()).await?, false, None),
        };
        match Self::ready(config, dir, spec, &vm, conn, net).await {
            Ok(conn) => {
                tracing::info!(sandbox_id = %id, ready_ms = started.elapsed().as_millis() as u64, restored, guest_cid = vm_spec.guest_cid, "pod VM ready");
                let conn = Arc::new(conn);
                let forwarder = match spec.netns {
                    Some(ns) => match forward::PortForwarder::start(id, ns, conn.clone()).await {
                        Ok(f) => Some(f),
                        // The pod runs; only kubectl port-forward will not reach it.
                        Err(e) => {
                            tracing::warn!(sandbox_id = %id, error = %e, "port-forward into this pod is unavailable");
                            None
                        }
                    },
                    None => None,
                };
                Ok(Pod { id: id.into(), dir: dir.clone(), conn, vmm_pid: vm.vmm_pid(), engine, engine_why: why, keep_console: config.debug_console, vm, forwarder: std::sync::Mutex::new(forwarder), cgroup: Default::default(), _jail_uid: jail_uid, destroyed: Default::default(), ending: Default::default() })
            }
            Err(e) => {
                // Killed and reaped before the caller removes the state directory.
                vm.kill().await;
                Err(e)
            }
        }
    }

    /// The pod's VM restored from its snapshot (made first if there is none), if snapshots are
    /// on and the engine has them; None: boot it. A snapshot that cannot be made or loaded
    /// costs the pod a boot, not its start.
    async fn restore(config: &Config, engine: Engine, dir: &PodDir, vm_spec: &VmSpec) -> Option<(Vm, Option<AgentConn>)> {
        if !config.snapshots {
            return None;
        }
        let snapshots = Snapshots { dir: config.snapshot_dir.clone(), qemu: config.qemu.clone(), vmm: config.vmm.clone(), engine, boot_timeout: Duration::from_secs(config.boot_timeout_secs) };
        let template = VmDir::new(dir.path().join("template"));
        // Recorded as soon as they run: a shim killed mid-restore still leaves pids `delete` can end.
        let record = |vm: &Vm| {
            if let Err(e) = dir.write_pids(&vm.pids()) {
                tracing::warn!(error = %e, "cannot record the restored VM's pids");
            }
        };
        match snapshots.restore(vm_spec, dir.vm(), template, &record).await {
            Ok(restored) => Some(restored),
            Err(e) => {
                tracing::warn!(error = %e, "cannot restore the pod VM from a snapshot: booting it");
                None
            }
        }
    }

    /// From a started VM to a sandbox in its agent: pids recorded, agent answering (`conn`, if
    /// the restore already waited for it), sandbox created with the pod's network.
    async fn ready(config: &Config, dir: &PodDir, spec: &PodSpec<'_>, vm: &Vm, conn: Option<AgentConn>, net: Option<PodNetwork>) -> Result<AgentConn, PodError> {
        // Recorded before the wait: a shim killed mid-boot still leaves pids `delete` can end.
        dir.write_pids(&vm.pids())?;
        let waited = Instant::now();
        let conn = match conn {
            Some(conn) => conn,
            None => vm.wait_for_agent(Duration::from_secs(config.boot_timeout_secs)).await?,
        };
        let answered = Instant::now();
        let mut req = hull_proto::agent::CreateSandboxRequest::new();
        req.sandbox_id = spec.id.into();
        req.hostname = spec.hostname.into();
        req.sysctls = spec.sysctls.clone();
        // The VM's own clock and RNG (a restored VM has those of its snapshot).
        req.wall_clock_ns = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
        req.entropy = host_entropy();
        if let Some(net) = net {
            // The VMM has its own copy of the tap now; ours would keep it alive after the VMM.
            drop(net.tap);
            req.interfaces.push(net.interface);
            req.routes = net.routes;
        }
        conn.create_sandbox(&req).await?;
        tracing::info!(sandbox_id = %spec.id, agent_wait_ms = (answered - waited).as_millis() as u64, create_sandbox_ms = answered.elapsed().as_millis() as u64, "sandbox created in the pod VM");
        Ok(conn)
    }

    /// Whether the VM has exited (the VMM died or the guest powered off), and how.
    pub fn exited(&self) -> Option<String> {
        self.vm.exited().map(|s| s.to_string())
    }

    /// How many of the pod's host processes the kernel's OOM killer killed because the pod's
    /// cgroup hit its memory limit (None: the pod has no cgroup, or no counter).
    pub fn oom_kills(&self) -> Option<u64> {
        self.cgroup.lock().unwrap_or_else(|p| p.into_inner()).as_ref().and_then(|c| c.oom_kills())
    }

    /// Whether the pod is being destroyed (its VM's exit is then no failure).
    pub fn ending(&self) -> bool {
        self.ending.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until the VM has exited; says how (None: its exit could not be waited for).
    pub async fn ended(&self) -> Option<String> {
        self.vm.ended().await.map(|s| s.to_string())
    }

    /// Ends the VM: DestroySandbox, then the VM is killed; the share and state directory go.
    /// An agent that answers has removed its containers and synced the guest's filesystems,
    /// so nothing is left that the guest's own power-off would save, and waiting for it costs
    /// every pod's end about half a second under TCG. An agent that does not answer (it
    /// powered off first, or never will) gets `power_off` for the VM to exit. Says whether
    /// the guest ended in order: it answered, or powered off by itself.
    pub async fn destroy(&self, power_off: Duration) -> bool {
        self.ending.store(true, std::sync::atomic::Ordering::SeqCst);
        *self.destroyed.get_or_init(|| self.destroy_once(power_off)).await
    }

    async fn destroy_once(&self, power_off: Duration) -> bool {
        let started = Instant::now();
        // The agent may power off before its reply leaves: the VM's exit answers too.
        let answered = tokio::select! {
            reply = tokio::time::timeout(Duration::from_secs(3), self.conn.destroy_sandbox(1)) => match reply {
                Ok(Ok(())) => true,
                Ok(Err(e)) => {
                    tracing::warn!(sandbox_id = %self.id, error = %e, "DestroySandbox failed");
                    false
                }
                Err(_) => false,
            },
            _ = self.vm.wait_exit(Duration::from_secs(3)) => false,
        };
        let in_order = answered || self.vm.wait_exit(power_off).await.is_some();
        if !in_order {
            tracing::warn!(sandbox_id = %self.id, "the pod VM did not answer DestroySandbox and did not power off; killing it");
        }
        drop(self.forwarder.lock().unwrap_or_else(|p| p.into_inner()).take());
        self.vm.kill().await;
        if let Some(mut c) = self.cgroup.lock().unwrap_or_else(|p| p.into_inner()).take() {
            c.leave();
        }
        if self.keep_console {
            let (kept, vmm_log) = (self.dir.kept_console(), self.dir.kept_vmm_log());
            let _ = std::fs::copy(self.dir.vm().console(), &kept);
            let _ = std::fs::copy(self.vm.vmm_log(), &vmm_log);
            tracing::info!(sandbox_id = %self.id, console = ?kept, vmm_log = ?vmm_log, "guest console and VMM log kept");
        }
        remove_state(&self.dir);
        tracing::info!(sandbox_id = %self.id, took_ms = started.elapsed().as_millis() as u64, answered, "pod VM destroyed");
        in_order
    }
}

/// What `containerd-shim-hull-v2 delete` does after a shim died: ends the pod's processes
/// (from its pid file; nothing reaps them any more) and removes its state.
pub fn cleanup_pod(dir: &PodDir) {
    let ours = || dir.pids().into_iter().filter(|&pid| pid > 1 && is_ours(pid)).collect::<Vec<_>>();
    // Jailed processes first: their waiters (the pids recorded) exit once they have reaped
    // them, holding the pod's uid lease until then (see `jail::kill_jailed`).
    let mut waited = false;
    for pid in ours() {
        waited |= crate::hypervisor::jail::kill_jailed(pid);
    }
    for _ in 0..if waited { 100 } else { 0 } {
        if ours().is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    for pid in ours() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
    }
    if let Some(path) = dir.cgroup() {
        // The killed processes leave the cgroup as they are reaped; give them a moment.
        for _ in 0..20 {
            if dir.pids().iter().all(|&pid| !is_ours(pid)) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        cgroup::remove(&path);
    }
    remove_state(dir);
}

/// Removes the pod's tap and filters, unmounts its share and removes its state directory.
/// Its processes are gone already.
fn remove_state(dir: &PodDir) {
    if let Some(ns) = dir.netns() {
        forward::remove_redirect(&ns);
        if let Err(e) = network::teardown(&ns) {
            tracing::warn!(netns = ?ns, error = %e, "cannot remove the pod's tap and filters");
        }
    }
    share::umount_tree(dir.path());
    share::remove_tree(dir.path());
}

/// The pod VM's vsock CID: its own, at random (CIDs 0-2 are the hypervisor's, the loopback's
/// and the host's; u32::MAX is "any"). The vsock is private to the VM either way (hybrid
/// vsock); a CID of its own means a VM restored from a snapshot does not keep the template's.
fn pod_cid() -> u64 {
    let bytes = host_entropy();
    let r = bytes.get(..4).map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]])).unwrap_or(0);
    3 + u64::from(r % (u32::MAX - 3))
}

/// 32 bytes from the host's RNG for the guest's (getrandom never fails for so few once the
/// host's RNG is up; an empty answer leaves the guest's RNG as it is).
fn host_entropy() -> Vec<u8> {
    let mut buf = vec![0u8; 32];
    // SAFETY: getrandom writes at most buf.len() bytes into buf, which we own.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n != buf.len() as isize {
        tracing::warn!("the host's RNG gave no entropy for the guest");
        return Vec::new();
    }
    buf
}

/// A pid from the file is only killed if it still is QEMU or hull-vmm (pids get reused).
fn is_ours(pid: u32) -> bool {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    // A zombie (state Z, after the comm in parentheses) is gone already, only not yet reaped.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
    (comm.starts_with("qemu") || comm.starts_with("hull-vmm")) && !zombie
}
