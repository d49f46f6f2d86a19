//! QEMU: hull's vsock and fs devices run as vhost-user backends (`hull-vmm vhost-user
//! vsock|fs`), which QEMU drives with `vhost-user-vsock-pci` and `vhost-user-fs-pci`; the
//! pod's tap goes to QEMU's virtio-net. KVM where the CPU allows, else TCG.
//!
//! The same machine also makes and restores snapshots (`snapshot`): QEMU 7.2 cannot migrate a
//! vhost-user device, so a snapshot holds the machine without the pod's devices (the vsock its
//! template booted with is ejected first) and a restored VM gets them hot-plugged, on the slots
//! a booted one has them on.

use std::ffi::OsString;
use std::path::PathBuf;

use serde_json::{json, Map, Value};
use tokio::process::Command;

use super::backend::{self, VHOST_FS, VHOST_VSOCK};
use super::jail::{Needs, Placement};
use super::qmp::QMP_SOCKET;
use super::{exists, pass_tap, Accel, GuestRoot, HypervisorError, Launched, VmDir, VmSpec, TAP_FD};

/// The socket a restoring QEMU reads its snapshot from (`migrate-incoming`).
pub const INCOMING_SOCKET: &str = "incoming.sock";

/// What a QEMU process is started for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A pod VM that boots.
    Boot,
    /// The VM a snapshot is made of: booted with the vsock alone (to know its agent is
    /// ready), with a QMP socket to eject it and save the machine.
    Template,
    /// A pod VM restored from a snapshot: the machine of `Template` loaded from
    /// `INCOMING_SOCKET`, its backends connected, its devices hot-plugged (`hotplug`).
    Restore,
}

/// The pod's devices, on fixed slots: a restored VM gets them where a booted one has them.
struct Device {
    id: &'static str,
    props: Vec<(&'static str, String)>,
}

impl Device {
    fn new(id: &'static str, driver: &str, slot: u8, props: &[(&'static str, &str)]) -> Device {
        let mut all = vec![("driver", driver.to_string()), ("id", id.to_string()), ("addr", format!("{slot:#x}"))];
        all.extend(props.iter().map(|(k, v)| (*k, v.to_string())));
        Device { id, props: all }
    }

    /// `-device driver,id=..,addr=..,k=v`.
    fn arg(&self) -> String {
        let mut words = vec![self.props[0].1.clone()];
        words.extend(self.props[1..].iter().map(|(k, v)| format!("{k}={v}")));
        words.join(",")
    }

    /// QMP `device_add`'s arguments.
    fn qmp(&self) -> Value {
        Value::Object(self.props.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<Map<_, _>>())
    }
}

/// The memory balloon: part of every machine, snapshots included. The guest's free page
/// reports go back to the host (README, "Memory"); it never inflates.
fn balloon() -> Device {
    Device::new("balloon", "virtio-balloon-pci", 2, &[("free-page-reporting", "on")])
}

/// The guest's hardware RNG, QEMU's getrandom behind it (rng-builtin): part of every machine,
/// snapshots included, so the guest's RNG is seeded before its agent is ready (a snapshot's
/// restored VMs are then reseeded by their agents, `identity.rs`).
fn rng() -> Device {
    Device::new("rng", "virtio-rng-pci", 6, &[])
}

/// The guest's root image (`GuestRoot::Image`) on a fixed slot. In a snapshot's machines too:
/// QEMU 7.2's virtio-pmem has no migration state, so a restored VM never answers the guest's
/// flush, which the guest only sends when something writes pmem0, or at an orderly reboot (the
/// agent reboots through sysrq instead). The image itself is not in the snapshot (share=on).
fn root_image() -> Device {
    Device::new("pmem", "virtio-pmem-pci", 7, &[("memdev", "root")])
}

/// The pod's own devices, the vsock on the highest of their slots: the guest's ACPI hot-plug
/// handler takes the slots in order, so once the agent answers the share and the NIC are in the
/// guest too.
fn pod_devices(spec: &VmSpec) -> Vec<Device> {
    let mut out = Vec::new();
    if let Some(share) = &spec.share {
        out.push(Device::new("fs", "vhost-user-fs-pci", 3, &[("chardev", "fs0"), ("tag", &share.tag)]));
    }
    if let Some(nic) = &spec.nic {
        // romfile=: no PXE option ROM; the guest boots from -kernel.
        out.push(Device::new("net", "virtio-net-pci", 4, &[("netdev", "net0"), ("mac", &nic.mac), ("romfile", "")]));
    }
    out.push(vsock());
    out
}

fn vsock() -> Device {
    Device::new("vsock", "vhost-user-vsock-pci", 5, &[("chardev", "vsock0")])
}

/// The `device_add` arguments that give a restored VM the pod's devices, in order.
pub fn hotplug(spec: &VmSpec) -> Vec<(&'static str, Value)> {
    pod_devices(spec).iter().map(|d| (d.id, d.qmp())).collect()
}

pub struct Qemu {
    pub qemu: PathBuf,
    /// hull-vmm, which serves the vsock and fs devices (`backend`).
    pub vmm: PathBuf,
    pub accel: Accel,
    pub mode: Mode,
}

impl Qemu {
    fn command(&self, at: &Placement<'_>) -> Result<Command, HypervisorError> {
        let spec = at.spec;
        let mem = spec.memory_mib;
        // acpi=noirq: PCI interrupts routed by PIIX's router, not by ACPI's link methods, which
        // the guest interprets for every device it enables: measured under TCG, ~300 ms per
        // device at boot and per hot-plugged one, boot → agent ready 1.68 vs 2.33 s (p50 of 5,
        // alternating). The vCPUs and hot-plug stay ACPI's.
        let mut cmdline: Vec<String> = ["console=ttyS0", "panic=-1", "reboot=k", "loglevel=4", "acpi=noirq"].into_iter().map(String::from).collect();
        cmdline.extend(spec.root.cmdline());
        cmdline.extend(spec.cmdline_extra.iter().cloned());
        let accel_name = match self.accel {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        };
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |words: &[&str]| args.extend(words.iter().map(OsString::from));
        push(&["-machine", &format!("pc,accel={accel_name},memory-backend=mem")]);
        push(&["-cpu", if self.accel == Accel::Kvm { "host" } else { "max" }]);
        push(&["-smp", &spec.vcpus.to_string()]);
        let image = match &spec.root {
            GuestRoot::Image(host) => Some(super::root_image_size(host)?),
            GuestRoot::Initramfs(_) => None,
        };
        match image {
            // The pmem device's memory is plugged in beside RAM: one slot, room for the image.
            Some(bytes) => push(&["-m", &format!("{mem}M,slots=1,maxmem={}M", mem + bytes.div_ceil(1 << 20) as u32)]),
            None => push(&["-m", &format!("{mem}M")]),
        }
        // vhost-user needs guest memory the backends can map. A snapshot's VMs keep it in a
        // file (`jail::prepare_memory`): the template's is saved, a restored VM's is a copy of
        // it, and the migration stream skips it (x-ignore-shared).
        let file_backed = self.mode != Mode::Boot;
        if file_backed {
            push(&["-object", &format!("memory-backend-file,id=mem,size={mem}M,mem-path={},share=on", at.memory_file().display())]);
        } else {
            push(&["-object", &format!("memory-backend-memfd,id=mem,size={mem}M,share=on")]);
        }
        push(&["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]);
        // QEMU's own seccomp filter on every thread (with no_new_privs): no obsolete system
        // calls, no setuid and friends, no fork or exec, no scheduler or resource changes.
        push(&["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]);
        // The console on stdout: the runtime caps what it keeps of it (see `log`).
        push(&["-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console"]);
        push(&["-append", &cmdline.join(" ")]);
        push(&["-device", &balloon().arg(), "-device", &rng().arg()]);
        if let Some(bytes) = image {
            // Opened read-only and mapped shared: the guest cannot change the file, and every
            // VM maps the same page-cache pages of it. share=on also keeps it out of a
            // snapshot's stream (x-ignore-shared).
            push(&["-object", &format!("memory-backend-file,id=root,mem-path={},size={bytes},share=on,readonly=on", at.root().display())]);
            push(&["-device", &root_image().arg()]);
        }
        // The backends' sockets: chardevs are not part of a snapshot, every mode has its own.
        push(&["-chardev", &format!("socket,id=vsock0,path={}", at.socket(VHOST_VSOCK).display())]);
        if spec.share.is_some() {
            push(&["-chardev", &format!("socket,id=fs0,path={}", at.socket(VHOST_FS).display())]);
        }
        if spec.nic.is_some() {
            push(&["-netdev", &format!("tap,id=net0,fd={TAP_FD}")]);
        }
        match self.mode {
            Mode::Boot => {
                for d in pod_devices(spec) {
                    push(&["-device", &d.arg()]);
                }
            }
            Mode::Template => push(&["-device", &vsock().arg()]),
            // Set up over QMP first (`snapshot`): capabilities, then where to listen.
            Mode::Restore => push(&["-incoming", "defer"]),
        }
        if self.mode != Mode::Boot {
            push(&["-qmp", &format!("unix:{},server=on,wait=off", at.socket(QMP_SOCKET).display())]);
        }
        args.extend(["-kernel".into(), at.kernel().into()]);
        if let GuestRoot::Initramfs(_) = spec.root {
            args.extend(["-initrd".into(), at.root().into()]);
        }
        args.extend(spec.vmm_extra.iter().map(OsString::from));
        // QEMU serves no share itself: it runs unprivileged.
        let needs = Needs { kernel: true, kvm: self.accel == Accel::Kvm, share: false, memory: file_backed, snapshot: None };
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A hot-plugged device is the one a booted VM has on its command line: same properties,
    /// same slot.
    #[test]
    fn a_device_is_the_same_on_the_command_line_and_hot_plugged() {
        let d = Device::new("net", "virtio-net-pci", 4, &[("netdev", "net0"), ("mac", "02:00:00:00:00:01"), ("romfile", "")]);
        assert_eq!(d.arg(), "virtio-net-pci,id=net,addr=0x4,netdev=net0,mac=02:00:00:00:00:01,romfile=");
        assert_eq!(d.qmp(), json!({"driver": "virtio-net-pci", "id": "net", "addr": "0x4", "netdev": "net0", "mac": "02:00:00:00:00:01", "romfile": ""}));
    }
}
