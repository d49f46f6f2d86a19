//! A pod VM under hull's own VMM: one `hull-vmm boot` process with the vsock, virtio-fs, net and
//! rng devices in process (no QEMU, no backend processes). The host side is the same hybrid vsock
//! socket the QEMU path uses, so the agent client does not know the difference.

use std::path::Path;
use std::process::Command;

use super::qemu::{pass_tap, QemuConfig, FS_TAG, TAP_FD};

/// The kernel command line of a builtin pod VM: the QEMU path's words, hull-vmm's machine
/// (no PCI, the i8042 only for its reset line), and on a kvm_pvm host the words its
/// compatibility kernel needs.
pub fn cmdline(config: &QemuConfig) -> String {
    let mut words = vec![hull_vmm::builder::DEFAULT_CMDLINE.to_string(), "panic=-1".into(), "loglevel=4".into()];
    if hull_vmm::builder::host_kvm_is_pvm() {
        words.push(hull_vmm::builder::PVM_COMPAT_CMDLINE.into());
    }
    words.extend(config.cmdline_extra.iter().cloned());
    words.join(" ")
}

/// The `hull-vmm boot` command for `config`, its sockets and console in the workdir.
pub fn command(config: &QemuConfig, uds: &Path, console: &Path) -> Command {
    let mut cmd = Command::new(&config.vmm);
    cmd.args(["--log-level", "info", "boot"])
        .arg("--kernel")
        .arg(&config.kernel)
        .arg("--initramfs")
        .arg(&config.initramfs)
        .args(["--cmdline", &cmdline(config)])
        .args(["--vcpus", &config.vcpus.to_string(), "--memory-mib", &config.memory_mib.to_string()])
        .arg("--console")
        .arg(console)
        .arg("--vsock-uds")
        .arg(uds)
        .args(["--guest-cid", &config.guest_cid.to_string(), "--rng"]);
    if let Some(nic) = &config.nic {
        cmd.args(["--net", &format!("fd={TAP_FD},mac={}", nic.mac)]);
        pass_tap(&mut cmd, nic.tap_fd);
    }
    if let Some(dir) = &config.shared_dir {
        let mut share = std::ffi::OsString::from(format!("{FS_TAG}="));
        share.push(dir);
        cmd.arg("--share").arg(share);
    }
    cmd
}
