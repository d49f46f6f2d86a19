//! QEMU: hull's vsock and fs devices run as vhost-user backends (`hull-vmm vhost-user
//! vsock|fs`), which QEMU drives with `vhost-user-vsock-pci` and `vhost-user-fs-pci`; the
//! pod's tap goes to QEMU's virtio-net. KVM where the CPU allows, else TCG.

use std::ffi::OsString;
use std::path::PathBuf;

use tokio::process::Command;

use super::backend::{self, VHOST_FS, VHOST_VSOCK};
use super::jail::{Needs, Placement};
use super::{exists, pass_tap, Accel, HypervisorError, Launched, VmDir, VmSpec, TAP_FD};

pub struct Qemu {
    pub qemu: PathBuf,
    /// hull-vmm, which serves the vsock and fs devices (`backend`).
    pub vmm: PathBuf,
    pub accel: Accel,
}

impl Qemu {
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
        // Memory the guest frees goes back to the host (README, "Memory"): the balloon never
        // inflates, it only takes the guest's free page reports.
        push(&["-device", "virtio-balloon-pci,free-page-reporting=on"]);
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

#[async_trait::async_trait]
impl super::Hypervisor for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    async fn prepare(&self, spec: &VmSpec, dir: &VmDir) -> Result<Launched, HypervisorError> {
        exists("hull-vmm", &self.vmm)?;
        let at = Placement { spec, dir, vmm: &self.vmm };
        let mut backends = vec![backend::start_vsock(&at).await?];
        match backend::start_fs(&at).await {
            Ok(fs) => backends.extend(fs),
            Err(e) => {
                backends[0].kill().await;
                return Err(e);
            }
        }
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
