//! QEMU: hull's vsock and fs devices run as vhost-user backends (`hull-vmm vhost-user
//! vsock|fs`), which QEMU drives with `vhost-user-vsock-pci` and `vhost-user-fs-pci`; the
//! pod's tap goes to QEMU's virtio-net. KVM where the CPU allows, else TCG.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::process::Command;

use super::jail::{Needs, Placement};
use super::{exists, pass_tap, Accel, HypervisorError, Launched, Logs, VmDir, VmSpec, Watched, TAP_FD};

pub struct Qemu {
    pub qemu: PathBuf,
    /// hull-vmm, which serves the vsock and fs devices.
    pub vmm: PathBuf,
    pub accel: Accel,
}

impl Qemu {
    /// Starts one `hull-vmm vhost-user ...` backend whose messages go to `log` in the VM
    /// directory, and waits until it serves its vhost-user socket `socket` (in the VM's socket
    /// directory).
    async fn start_backend(&self, at: &Placement<'_>, what: &'static str, args: Vec<OsString>, needs: Needs, socket: &str, log: &str) -> Result<Watched, HypervisorError> {
        let (spec, dir) = (at.spec, at.dir);
        let host_socket = dir.run().join(socket);
        let mut all: Vec<OsString> = ["--log-level", "warn", "--open-files", &spec.open_files.to_string(), "vhost-user"].iter().map(OsString::from).collect();
        all.extend(args);
        let mut cmd = at.command(log.trim_end_matches(".log"), &self.vmm, all, needs)?;
        let backend = Watched::spawn(&mut cmd, what, &Logs { dir, stdout: None, stderr: log, cap: spec.log_cap })?;
        // The backend creates its socket when it listens (owner-only from the start, see
        // hull_proto::host_socket); nothing announces it otherwise.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !host_socket.exists() {
            if let Some(status) = backend.exited() {
                backend.logs_complete(Duration::from_secs(2)).await;
                let log = std::fs::read_to_string(dir.file(log)).unwrap_or_default();
                return Err(HypervisorError::BackendExited { what, status: status.to_string(), log: log.trim().into() });
            }
            if Instant::now() > deadline {
                backend.kill().await;
                return Err(HypervisorError::BackendTimeout(host_socket));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if needs.share {
            // Served as uid 0; QEMU, unprivileged, must reach it.
            if let Err(e) = at.hand_socket_to_jail(socket) {
                backend.kill().await;
                return Err(e);
            }
        }
        Ok(backend)
    }

    async fn start_backends(&self, at: &Placement<'_>) -> Result<Vec<Watched>, HypervisorError> {
        let os = |words: &[&str]| words.iter().map(OsString::from).collect::<Vec<_>>();
        let mut vsock_args = os(&["vsock", "--guest-cid", &at.spec.guest_cid.to_string(), "--socket"]);
        vsock_args.extend([at.socket(VHOST_VSOCK).into(), "--uds".into(), at.socket("vsock.sock").into()]);
        let mut backends = vec![self.start_backend(at, "hull-vmm vhost-user vsock", vsock_args, Needs::default(), VHOST_VSOCK, "vhost-user-vsock.log").await?];
        if let (Some(share), Some(shared_dir)) = (&at.spec.share, at.share()) {
            let mut args = os(&["fs", "--tag", &share.tag, "--socket"]);
            args.extend([at.socket(VHOST_FS).into(), "--shared-dir".into(), shared_dir.into()]);
            let needs = Needs { share: true, ..Needs::default() };
            match self.start_backend(at, "hull-vmm vhost-user fs", args, needs, VHOST_FS, "vhost-user-fs.log").await {
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

    fn command(&self, at: &Placement<'_>) -> Result<Command, HypervisorError> {
        let spec = at.spec;
        let mem = spec.memory_mib;
        let mut cmdline: Vec<String> = ["console=ttyS0", "panic=-1", "reboot=k", "loglevel=4"].into_iter().map(String::from).collect();
        cmdline.extend(spec.cmdline_extra.iter().cloned());
        let accel_name = match self.accel {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        };
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |words: &[&str]| args.extend(words.iter().map(OsString::from));
        push(&["-machine", &format!("pc,accel={accel_name},memory-backend=mem")]);
        push(&["-cpu", if self.accel == Accel::Kvm { "host" } else { "max" }]);
        push(&["-smp", &spec.vcpus.to_string(), "-m", &format!("{mem}M")]);
        // vhost-user needs guest memory the backends can map.
        push(&["-object", &format!("memory-backend-memfd,id=mem,size={mem}M,share=on")]);
        push(&["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]);
        // QEMU's own seccomp filter on every thread (with no_new_privs): no obsolete system
        // calls, no setuid and friends, no fork or exec, no scheduler or resource changes.
        push(&["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]);
        // The console on stdout: the runtime caps what it keeps of it (see `log`).
        push(&["-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console"]);
        push(&["-append", &cmdline.join(" ")]);
        push(&["-chardev", &format!("socket,id=vsock0,path={}", at.socket(VHOST_VSOCK).display())]);
        push(&["-device", "vhost-user-vsock-pci,chardev=vsock0"]);
        if let Some(share) = &spec.share {
            push(&["-chardev", &format!("socket,id=fs0,path={}", at.socket(VHOST_FS).display())]);
            push(&["-device", &format!("vhost-user-fs-pci,chardev=fs0,tag={}", share.tag)]);
        }
        if let Some(nic) = &spec.nic {
            // romfile=: no PXE option ROM; the guest boots from -kernel.
            push(&["-netdev", &format!("tap,id=net0,fd={TAP_FD}")]);
            push(&["-device", &format!("virtio-net-pci,netdev=net0,mac={},romfile=", nic.mac)]);
        }
        for (flag, path) in [("-kernel", at.kernel()), ("-initrd", at.initramfs())] {
            args.push(flag.into());
            args.push(path.into());
        }
        args.extend(spec.vmm_extra.iter().map(OsString::from));
        // QEMU serves no share itself: it runs unprivileged.
        let needs = Needs { kernel: true, kvm: self.accel == Accel::Kvm, share: false };
        let mut cmd = at.command("qemu", &self.qemu, args, needs)?;
        if let Some(nic) = &spec.nic {
            pass_tap(&mut cmd, nic.tap_fd);
        }
        Ok(cmd)
    }
}

const VHOST_VSOCK: &str = "vhost-vsock.sock";
const VHOST_FS: &str = "vhost-fs.sock";

#[async_trait::async_trait]
impl super::Hypervisor for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    async fn prepare(&self, spec: &VmSpec, dir: &VmDir) -> Result<Launched, HypervisorError> {
        exists("hull-vmm", &self.vmm)?;
        let at = Placement { spec, dir, vmm: &self.vmm };
        let backends = self.start_backends(&at).await?;
        let vmm = match self.command(&at) {
            Ok(cmd) => cmd,
            Err(e) => {
                for b in &backends {
                    b.kill().await;
                }
                return Err(e);
            }
        };
        Ok(Launched { vmm, vmm_log: "qemu.log", backends })
    }
}
