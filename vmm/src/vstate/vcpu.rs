//! A vCPU and its run loop. Every exit is accounted for: port I/O goes to the bus, a reset or
//! a guest shutdown request ends the VM cleanly, and anything else (triple fault, failed
//! entry, emulation failure, an exit kind hull-vmm does not know) ends it with an error that
//! names the exit and carries the vCPU's registers.


use kvm_bindings::{KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestAddress;

use super::control::VcpuControl;
use super::vm::Vm;
use crate::arch::x86_64::{cpuid, interrupts, regs};
use crate::devices::legacy::{IoAction, PioBus};
use crate::devices::MmioBus;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("Cannot {what} vCPU {id}: {source}.")]
    Ioctl { id: u8, what: &'static str, source: kvm_ioctls::Error },
    #[error("Cannot set up vCPU {id}: {source}")]
    Regs { id: u8, source: regs::RegsError },
    #[error("vCPU {id} cannot install its seccomp filter: {source}")]
    Seccomp { id: u8, source: crate::seccomp::SeccompError },
    #[error("vCPU {id} stopped the VM on a {exit} exit; {regs}")]
    Exit { id: u8, exit: String, regs: String },
}

/// How a VM ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset the machine (i8042, or KVM's reset event): `reboot`.
    Reset,
    /// The guest asked KVM to power off.
    Shutdown,
    /// The VMM stopped the vCPU (another vCPU ended the VM).
    Stopped,
}

pub struct Vcpu {
    pub id: u8,
    pub fd: VcpuFd,
}

impl Vcpu {
    pub fn new(vm: &Vm, id: u8) -> Result<Vcpu, VcpuError> {
        let fd = vm.fd.create_vcpu(u64::from(id)).map_err(|source| VcpuError::Ioctl { id, what: "create", source })?;
        Ok(Vcpu { id, fd })
    }

    /// CPUID and LAPIC for every vCPU; registers at `entry` for the boot vCPU (the others
    /// wait for the guest's INIT/SIPI).
    pub fn configure(&self, vm: &Vm, entry: GuestAddress, count: u8) -> Result<(), VcpuError> {
        let id = self.id;
        let io = |what| move |source| VcpuError::Ioctl { id, what, source };
        let mut cpuid = vm.supported_cpuid.clone();
        cpuid::filter(cpuid.as_mut_slice(), id, count);
        self.fd.set_cpuid2(&cpuid).map_err(io("set the CPUID of"))?;
        let mut lapic = self.fd.get_lapic().map_err(io("read the LAPIC of"))?;
        interrupts::set_lint(&mut lapic);
        self.fd.set_lapic(&lapic).map_err(io("set the LAPIC of"))?;
        if id == 0 {
            regs::setup_boot_vcpu(&self.fd, &vm.memory, entry).map_err(|source| VcpuError::Regs { id, source })?;
        }
        Ok(())
    }

    /// The registers, for an error message.
    pub fn dump(&self) -> String {
        let r = self.fd.get_regs();
        let s = self.fd.get_sregs();
        match (r, s) {
            (Ok(r), Ok(s)) => format!(
                "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} cs={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
                r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, s.cs.selector, s.cr0, s.cr2, s.cr3, s.cr4, s.efer
            ),
            (Err(e), _) | (_, Err(e)) => format!("registers unreadable: {e}"),
        }
    }

    fn fail(&self, exit: String) -> VcpuError {
        VcpuError::Exit { id: self.id, exit, regs: self.dump() }
    }

    /// Runs until the VM ends. `control` (with a signal to interrupt KVM_RUN) pauses it or
    /// ends it from outside.
    pub fn run(&mut self, bus: &PioBus, mmio: &MmioBus, control: &VcpuControl) -> Result<VmExit, VcpuError> {
        let mut first = true;
        loop {
            if !control.may_run() {
                return Ok(VmExit::Stopped);
            }
            if first && self.id == 0 {
                tracing::debug!("first KVM_RUN");
                first = false;
            }
            let exit = match self.fd.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(source) => return Err(VcpuError::Ioctl { id: self.id, what: "run", source }),
            };
            let unhandled = match exit {
                VcpuExit::IoIn(port, data) => {
                    if !bus.read(port, data) {
                        tracing::trace!(port, "read of an unclaimed port");
                    }
                    continue;
                }
                VcpuExit::IoOut(port, data) => match bus.write(port, data) {
                    Some(IoAction::Reset) => return Ok(VmExit::Reset),
                    Some(IoAction::None) => continue,
                    None => {
                        tracing::trace!(port, "write to an unclaimed port");
                        continue;
                    }
                },
                // Unclaimed addresses float and drop writes, as ports do.
                VcpuExit::MmioRead(addr, data) => {
                    if !mmio.read(addr, data) {
                        tracing::trace!(addr, "read of an unclaimed MMIO address");
                    }
                    continue;
                }
                VcpuExit::MmioWrite(addr, data) => {
                    if !mmio.write(addr, data) {
                        tracing::trace!(addr, "write to an unclaimed MMIO address");
                    }
                    continue;
                }
                VcpuExit::SystemEvent(kind, _) if kind == KVM_SYSTEM_EVENT_SHUTDOWN => return Ok(VmExit::Shutdown),
                VcpuExit::SystemEvent(kind, _) if kind == KVM_SYSTEM_EVENT_RESET => return Ok(VmExit::Reset),
                // On AMD, KVM resets the vCPU before it reports the shutdown: the registers
                // below are then the reset state (rip 0xfff0), not where the guest faulted.
                VcpuExit::Shutdown => "shutdown (triple fault; on AMD the registers are already reset)".to_string(),
                VcpuExit::Hlt => "HLT (the in-kernel irqchip should have kept it)".to_string(),
                VcpuExit::FailEntry(reason, cpu) => format!("failed entry (hardware reason {reason:#x} on cpu {cpu})"),
                VcpuExit::InternalError => "KVM internal error (emulation failure?)".to_string(),
                other => format!("{other:?}"),
            };
            return Err(self.fail(unhandled));
        }
    }
}
