//! Pod VMs: the hypervisor backends the shim and `hull run` boot guests with.

pub mod builtin;
pub mod qemu;

use crate::config::Hypervisor;

/// What runs a pod VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// QEMU (KVM or TCG) driving hull's devices as vhost-user backends.
    Qemu(Accel),
    /// `hull-vmm boot`: hull's own KVM VMM with its devices in process.
    Builtin,
}

/// Picks the engine for a configured hypervisor, and says why. `auto` takes the builtin VMM
/// where KVM has hardware virtualization, else QEMU with TCG. Under kvm_pvm the builtin VMM
/// runs guests only with the compatibility kernel and much slower than TCG, so `auto` does not
/// take it there.
pub fn choose_engine(hypervisor: Hypervisor) -> Result<(Engine, String), String> {
    let (accel, why) = detect_accel();
    match hypervisor {
        Hypervisor::Qemu => Ok((Engine::Qemu(accel), why)),
        Hypervisor::Builtin if !std::path::Path::new("/dev/kvm").exists() => Err("/dev/kvm does not exist".into()),
        Hypervisor::Builtin => Ok((Engine::Builtin, "configured".into())),
        Hypervisor::Auto if accel == Accel::Kvm => Ok((Engine::Builtin, why)),
        Hypervisor::Auto => Ok((Engine::Qemu(accel), why)),
    }
}

/// How QEMU executes the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

/// Whether /dev/kvm can run a stock guest: it must exist and the CPU must offer VMX or SVM.
/// (Under a nested paravirtual kvm_pvm the guest needs hull-vmm's compatibility kernel.)
pub fn detect_accel() -> (Accel, String) {
    if !std::path::Path::new("/dev/kvm").exists() {
        return (Accel::Tcg, "/dev/kvm does not exist".into());
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = cpuinfo.lines().find(|l| l.starts_with("flags")).unwrap_or("");
    if flags.split_whitespace().any(|f| f == "vmx" || f == "svm") {
        (Accel::Kvm, "/dev/kvm with hardware virtualization".into())
    } else {
        (Accel::Tcg, "/dev/kvm is present but the CPU offers neither VMX nor SVM (nested paravirtual KVM)".into())
    }
}
