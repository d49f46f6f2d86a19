//! QEMU: hull's vsock and fs devices run as vhost-user backends (`hull-vmm vhost-user
//! vsock|fs`), which QEMU drives with `vhost-user-vsock-pci` and `vhost-user-fs-pci`; the
//! pod's tap goes to QEMU's virtio-net. KVM where the CPU allows, else TCG.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::process::Command;

use super::{exists, pass_tap, Accel, HypervisorError, Launched, Logs, VmDir, VmSpec, Watched, TAP_FD};

pub struct Qemu {
    pub qemu: PathBuf,
    /// hull-vmm, which serves the vsock and fs devices.
    pub vmm: PathBuf,
    pub accel: Accel,
}

impl Qemu {
    /// Starts one `hull-vmm vhost-user ...` backend whose messages go to `log` in the VM
    /// directory, and waits until it serves its vhost-user socket.
    async fn start_backend(&self, spec: &VmSpec, dir: &VmDir, what: &'static str, args: &[&OsStr], socket: &Path, log: &str) -> Result<Watched, HypervisorError> {
        let _ = std::fs::remove_file(socket);
        let mut cmd = Command::new(&self.vmm);
        cmd.args(["--log-level", "warn", "--open-files", &spec.open_files.to_string(), "vhost-user"]).args(args);
        let backend = Watched::spawn(&mut cmd, what, &Logs { dir, stdout: None, stderr: log, cap: spec.log_cap })?;
        // The backend creates its socket when it listens (owner-only from the start, see
        // hull_proto::host_socket); nothing announces it otherwise.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !socket.exists() {
            if let Some(status) = backend.exited() {
                let log = std::fs::read_to_string(dir.file(log)).unwrap_or_default();
                return Err(HypervisorError::BackendExited { what, status: status.to_string(), log: log.trim().into() });
            }
            if Instant::now() > deadline {
                backend.kill().await;
                return Err(HypervisorError::BackendTimeout(socket.into()));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(backend)
    }

    async fn start_backends(&self, spec: &VmSpec, dir: &VmDir) -> Result<Vec<Watched>, HypervisorError> {
        let vu = dir.file("vhost-vsock.sock");
        let uds = dir.vsock();
        let cid = spec.guest_cid.to_string();
        let vsock_args = ["vsock".as_ref(), "--socket".as_ref(), vu.as_os_str(), "--uds".as_ref(), uds.as_os_str(), "--guest-cid".as_ref(), cid.as_ref()];
        let mut backends = vec![self.start_backend(spec, dir, "hull-vmm vhost-user vsock", &vsock_args, &vu, "vhost-user-vsock.log").await?];
        if let Some(share) = &spec.share {
            let fs_sock = dir.file("vhost-fs.sock");
            let args = ["fs".as_ref(), "--socket".as_ref(), fs_sock.as_os_str(), "--shared-dir".as_ref(), share.dir.as_os_str(), "--tag".as_ref(), share.tag.as_ref()];
            match self.start_backend(spec, dir, "hull-vmm vhost-user fs", &args, &fs_sock, "vhost-user-fs.log").await {
                Ok(b) => backends.push(b),
                Err(e) => {
                    for b in &backends {
                        b.kill().await;
                    }
                    return Err(e);
                }
            }
        }
        Ok(backends)
    }

    fn command(&self, spec: &VmSpec, dir: &VmDir) -> Command {
        let mem = spec.memory_mib;
        let mut cmdline: Vec<String> = ["console=ttyS0", "panic=-1", "reboot=k", "loglevel=4"].into_iter().map(String::from).collect();
        cmdline.extend(spec.cmdline_extra.iter().cloned());
        let accel_name = match self.accel {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        };
        let mut cmd = Command::new(&self.qemu);
        cmd.args(["-machine", &format!("pc,accel={accel_name},memory-backend=mem")])
            .args(["-cpu", if self.accel == Accel::Kvm { "host" } else { "max" }])
            .args(["-smp", &spec.vcpus.to_string(), "-m", &format!("{mem}M")])
            // vhost-user needs guest memory the backends can map.
            .args(["-object", &format!("memory-backend-memfd,id=mem,size={mem}M,share=on")])
            .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
            // QEMU's own seccomp filter on every thread (with no_new_privs): no obsolete system
            // calls, no setuid and friends, no fork or exec, no scheduler or resource changes.
            .args(["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"])
            // The console on stdout: the runtime caps what it keeps of it (see `log`).
            .args(["-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console"])
            .arg("-kernel")
            .arg(&spec.kernel)
            .arg("-initrd")
            .arg(&spec.initramfs)
            .args(["-append", &cmdline.join(" ")])
            .args(["-chardev", &format!("socket,id=vsock0,path={}", dir.file("vhost-vsock.sock").display())])
            .args(["-device", "vhost-user-vsock-pci,chardev=vsock0"]);
        if let Some(share) = &spec.share {
            cmd.args(["-chardev", &format!("socket,id=fs0,path={}", dir.file("vhost-fs.sock").display())])
                .args(["-device", &format!("vhost-user-fs-pci,chardev=fs0,tag={}", share.tag)]);
        }
        if let Some(nic) = &spec.nic {
            // romfile=: no PXE option ROM; the guest boots from -kernel.
            cmd.args(["-netdev", &format!("tap,id=net0,fd={TAP_FD}")])
                .args(["-device", &format!("virtio-net-pci,netdev=net0,mac={},romfile=", nic.mac)]);
            pass_tap(&mut cmd, nic.tap_fd);
        }
        cmd.args(&spec.vmm_extra);
        cmd
    }
}

#[async_trait::async_trait]
impl super::Hypervisor for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    async fn prepare(&self, spec: &VmSpec, dir: &VmDir) -> Result<Launched, HypervisorError> {
        exists("hull-vmm", &self.vmm)?;
        let backends = self.start_backends(spec, dir).await?;
        Ok(Launched { vmm: self.command(spec, dir), vmm_log: "qemu.log", backends })
    }
}
