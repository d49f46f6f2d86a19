//! hull's own VMM: one `hull-vmm boot` process with the vsock, net, rng and balloon devices in process
//! (no QEMU), unprivileged; the share's virtio-fs is served by a jailed `hull-vmm vhost-user fs`
//! backend that hull-vmm drives as a vhost-user frontend. hull-vmm knows its machine's kernel
//! command line; the words here are appended to it.
//!
//! The same machine is a snapshot's template (`Mode::Template`: saved by hull-vmm itself at
//! agent ready, see `snapshot`) and a pod restored from one (`Mode::Restore`): the same
//! devices in the same order, so that the restored guest finds them where it left them; the
//! identities (vsock CID, tap, the share's backend) are the restored pod's own.

use std::ffi::OsString;
use std::path::PathBuf;

use tokio::process::Command;

use super::backend::{self, VHOST_FS};
use super::jail::{Needs, Placement};
use super::{exists, pass_tap, GuestRoot, HypervisorError, Launched, VmDir, VmSpec, TAP_FD};
use crate::host;

pub struct Builtin {
    pub vmm: PathBuf,
    pub mode: Mode,
}

/// What a builtin VM is started for.
#[derive(Debug, Clone)]
pub enum Mode {
    Boot,
    /// Booted to be saved: its control socket (`API_SOCKET`) takes `pause` and `snapshot`, and
    /// it writes the snapshot into its memory directory (`jail::prepare_memory`). The pod's
    /// NIC, if it has one, has no tap and the MAC `TEMPLATE_MAC` (a restored VM's agent gives
    /// its NIC the pod's MAC).
    Template,
    /// Restored from the snapshot in this host directory.
    Restore(PathBuf),
}

/// The control socket of a template VM, in its socket directory.
pub const API_SOCKET: &str = "api.sock";
/// The NIC's MAC in a template VM, and so in every VM restored from its snapshot until its
/// agent takes the pod's.
pub const TEMPLATE_MAC: &str = "02:68:75:6c:6c:01";

impl Builtin {
    /// The words appended to hull-vmm's machine command line: a guest panic ends the VM, and
    /// on a kvm_pvm host the words its compatibility kernel needs.
    fn append(spec: &VmSpec) -> String {
        let mut words = vec!["panic=-1".to_string(), "loglevel=4".into()];
        words.extend(spec.root.cmdline());
        if host::kvm_is_pvm() {
            words.push(host::PVM_COMPAT_CMDLINE.into());
        }
        words.extend(spec.cmdline_extra.iter().cloned());
        words.join(" ")
    }

    fn command(&self, at: &Placement<'_>) -> Result<Command, HypervisorError> {
        let spec = at.spec;
        let mut vcpus = spec.vcpus;
        if vcpus > 1 && host::kvm_is_pvm() {
            // Measured: a second vCPU never comes up under kvm_pvm (the boot stalls before the
            // console); a pod that boots slowly beats one that does not boot.
            tracing::warn!(vcpus, "kvm_pvm host: the builtin VM gets one vCPU");
            vcpus = 1;
        }
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |words: &[&str]| args.extend(words.iter().map(OsString::from));
        push(&["--log-level", "info", "--open-files", &spec.open_files.to_string(), "boot"]);
        if !matches!(self.mode, Mode::Restore(_)) {
            push(&["--append", &Self::append(spec)]);
        }
        push(&["--vcpus", &vcpus.to_string(), "--memory-mib", &spec.memory_mib.to_string()]);
        // The console on stdout: the runtime caps what it keeps of it (see `log`).
        push(&["--console", "-", "--guest-cid", &spec.guest_cid.to_string(), "--rng"]);
        // Memory the guest frees goes back to the host (README, "Memory").
        push(&["--free-page-reporting"]);
        if let Some(nic) = &spec.nic {
            match self.mode {
                Mode::Template => push(&["--net", &format!("none,mac={TEMPLATE_MAC}")]),
                _ => push(&["--net", &format!("fd={TAP_FD},mac={}", nic.mac)]),
            }
        }
        let root_flag = match &spec.root {
            GuestRoot::Image(host) => {
                super::root_image_size(host)?;
                "--pmem"
            }
            GuestRoot::Initramfs(_) => "--initramfs",
        };
        let mut paths = vec![("--vsock-uds", at.socket("vsock.sock"))];
        // A restored guest has its initramfs (in its memory) already; an image stays mapped.
        if !(matches!(self.mode, Mode::Restore(_)) && root_flag == "--initramfs") {
            paths.push((root_flag, at.root()));
        }
        match &self.mode {
            Mode::Restore(snapshot) => paths.push(("--restore", at.snapshot(snapshot))),
            Mode::Template => paths.extend([("--kernel", at.kernel()), ("--api-socket", at.socket(API_SOCKET))]),
            Mode::Boot => paths.push(("--kernel", at.kernel())),
        }
        for (flag, path) in paths {
            args.push(flag.into());
            args.push(path.into());
        }
        if let Some(share) = &spec.share {
            // Served by its own jailed backend (`backend::start_fs`), not in this process.
            let mut arg = OsString::from(format!("{}=", share.tag));
            arg.push(at.socket(VHOST_FS));
            args.push("--vhost-user-fs".into());
            args.push(arg);
        }
        args.extend(spec.vmm_extra.iter().map(OsString::from));
        // hull-vmm serves no share itself: it runs unprivileged. A template writes its
        // snapshot into its memory directory.
        let snapshot = match &self.mode {
            Mode::Restore(dir) => Some(dir.as_path()),
            _ => None,
        };
        let needs = Needs { kernel: true, kvm: true, memory: matches!(self.mode, Mode::Template), snapshot, ..Needs::default() };
        let mut cmd = at.command("vmm", &self.vmm, args, needs)?;
        if let (Some(nic), false) = (&spec.nic, matches!(self.mode, Mode::Template)) {
            pass_tap(&mut cmd, nic.tap_fd);
        }
        Ok(cmd)
    }
}

#[async_trait::async_trait]
impl super::Hypervisor for Builtin {
    fn name(&self) -> &'static str {
        "hull-vmm boot"
    }

    async fn prepare(&self, spec: &VmSpec, dir: &VmDir) -> Result<Launched, HypervisorError> {
        exists("hull-vmm", &self.vmm)?;
        let at = Placement { spec, dir, vmm: &self.vmm };
        let backends: Vec<_> = backend::start_fs(&at).await?.into_iter().collect();
        match self.command(&at) {
            Ok(vmm) => Ok(Launched { vmm, vmm_log: "hull-vmm.log", backends }),
            Err(e) => {
                for b in &backends {
                    b.kill().await;
                }
                Err(e)
            }
        }
    }
}
