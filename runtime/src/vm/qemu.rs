//! A pod VM's processes. Under QEMU, hull's vsock and fs devices run as vhost-user backends
//! (`hull-vmm vhost-user vsock|fs`), QEMU drives them with `vhost-user-vsock-pci` and
//! `vhost-user-fs-pci`; under the builtin engine one `hull-vmm boot` process is the whole VM
//! (`super::builtin`). Either way the host reaches the guest agent through a hybrid vsock
//! socket, and the rest of hull sees one `QemuVm` with one VMM pid.

use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Accel, Engine};
use crate::agent_client::AgentConn;

#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("{what} {path:?} does not exist.")]
    Missing { what: &'static str, path: PathBuf },
    #[error("Cannot start {what}: {source}.")]
    Spawn { what: &'static str, source: std::io::Error },
    #[error("{what} exited with {status} before it was ready: {log}")]
    BackendExited { what: &'static str, status: String, log: String },
    #[error("A device backend did not create {0:?} within 5 s.")]
    BackendTimeout(PathBuf),
    #[error("The VMM exited with {status} before the agent answered; console: {console}")]
    QemuExited { status: String, console: String },
    #[error("The guest agent did not answer within {secs} s; console: {console}")]
    AgentTimeout { secs: u64, console: String },
}

#[derive(Debug, Clone)]
pub struct QemuConfig {
    pub qemu: PathBuf,
    /// hull-vmm, which serves the vsock device.
    pub vmm: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub engine: Engine,
    pub guest_cid: u64,
    /// Sockets, console log.
    pub workdir: PathBuf,
    /// Extra kernel command line words.
    pub cmdline_extra: Vec<String>,
    /// Extra QEMU arguments (disks, for instance).
    pub qemu_extra: Vec<String>,
    /// A host directory shared through hull's virtio-fs backend under the tag `FS_TAG`.
    pub shared_dir: Option<PathBuf>,
    /// The pod's network: a tap QEMU's virtio-net drives.
    pub nic: Option<Nic>,
}

/// A virtio-net NIC backed by a tap the caller opened (in the pod's network namespace, which
/// QEMU is not in, so QEMU cannot open it by name). The caller keeps `tap_fd` open until
/// `QemuVm::start` returns; QEMU inherits its own copy.
#[derive(Debug, Clone)]
pub struct Nic {
    pub tap_fd: RawFd,
    /// The guest NIC's MAC address ("aa:bb:cc:dd:ee:ff").
    pub mac: String,
}

/// The descriptor number the VMM (QEMU or hull-vmm) finds the tap at.
pub const TAP_FD: RawFd = 3;

/// Makes the child of `cmd` find `fd` (the caller's tap) at TAP_FD.
pub fn pass_tap(cmd: &mut Command, fd: RawFd) {
    // SAFETY: the closure runs in the forked child before exec and calls only dup2 and
    // fcntl, which are async-signal-safe; it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself would keep FD_CLOEXEC: clear it instead.
            let r = if fd == TAP_FD { libc::fcntl(fd, libc::F_SETFD, 0) } else { libc::dup2(fd, TAP_FD) };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The virtio-fs tag of a VM's shared directory.
pub const FS_TAG: &str = "hull";

/// The agent storage that mounts the VM's shared directory at `mount_point` in the guest.
pub fn share_storage(mount_point: &str) -> hull_proto::agent::Storage {
    let mut s = hull_proto::agent::Storage::new();
    s.source = FS_TAG.into();
    s.fstype = "virtiofs".into();
    s.mount_point = mount_point.into();
    s
}

/// A log file in `dir` as stdout and stderr of a child: the VMM's and QEMU's own messages go
/// beside the console, not to the terminal of whoever runs the container.
fn log_files(dir: &Path, name: &str) -> Result<(Stdio, Stdio), QemuError> {
    let f = std::fs::File::create(dir.join(name)).map_err(|source| QemuError::Spawn { what: "a log file", source })?;
    let g = f.try_clone().map_err(|source| QemuError::Spawn { what: "a log file", source })?;
    Ok((Stdio::from(f), Stdio::from(g)))
}

pub struct QemuVm {
    pub config: QemuConfig,
    /// The vhost-user backends: vsock first, then fs if a directory is shared.
    backends: Vec<Child>,
    /// QEMU, or `hull-vmm boot` under the builtin engine.
    qemu: Child,
    pub vsock_uds: PathBuf,
    pub console: PathBuf,
    /// The VMM process's own log in the workdir.
    vmm_log: &'static str,
}

fn exists(what: &'static str, p: &Path) -> Result<(), QemuError> {
    if p.exists() { Ok(()) } else { Err(QemuError::Missing { what, path: p.into() }) }
}

/// Kills and reaps children started so far when a later step fails.
fn reap(children: &mut [Child]) {
    for c in children.iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl QemuVm {
    /// Starts one `hull-vmm vhost-user ...` backend whose messages go to `log` in the workdir,
    /// and waits for its vhost-user socket.
    fn start_backend(config: &QemuConfig, what: &'static str, args: &[&std::ffi::OsStr], socket: &Path, log: &str) -> Result<Child, QemuError> {
        let _ = std::fs::remove_file(socket);
        let (out, err) = log_files(&config.workdir, log)?;
        let mut child = Command::new(&config.vmm)
            .args(["--log-level", "warn", "vhost-user"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|source| QemuError::Spawn { what, source })?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !socket.exists() {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(config.workdir.join(log)).unwrap_or_default();
                return Err(QemuError::BackendExited { what, status: status.to_string(), log: log.trim().into() });
            }
            if Instant::now() > deadline {
                reap(std::slice::from_mut(&mut child));
                return Err(QemuError::BackendTimeout(socket.into()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(child)
    }

    pub fn start(config: QemuConfig) -> Result<QemuVm, QemuError> {
        exists("The guest kernel", &config.kernel)?;
        exists("The guest initramfs", &config.initramfs)?;
        exists("hull-vmm", &config.vmm)?;
        if let Some(dir) = &config.shared_dir {
            exists("The shared directory", dir)?;
        }
        let vu = config.workdir.join("vhost-vsock.sock");
        let fs_sock = config.workdir.join("vhost-fs.sock");
        let uds = config.workdir.join("vsock.sock");
        let console = config.workdir.join("console.log");
        let accel = match config.engine {
            Engine::Qemu(accel) => accel,
            Engine::Builtin => return Self::start_builtin(config, uds, console),
        };
        let cid = config.guest_cid.to_string();
        let vsock_args = [
            "vsock".as_ref(),
            "--socket".as_ref(),
            vu.as_os_str(),
            "--uds".as_ref(),
            uds.as_os_str(),
            "--guest-cid".as_ref(),
            cid.as_ref(),
        ];
        let mut backends = vec![Self::start_backend(&config, "hull-vmm vhost-user vsock", &vsock_args, &vu, "vhost-user-vsock.log")?];
        if let Some(dir) = &config.shared_dir {
            let args = ["fs".as_ref(), "--socket".as_ref(), fs_sock.as_os_str(), "--shared-dir".as_ref(), dir.as_os_str(), "--tag".as_ref(), FS_TAG.as_ref()];
            match Self::start_backend(&config, "hull-vmm vhost-user fs", &args, &fs_sock, "vhost-user-fs.log") {
                Ok(c) => backends.push(c),
                Err(e) => {
                    reap(&mut backends);
                    return Err(e);
                }
            }
        }
        let mem = config.memory_mib;
        let mut cmdline = vec!["console=ttyS0", "panic=-1", "reboot=k", "loglevel=4"]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>();
        cmdline.extend(config.cmdline_extra.iter().cloned());
        let accel_name = match accel {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        };
        let (qout, qerr) = match log_files(&config.workdir, "qemu.log") {
            Ok(l) => l,
            Err(e) => {
                reap(&mut backends);
                return Err(e);
            }
        };
        let mut cmd = Command::new(&config.qemu);
        cmd.args(["-machine", &format!("pc,accel={accel_name},memory-backend=mem")])
            .args(["-cpu", if accel == Accel::Kvm { "host" } else { "max" }])
            .args(["-smp", &config.vcpus.to_string(), "-m", &format!("{mem}M")])
            // vhost-user needs guest memory the backends can map.
            .args(["-object", &format!("memory-backend-memfd,id=mem,size={mem}M,share=on")])
            .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
            .args(["-serial", &format!("file:{}", console.display())])
            .arg("-kernel")
            .arg(&config.kernel)
            .arg("-initrd")
            .arg(&config.initramfs)
            .args(["-append", &cmdline.join(" ")])
            .args(["-chardev", &format!("socket,id=vsock0,path={}", vu.display())])
            .args(["-device", "vhost-user-vsock-pci,chardev=vsock0"]);
        if config.shared_dir.is_some() {
            cmd.args(["-chardev", &format!("socket,id=fs0,path={}", fs_sock.display())])
                .args(["-device", &format!("vhost-user-fs-pci,chardev=fs0,tag={FS_TAG}")]);
        }
        if let Some(nic) = &config.nic {
            // romfile=: no PXE option ROM; the guest boots from -kernel.
            cmd.args(["-netdev", &format!("tap,id=net0,fd={TAP_FD}")])
                .args(["-device", &format!("virtio-net-pci,netdev=net0,mac={},romfile=", nic.mac)]);
            pass_tap(&mut cmd, nic.tap_fd);
        }
        let qemu = cmd.args(&config.qemu_extra).stdin(Stdio::null()).stdout(qout).stderr(qerr).spawn();
        let qemu = match qemu {
            Ok(q) => q,
            Err(source) => {
                reap(&mut backends);
                return Err(QemuError::Spawn { what: "qemu", source });
            }
        };
        Ok(QemuVm { config, backends, qemu, vsock_uds: uds, console, vmm_log: "qemu.log" })
    }

    fn start_builtin(mut config: QemuConfig, uds: PathBuf, console: PathBuf) -> Result<QemuVm, QemuError> {
        if config.vcpus > 1 && hull_vmm::builder::host_kvm_is_pvm() {
            // Measured: a second vCPU never comes up under kvm_pvm (the boot stalls before the
            // console); a pod that boots slowly beats one that does not boot.
            tracing::warn!(vcpus = config.vcpus, "kvm_pvm host: the builtin VM gets one vCPU");
            config.vcpus = 1;
        }
        let _ = std::fs::remove_file(&uds);
        let (out, err) = log_files(&config.workdir, "hull-vmm.log")?;
        let vmm = super::builtin::command(&config, &uds, &console)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|source| QemuError::Spawn { what: "hull-vmm boot", source })?;
        Ok(QemuVm { config, backends: Vec::new(), qemu: vmm, vsock_uds: uds, console, vmm_log: "hull-vmm.log" })
    }

    pub fn console_text(&self) -> String {
        let text = std::fs::read_to_string(&self.console).unwrap_or_default();
        // The end of the console says why a boot failed.
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// Waits until the agent answers Check over vsock; returns a connection to it.
    pub async fn wait_for_agent(&mut self, timeout: Duration) -> Result<AgentConn, QemuError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.qemu.try_wait() {
                let qemu_log = std::fs::read_to_string(self.config.workdir.join(self.vmm_log)).unwrap_or_default();
                let console = format!("{}\n{}", qemu_log.trim_end(), self.console_text());
                return Err(QemuError::QemuExited { status: status.to_string(), console });
            }
            if let Ok(conn) = AgentConn::connect_hybrid_vsock(&self.vsock_uds).await {
                if conn.check().await.unwrap_or(false) {
                    return Ok(conn);
                }
            }
            if Instant::now() > deadline {
                return Err(QemuError::AgentTimeout { secs: timeout.as_secs(), console: self.console_text() });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for QEMU to exit on its own (the guest powered off).
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.qemu.try_wait() {
                return Some(s);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// How each backend (vsock first, then fs) has exited, if it has.
    pub fn backends_exited(&mut self) -> Vec<Option<std::process::ExitStatus>> {
        self.backends.iter_mut().map(|c| c.try_wait().ok().flatten()).collect()
    }

    /// QEMU's exit status, if it has exited.
    pub fn qemu_exited(&mut self) -> Option<std::process::ExitStatus> {
        self.qemu.try_wait().ok().flatten()
    }

    /// Kills QEMU and the backends and reaps them.
    pub fn kill(&mut self) {
        for child in std::iter::once(&mut self.qemu).chain(self.backends.iter_mut()) {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }

    pub fn qemu_pid(&self) -> u32 {
        self.qemu.id()
    }

    /// Every backend's pid (vsock first).
    pub fn backend_pids(&self) -> Vec<u32> {
        self.backends.iter().map(Child::id).collect()
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        self.kill();
    }
}
