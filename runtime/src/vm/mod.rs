//! Pod VMs: the hypervisor backends the shim and `hull run` boot guests with.

pub mod qemu;

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
