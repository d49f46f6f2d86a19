//! `hull check`: whether this host can run hull's pods, with which hypervisor, and why not.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use hull_runtime::config::Config;
use hull_runtime::host::{Host, Kvm};
use hull_runtime::hypervisor::{Accel, Engine, GuestRoot};

use crate::CliError;

/// One line per requirement; exit 0 when pods can run here with some hypervisor.
pub fn check(config: Option<&Path>) -> Result<i32, CliError> {
    let mut usable = true;
    let mut line = |ok: bool, what: &str, detail: String, required: bool| {
        let _ = writeln!(std::io::stdout(), "{:4} {what}: {detail}", if ok { "ok" } else if required { "FAIL" } else { "no" });
        if required && !ok {
            usable = false;
        }
    };
    line(nix::unistd::geteuid().is_root(), "root", "the shim mounts rootfs and shares".into(), true);
    let cfg = match Config::load(config) {
        Ok(c) => {
            line(true, "config", format!("{:?} hypervisor", c.hypervisor), true);
            c
        }
        Err(e) => {
            line(false, "config", e.to_string(), true);
            Config::default()
        }
    };
    let root = cfg.root();
    let root_what = match root {
        GuestRoot::Image(_) => "guest root image",
        GuestRoot::Initramfs(_) => "guest initramfs",
    };
    for (what, p) in [("guest kernel", &cfg.kernel), (root_what, &root.path().to_path_buf()), ("hull-vmm", &cfg.vmm)] {
        line(p.exists(), what, p.display().to_string(), true);
    }
    let qemu = Command::new(&cfg.qemu).arg("--version").output();
    let qemu_ok = qemu.as_ref().is_ok_and(|o| o.status.success());
    let version = qemu.map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").to_string()).unwrap_or_else(|e| e.to_string());
    line(qemu_ok, "QEMU", format!("{}: {version}", cfg.qemu.display()), true);
    let host = Host::probe();
    let (accel, why) = host.qemu_accel();
    line(accel == Accel::Kvm, "QEMU with KVM", why.into(), false);
    line(true, "QEMU with TCG", "always available (slow: no hardware virtualization)".into(), false);
    line(host.kvm != Kvm::Missing, "builtin hull-vmm", match host.kvm {
        Kvm::Pvm => "kvm_pvm host: runs with hull's compatibility kernel and command line, but every guest kernel instruction is emulated (minutes per boot); auto uses QEMU here".into(),
        Kvm::Hardware => "KVM with hardware virtualization: auto uses it".into(),
        Kvm::NoHardware => "/dev/kvm without VMX or SVM: auto uses QEMU here".into(),
        Kvm::Missing => "needs /dev/kvm".into(),
    }, false);
    match hull_runtime::pod::cgroup::describe_host() {
        Ok(how) => line(true, "pod cgroups", format!("{how}; a pod's VM, backends and shim join the sandbox's cgroupsPath there"), false),
        Err(e) => line(false, "pod cgroups", format!("{e} A pod's VM then stays in the shim's cgroup."), false),
    }
    match cfg.jail() {
        Some(jail) => {
            let scratch = std::env::temp_dir().join(format!("hull-check-jail.{}", std::process::id()));
            match hull_runtime::hypervisor::jail::check(&cfg.vmm, jail, &scratch) {
                Ok(_) => line(true, "jail", format!("pod VM processes run in their own namespaces and root, each pod as its own uid from {} ({} of them, gid {}, at most {} processes) or (serving the share) uid 0 with a file server's capabilities", jail.uid, cfg.jail_uids, jail.gid, jail.max_processes), true),
                Err(e) => line(false, "jail", format!("{e} (set jail = false to run pod processes unconfined)"), true),
            }
        }
        None => line(false, "jail", "off (jail = false): pod VM processes run as root in the host's namespaces".into(), false),
    }
    let iptables = Command::new("iptables").arg("--version").output().is_ok_and(|o| o.status.success());
    line(iptables, "port-forward", "kubectl port-forward needs iptables with the nat table (a REDIRECT in the pod's network namespace)".into(), false);
    let containerd = Path::new("/usr/bin/containerd").exists();
    line(containerd, "containerd", "runtime_type = \"io.containerd.hull.v2\" needs containerd-shim-hull-v2 on its PATH".into(), false);
    // The same answer the shim gets for this config.
    let engine = match host.engine(cfg.hypervisor) {
        _ if !usable => "nothing (fix the FAIL lines)".to_string(),
        Ok((Engine::Builtin, why)) => format!("the builtin hull-vmm ({why})"),
        Ok((Engine::Qemu(Accel::Kvm), why)) => format!("QEMU with KVM ({why})"),
        Ok((Engine::Qemu(Accel::Tcg), why)) => format!("QEMU with TCG ({why})"),
        Err(e) => format!("nothing: {e}"),
    };
    let _ = writeln!(std::io::stdout(), "pods here run under: {engine}");
    Ok(if usable && host.engine(cfg.hypervisor).is_ok() { 0 } else { 1 })
}
