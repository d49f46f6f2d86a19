//! A vCPU and its run loop. Every exit is accounted for: port I/O goes to the bus, a reset or
//! a guest shutdown request ends the VM cleanly, and anything else (triple fault, failed
//! entry, emulation failure, an exit kind hull-vmm does not know) ends it with an error that
//! names the exit and carries the vCPU's registers.


use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};
use vm_memory::GuestAddress;

use super::control::{Turn, VcpuControl};
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
    #[error("vCPU {id} cannot take the snapshot's MSR {index:#x} (KVM set {set} of {count}).")]
    Msr { id: u8, index: u32, set: usize, count: usize },
    #[error("This host's XSAVE area is {0} bytes, larger than the 4 KiB a snapshot keeps (AMX?).")]
    XsaveSize(usize),
}

/// MSR_IA32_TSC and MSR_IA32_TSC_DEADLINE: a deadline is restored after the TSC it is measured
/// on, or the guest's next timer interrupt may come much later than it asked.
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// What a vCPU is, saved between two KVM_RUNs: enough for a vCPU of another VM made the same
/// way (CPUID, memory, devices) to go on where this one stopped.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: kvm_xsave,
    xcrs: kvm_xcrs,
    debugregs: kvm_debugregs,
    lapic: kvm_lapic_state,
    mp_state: kvm_mp_state,
    events: kvm_vcpu_events,
    msrs: Vec<kvm_msr_entry>,
    /// The guest's TSC frequency (None: KVM could not say).
    tsc_khz: Option<u32>,
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
    /// wait for the guest's INIT/SIPI). A restored vCPU has no entry: its registers are saved.
    pub fn configure(&self, vm: &Vm, entry: Option<GuestAddress>, count: u8) -> Result<(), VcpuError> {
        let id = self.id;
        let io = |what| move |source| VcpuError::Ioctl { id, what, source };
        let mut cpuid = vm.supported_cpuid.clone();
        cpuid::filter(cpuid.as_mut_slice(), id, count);
        self.fd.set_cpuid2(&cpuid).map_err(io("set the CPUID of"))?;
        let mut lapic = self.fd.get_lapic().map_err(io("read the LAPIC of"))?;
        interrupts::set_lint(&mut lapic);
        self.fd.set_lapic(&lapic).map_err(io("set the LAPIC of"))?;
        if let (0, Some(entry)) = (id, entry) {
            regs::setup_boot_vcpu(&self.fd, &vm.memory, entry).map_err(|source| VcpuError::Regs { id, source })?;
        }
        Ok(())
    }

    /// A port or MMIO read that exited to hull-vmm completes only in the next KVM_RUN: one that
    /// returns at once (immediate_exit) puts its value in the registers first. A string or
    /// page-crossing access may exit again on the way; those exits are served as `run` does.
    fn complete_pending(&mut self, bus: &PioBus, mmio: &MmioBus) -> Result<(), VcpuError> {
        let id = self.id;
        self.fd.set_kvm_immediate_exit(1);
        let result = loop {
            let unexpected = match self.fd.run() {
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => break Ok(()),
                Err(source) => break Err(VcpuError::Ioctl { id, what: "complete the pending exit of", source }),
                Ok(VcpuExit::IoIn(port, data)) => {
                    bus.read(port, data);
                    continue;
                }
                Ok(VcpuExit::IoOut(port, data)) => match bus.write(port, data) {
                    Some(IoAction::Reset) => "a reset".to_string(),
                    _ => continue,
                },
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    mmio.read(addr, data);
                    continue;
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    mmio.write(addr, data);
                    continue;
                }
                Ok(other) => format!("{other:?}"),
            };
            break Err(self.fail(format!("{unexpected} exit while it was being saved")));
        };
        self.fd.set_kvm_immediate_exit(0);
        result
    }

    /// Saves the vCPU (on its own thread, between two KVM_RUNs, its pending exit completed).
    /// `msr_indices` are the MSRs KVM saves and restores (KVM_GET_MSR_INDEX_LIST); those this
    /// vCPU cannot read are left out. The MP state is read first (reading it takes a pending
    /// INIT or SIPI, which changes the registers), the pending events last.
    pub fn save_state(&mut self, msr_indices: &[u32], xsave_size: usize) -> Result<VcpuState, VcpuError> {
        let id = self.id;
        let io = |what| move |source| VcpuError::Ioctl { id, what, source };
        if xsave_size > std::mem::size_of::<kvm_xsave>() {
            return Err(VcpuError::XsaveSize(xsave_size));
        }
        let mp_state = self.fd.get_mp_state().map_err(io("read the MP state of"))?;
        let mut msrs = Vec::with_capacity(msr_indices.len());
        for &index in msr_indices {
            let mut one = Msrs::from_entries(&[kvm_msr_entry { index, ..Default::default() }]).map_err(|_| VcpuError::Msr { id, index, set: 0, count: 1 })?;
            if self.fd.get_msrs(&mut one).map_err(io("read the MSRs of"))? == 1 {
                msrs.extend_from_slice(one.as_slice());
            }
        }
        // The deadline after the TSC (see MSR_IA32_TSC_DEADLINE).
        msrs.sort_by_key(|m| (m.index == MSR_IA32_TSC_DEADLINE, m.index != MSR_IA32_TSC));
        Ok(VcpuState {
            mp_state,
            regs: self.fd.get_regs().map_err(io("read the registers of"))?,
            sregs: self.fd.get_sregs().map_err(io("read the special registers of"))?,
            xsave: self.fd.get_xsave().map_err(io("read the XSAVE area of"))?,
            xcrs: self.fd.get_xcrs().map_err(io("read the XCRs of"))?,
            debugregs: self.fd.get_debug_regs().map_err(io("read the debug registers of"))?,
            lapic: self.fd.get_lapic().map_err(io("read the LAPIC of"))?,
            msrs,
            tsc_khz: self.fd.get_tsc_khz().ok(),
            events: self.fd.get_vcpu_events().map_err(io("read the pending events of"))?,
        })
    }

    /// Puts a saved vCPU into this new one, after its CPUID (`configure`), in the order KVM
    /// needs: the LAPIC before the MSRs (the TSC deadline timer lives in it), the pending
    /// events last.
    pub fn restore_state(&self, state: &VcpuState, xsave_size: usize) -> Result<(), VcpuError> {
        let id = self.id;
        let io = |what| move |source| VcpuError::Ioctl { id, what, source };
        if xsave_size > std::mem::size_of::<kvm_xsave>() {
            return Err(VcpuError::XsaveSize(xsave_size));
        }
        // The guest's TSC runs at the rate it booted with, or the restore is refused: its clock
        // would run fast or slow (KVM scales it where the host can; 250 ppm is NTP's tolerance).
        if let Some(saved) = state.tsc_khz {
            let here = self.fd.get_tsc_khz().map_err(io("read the TSC frequency of"))?;
            if u64::from(saved.abs_diff(here)) * 1_000_000 > u64::from(saved) * 250 {
                self.fd.set_tsc_khz(saved).map_err(io("set the saved TSC frequency of"))?;
            }
        }
        self.fd.set_mp_state(state.mp_state).map_err(io("set the MP state of"))?;
        self.fd.set_regs(&state.regs).map_err(io("set the registers of"))?;
        self.fd.set_sregs(&state.sregs).map_err(io("set the special registers of"))?;
        // SAFETY: KVM reads this host's XSAVE size from the pointer, which is no more than the
        // kvm_xsave passed (checked above against KVM_CAP_XSAVE2).
        unsafe { self.fd.set_xsave(&state.xsave) }.map_err(io("set the XSAVE area of"))?;
        // A host without XSAVE gives no XCRs (nr_xcrs 0) and refuses to set any.
        if state.xcrs.nr_xcrs > 0 {
            self.fd.set_xcrs(&state.xcrs).map_err(io("set the XCRs of"))?;
        }
        self.fd.set_debug_regs(&state.debugregs).map_err(io("set the debug registers of"))?;
        self.fd.set_lapic(&state.lapic).map_err(io("set the LAPIC of"))?;
        let msrs = Msrs::from_entries(&state.msrs).map_err(|_| VcpuError::Msr { id, index: 0, set: 0, count: state.msrs.len() })?;
        let set = self.fd.set_msrs(&msrs).map_err(io("set the MSRs of"))?;
        if set < state.msrs.len() {
            return Err(VcpuError::Msr { id, index: state.msrs[set].index, set, count: state.msrs.len() });
        }
        self.fd.set_vcpu_events(&state.events).map_err(io("set the pending events of"))?;
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
    pub fn run(&mut self, bus: &PioBus, mmio: &MmioBus, control: &VcpuControl, msr_indices: &[u32], xsave_size: usize) -> Result<VmExit, VcpuError> {
        let mut first = true;
        loop {
            match control.turn(self.id) {
                Turn::Run => {}
                Turn::End => return Ok(VmExit::Stopped),
                Turn::Save => {
                    let state = self.complete_pending(bus, mmio).and_then(|()| self.save_state(msr_indices, xsave_size));
                    control.saved(self.id, state);
                    continue;
                }
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
