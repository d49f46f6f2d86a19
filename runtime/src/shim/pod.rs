//! A pod's microVM as the shim sees it: the VM (QEMU + hull's device backends), the agent
//! connection, the virtio-fs share where containers' rootfs appear, and the state directory
//! that lets `containerd-shim-hull-v2 delete` clean up after a shim that died.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::agent_client::{ctx, AgentConn, ClientError};
use crate::config::Config;
use crate::network::{self, NetworkError, PodNetwork};
use crate::vm::qemu::{Nic, QemuConfig, QemuError, QemuVm};
use crate::vm::{choose_engine, Engine};

/// Where the guest mounts the pod's share: each container mounts it at
/// `GUEST_SHARE/<container>` and finds its rootfs at `<that>/<container>/rootfs`.
pub const GUEST_SHARE: &str = "/run/hull/share";

#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("The builtin hypervisor cannot boot this pod: {0}. Set hypervisor = \"qemu\" or \"auto\".")]
    Builtin(String),
    #[error("Cannot prepare the pod's state directory {path:?}: {source}.")]
    StateDir { path: PathBuf, source: std::io::Error },
    #[error("The pod VM did not boot: {0}")]
    Boot(#[from] QemuError),
    #[error("The pod's agent refused the sandbox: {0}")]
    Agent(#[from] ClientError),
    #[error("The pod's network cannot reach its VM: {0}")]
    Network(#[from] NetworkError),
}

/// The file in a pod's state directory naming its network namespace, so that a `delete`
/// after a killed shim can remove the tap and filters too.
const NETNS_FILE: &str = "netns";

pub struct PodVm {
    pub id: String,
    pub dir: PathBuf,
    /// The host side of the virtio-fs share.
    pub shared: PathBuf,
    pub conn: Arc<AgentConn>,
    pub vmm_pid: u32,
    /// debug_console: keep the console log beside the state directory when the pod ends.
    keep_console: bool,
    vm: tokio::sync::Mutex<QemuVm>,
}

fn state_err(path: &Path) -> impl FnOnce(std::io::Error) -> PodError + '_ {
    move |source| PodError::StateDir { path: path.into(), source }
}

impl PodVm {
    /// Boots the pod's VM and creates the sandbox in its agent. On failure nothing is left:
    /// QemuVm's drop ends the processes and the state directory is removed.
    /// `netns` is the pod's network namespace (CRI's, from the sandbox spec); its interface is
    /// carried into the VM.
    pub async fn boot(config: &Config, dir: PathBuf, id: &str, hostname: &str, netns: Option<&Path>) -> Result<PodVm, PodError> {
        let (engine, why) = choose_engine(config.hypervisor).map_err(PodError::Builtin)?;
        tracing::info!(sandbox_id = %id, hypervisor = ?config.hypervisor, engine = ?engine, why = %why, vcpus = config.vcpus, memory_mib = config.memory_mib, "booting the pod VM");
        let result = Self::boot_vm(config, &dir, id, hostname, netns, engine).await;
        if result.is_err() {
            cleanup_pod(&dir);
        }
        result
    }

    async fn boot_vm(config: &Config, dir: &Path, id: &str, hostname: &str, netns: Option<&Path>, engine: Engine) -> Result<PodVm, PodError> {
        let shared = dir.join("shared");
        let work = dir.join("vm");
        for d in [&shared, &work] {
            std::fs::create_dir_all(d).map_err(state_err(d))?;
        }
        let started = Instant::now();
        let net: Option<PodNetwork> = match netns {
            Some(ns) => {
                // Recorded first: whatever setup leaves, cleanup_pod can find.
                let f = dir.join(NETNS_FILE);
                std::fs::write(&f, ns.as_os_str().as_encoded_bytes()).map_err(state_err(&f))?;
                let ns = ns.to_path_buf();
                tokio::task::spawn_blocking(move || network::setup(&ns))
                    .await
                    .map_err(|e| NetworkError::Netlink(e.to_string()))??
            }
            None => None,
        };
        let mut vm = QemuVm::start(QemuConfig {
            qemu: config.qemu.clone(),
            vmm: config.vmm.clone(),
            kernel: config.kernel.clone(),
            initramfs: config.initramfs.clone(),
            vcpus: config.vcpus,
            memory_mib: config.memory_mib,
            engine,
            guest_cid: 3,
            workdir: work,
            cmdline_extra: if config.debug_console { vec!["loglevel=7".into()] } else { vec![] },
            qemu_extra: vec![],
            shared_dir: Some(shared.clone()),
            nic: net.as_ref().map(|n| Nic { tap_fd: n.tap.as_raw_fd(), mac: n.mac.clone() }),
        })?;
        // Recorded before the wait: a shim killed mid-boot still leaves pids `delete` can end.
        let mut pids = vec![vm.qemu_pid()];
        pids.extend(vm.backend_pids());
        let pid_file = dir.join("pids");
        let text: Vec<String> = pids.iter().map(u32::to_string).collect();
        std::fs::write(&pid_file, text.join("\n")).map_err(state_err(&pid_file))?;
        let conn = vm.wait_for_agent(Duration::from_secs(config.boot_timeout_secs)).await?;
        let mut req = hull_proto::agent::CreateSandboxRequest::new();
        req.sandbox_id = id.into();
        req.hostname = hostname.into();
        if let Some(net) = net {
            // QEMU has its own copy of the tap now; ours would keep it alive after QEMU.
            drop(net.tap);
            req.interfaces.push(net.interface);
            req.routes = net.routes;
        }
        conn.client.create_sandbox(ctx(), &req).await.map_err(|e| ClientError::rpc("CreateSandbox", e))?;
        tracing::info!(sandbox_id = %id, ready_ms = started.elapsed().as_millis() as u64, "pod VM ready");
        Ok(PodVm { id: id.into(), dir: dir.into(), shared, conn: Arc::new(conn), vmm_pid: vm.qemu_pid(), keep_console: config.debug_console, vm: tokio::sync::Mutex::new(vm) })
    }

    /// Whether the VM has exited (QEMU died or the guest powered off).
    pub async fn exited(&self) -> Option<String> {
        self.vm.lock().await.qemu_exited().map(|s| s.to_string())
    }

    /// Ends the VM: DestroySandbox (the guest powers off), then whatever is left is killed;
    /// the share and state directory go.
    pub async fn destroy(&self) {
        let started = Instant::now();
        let mut req = hull_proto::agent::DestroySandboxRequest::new();
        req.timeout_secs = 1;
        // The agent may power off before its reply leaves: do not wait for the reply, wait
        // for the VM to exit.
        let conn = self.conn.clone();
        let ask = tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(3), conn.client.destroy_sandbox(ctx(), &req)).await;
        });
        let mut vm = self.vm.lock().await;
        if vm.wait_exit(Duration::from_secs(10)).await.is_none() {
            tracing::warn!(sandbox_id = %self.id, "the pod VM did not power off; killing it");
        }
        ask.abort();
        vm.kill();
        drop(vm);
        if self.keep_console {
            let kept = self.dir.with_extension("console.log");
            let _ = std::fs::copy(self.dir.join("vm/console.log"), &kept);
            tracing::info!(sandbox_id = %self.id, console = ?kept, "guest console kept");
        }
        cleanup_pod(&self.dir);
        tracing::info!(sandbox_id = %self.id, took_ms = started.elapsed().as_millis() as u64, "pod VM destroyed");
    }
}

/// Unmounts everything at or below `path`, deepest first (containerd-shim's helper).
pub fn umount_tree(path: &Path) {
    if let Err(e) = containerd_shim::mount::umount_recursive(path.to_str(), libc::MNT_DETACH) {
        tracing::warn!(path = ?path, error = %e, "cannot unmount");
    }
}

/// Undoes one container's host mounts: its rootfs in the bundle and its part of the share.
pub fn cleanup_container(pod_dir: &Path, bundle: &Path, id: &str) {
    let share = pod_dir.join("shared").join(id);
    umount_tree(&share);
    let _ = std::fs::remove_dir_all(&share);
    umount_tree(&bundle.join("rootfs"));
}

/// Ends a pod's processes (from its pid file) and removes its state directory.
pub fn cleanup_pod(dir: &Path) {
    if let Ok(text) = std::fs::read_to_string(dir.join("pids")) {
        for pid in text.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            if pid > 1 && is_ours(pid) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
    if let Ok(ns) = std::fs::read_to_string(dir.join(NETNS_FILE)) {
        if let Err(e) = network::teardown(Path::new(ns.trim())) {
            tracing::warn!(netns = %ns, error = %e, "cannot remove the pod's tap and filters");
        }
    }
    umount_tree(&dir.join("shared"));
    let _ = std::fs::remove_dir_all(dir);
}

/// A pid from the file is only killed if it still is QEMU or hull-vmm (pids get reused).
fn is_ours(pid: i32) -> bool {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    comm.starts_with("qemu") || comm.starts_with("hull-vmm")
}
