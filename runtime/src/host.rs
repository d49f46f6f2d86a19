//! What this host offers pods: whether /dev/kvm exists and what kind of KVM it is. One answer
//! for `hull check` and for `hypervisor = "auto"`, so the two cannot disagree.

use std::path::Path;

use crate::config::Hypervisor;
use crate::hypervisor::{Accel, Engine};

/// What a guest kernel needs on a host whose /dev/kvm is kvm_pvm (a nested paravirtual
/// hypervisor that emulates guest ring 0): features its instruction emulator lacks are hidden,
/// and KPTI is off for the guest kernel's syscall-entry workaround (guest-image/patches/).
pub const PVM_COMPAT_CMDLINE: &str = "noxsave nopti clearcpuid=popcnt,cx16,umip,smap,smep,avx,avx2,avx512f,movbe,bmi1,bmi2,fsgsbase,rdpid,erms,fsrm";

/// Whether this host's /dev/kvm is kvm_pvm.
pub fn kvm_is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("The builtin hypervisor needs /dev/kvm, which does not exist on this host.")]
    NoKvm,
}

/// The host's KVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kvm {
    /// No /dev/kvm.
    Missing,
    /// /dev/kvm on a CPU with VMX or SVM: runs a stock guest.
    Hardware,
    /// kvm_pvm, a nested paravirtual KVM: runs only hull's compatibility kernel, slowly.
    Pvm,
    /// /dev/kvm without VMX/SVM and not kvm_pvm.
    NoHardware,
}

#[derive(Debug, Clone, Copy)]
pub struct Host {
    pub kvm: Kvm,
}

impl Host {
    pub fn probe() -> Host {
        let kvm = if !Path::new("/dev/kvm").exists() {
            Kvm::Missing
        } else if cpu_has_virtualization() {
            Kvm::Hardware
        } else if kvm_is_pvm() {
            Kvm::Pvm
        } else {
            Kvm::NoHardware
        };
        Host { kvm }
    }

    /// How QEMU runs guests here, and why.
    pub fn qemu_accel(&self) -> (Accel, &'static str) {
        match self.kvm {
            Kvm::Hardware => (Accel::Kvm, "/dev/kvm with hardware virtualization"),
            Kvm::Missing => (Accel::Tcg, "/dev/kvm does not exist"),
            Kvm::Pvm | Kvm::NoHardware => (Accel::Tcg, "/dev/kvm is present but the CPU offers neither VMX nor SVM (nested paravirtual KVM)"),
        }
    }

    /// The engine pods get for a configured hypervisor, and why. `auto` takes the builtin VMM
    /// where KVM has hardware virtualization, else QEMU with TCG. Under kvm_pvm the builtin VMM
    /// runs guests only with the compatibility kernel and much slower than TCG, so `auto` does
    /// not take it there.
    pub fn engine(&self, hypervisor: Hypervisor) -> Result<(Engine, &'static str), HostError> {
        let (accel, why) = self.qemu_accel();
        match hypervisor {
            Hypervisor::Qemu => Ok((Engine::Qemu(accel), why)),
            Hypervisor::Builtin if self.kvm == Kvm::Missing => Err(HostError::NoKvm),
            Hypervisor::Builtin => Ok((Engine::Builtin, "configured")),
            Hypervisor::Auto if accel == Accel::Kvm => Ok((Engine::Builtin, why)),
            Hypervisor::Auto => Ok((Engine::Qemu(accel), why)),
        }
    }
}

fn cpu_has_virtualization() -> bool {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = cpuinfo.lines().find(|l| l.starts_with("flags")).unwrap_or("");
    flags.split_whitespace().any(|f| f == "vmx" || f == "svm")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_takes_the_builtin_vmm_only_on_hardware_kvm() {
        let host = |kvm| Host { kvm };
        assert_eq!(host(Kvm::Hardware).engine(Hypervisor::Auto).unwrap().0, Engine::Builtin);
        assert_eq!(host(Kvm::Hardware).engine(Hypervisor::Qemu).unwrap().0, Engine::Qemu(Accel::Kvm));
        for kvm in [Kvm::Pvm, Kvm::NoHardware, Kvm::Missing] {
            assert_eq!(host(kvm).engine(Hypervisor::Auto).unwrap().0, Engine::Qemu(Accel::Tcg), "{kvm:?}");
        }
        assert_eq!(host(Kvm::Pvm).engine(Hypervisor::Builtin).unwrap().0, Engine::Builtin);
        let err = host(Kvm::Missing).engine(Hypervisor::Builtin).unwrap_err().to_string();
        assert!(err.contains("/dev/kvm"), "{err}");
    }
}
