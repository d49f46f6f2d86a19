//! A pod VM under QEMU: hull's vsock device runs as a vhost-user backend (`hull-vmm vhost-user
//! vsock`), QEMU drives it with `vhost-user-vsock-pci`, and the host reaches the guest agent
//! through the backend's hybrid vsock socket.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::Accel;
use crate::agent_client::AgentConn;

#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("{what} {path:?} does not exist.")]
    Missing { what: &'static str, path: PathBuf },
    #[error("Cannot start {what}: {source}.")]
    Spawn { what: &'static str, source: std::io::Error },
    #[error("The vsock backend did not create {0:?} within 5 s.")]
    BackendTimeout(PathBuf),
    #[error("QEMU exited with {status} before the agent answered; console: {console}")]
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
    pub accel: Accel,
    pub guest_cid: u64,
    /// Sockets, console log.
    pub workdir: PathBuf,
    /// Extra kernel command line words.
    pub cmdline_extra: Vec<String>,
    /// Extra QEMU arguments (disks, for instance).
    pub qemu_extra: Vec<String>,
}

pub struct QemuVm {
    pub config: QemuConfig,
    backend: Child,
    qemu: Child,
    pub vsock_uds: PathBuf,
    pub console: PathBuf,
}

fn exists(what: &'static str, p: &Path) -> Result<(), QemuError> {
    if p.exists() { Ok(()) } else { Err(QemuError::Missing { what, path: p.into() }) }
}

impl QemuVm {
    pub fn start(config: QemuConfig) -> Result<QemuVm, QemuError> {
        exists("The guest kernel", &config.kernel)?;
        exists("The guest initramfs", &config.initramfs)?;
        exists("hull-vmm", &config.vmm)?;
        let vu = config.workdir.join("vhost-vsock.sock");
        let uds = config.workdir.join("vsock.sock");
        let console = config.workdir.join("console.log");
        let _ = std::fs::remove_file(&vu);
        // The VMM's and QEMU's own messages go to files beside the console, not to the
        // terminal of whoever runs the container (its stdout/stderr are the container's).
        let log = |name: &str| -> Result<(Stdio, Stdio), QemuError> {
            let f = std::fs::File::create(config.workdir.join(name))
                .map_err(|source| QemuError::Spawn { what: "a log file", source })?;
            let g = f.try_clone().map_err(|source| QemuError::Spawn { what: "a log file", source })?;
            Ok((Stdio::from(f), Stdio::from(g)))
        };
        let (vout, verr) = log("vhost-user-vsock.log")?;
        let mut backend = Command::new(&config.vmm)
            .args(["--log-level", "warn", "vhost-user", "vsock", "--socket"])
            .arg(&vu)
            .arg("--uds")
            .arg(&uds)
            .arg("--guest-cid")
            .arg(config.guest_cid.to_string())
            .stdin(Stdio::null())
            .stdout(vout)
            .stderr(verr)
            .spawn()
            .map_err(|source| QemuError::Spawn { what: "hull-vmm vhost-user vsock", source })?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !vu.exists() {
            if Instant::now() > deadline {
                let _ = backend.kill();
                let _ = backend.wait();
                return Err(QemuError::BackendTimeout(vu));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let mem = config.memory_mib;
        let mut cmdline = vec!["console=ttyS0", "panic=-1", "reboot=k", "loglevel=4"]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>();
        cmdline.extend(config.cmdline_extra.iter().cloned());
        let accel = match config.accel {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        };
        let (qout, qerr) = match log("qemu.log") {
            Ok(l) => l,
            Err(e) => {
                let _ = backend.kill();
                let _ = backend.wait();
                return Err(e);
            }
        };
        let qemu = Command::new(&config.qemu)
            .args(["-machine", &format!("pc,accel={accel},memory-backend=mem")])
            .args(["-cpu", if config.accel == Accel::Kvm { "host" } else { "max" }])
            .args(["-smp", &config.vcpus.to_string(), "-m", &format!("{mem}M")])
            // vhost-user needs guest memory the backend can map.
            .args(["-object", &format!("memory-backend-memfd,id=mem,size={mem}M,share=on")])
            .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
            .args(["-serial", &format!("file:{}", console.display())])
            .arg("-kernel")
            .arg(&config.kernel)
            .arg("-initrd")
            .arg(&config.initramfs)
            .args(["-append", &cmdline.join(" ")])
            .args(["-chardev", &format!("socket,id=vsock0,path={}", vu.display())])
            .args(["-device", "vhost-user-vsock-pci,chardev=vsock0"])
            .args(&config.qemu_extra)
            .stdin(Stdio::null())
            .stdout(qout)
            .stderr(qerr)
            .spawn();
        let qemu = match qemu {
            Ok(q) => q,
            Err(source) => {
                let _ = backend.kill();
                let _ = backend.wait();
                return Err(QemuError::Spawn { what: "qemu", source });
            }
        };
        Ok(QemuVm { config, backend, qemu, vsock_uds: uds, console })
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
                let qemu_log = std::fs::read_to_string(self.config.workdir.join("qemu.log")).unwrap_or_default();
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

    /// Whether the vsock backend is still running.
    pub fn backend_exited(&mut self) -> Option<std::process::ExitStatus> {
        self.backend.try_wait().ok().flatten()
    }

    pub fn qemu_pid(&self) -> u32 {
        self.qemu.id()
    }

    pub fn backend_pid(&self) -> u32 {
        self.backend.id()
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        for child in [&mut self.qemu, &mut self.backend] {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}
