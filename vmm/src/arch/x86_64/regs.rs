//! The boot vCPU's state for Linux's 64-bit entry: long mode with paging on (the first GiB
//! identity-mapped with 2 MiB pages), the boot GDT loaded, rsi pointing at the zero page.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::gdt::{kvm_segment_from_gdt, BOOT_GDT, CODE_INDEX, DATA_INDEX, TSS_INDEX};
use super::layout::*;

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("Cannot write the boot {what} into guest memory: {source}.")]
    Write { what: &'static str, source: vm_memory::GuestMemoryError },
    #[error("Cannot {what} the vCPU's registers: {source}.")]
    Ioctl { what: &'static str, source: kvm_ioctls::Error },
    #[error("KVM set only {set} of the {wanted} boot MSRs.")]
    Msrs { set: usize, wanted: usize },
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

fn write<T: vm_memory::ByteValued>(mem: &GuestMemoryMmap, what: &'static str, addr: u64, v: T) -> Result<(), RegsError> {
    mem.write_obj(v, GuestAddress(addr)).map_err(|source| RegsError::Write { what, source })
}

/// Identity page tables for the first GiB: one PML4 entry, one PDPT entry, 512 2-MiB pages.
pub fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    write(mem, "PML4", PML4_START, PDPTE_START | 0x03)?;
    write(mem, "PDPT", PDPTE_START, PDE_START | 0x03)?;
    for i in 0..512u64 {
        write(mem, "page directory", PDE_START + i * 8, (i << 21) | 0x83)?;
    }
    Ok(())
}

/// The segment, table and control registers for 64-bit mode, with the GDT and an empty IDT
/// written into guest memory.
pub fn long_mode_sregs(mem: &GuestMemoryMmap, mut sregs: kvm_sregs) -> Result<kvm_sregs, RegsError> {
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        write(mem, "GDT", BOOT_GDT_START + i as u64 * 8, *entry)?;
    }
    write(mem, "IDT", BOOT_IDT_START, 0u64)?;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (BOOT_GDT.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    let data = kvm_segment_from_gdt(BOOT_GDT[DATA_INDEX as usize], DATA_INDEX);
    sregs.cs = kvm_segment_from_gdt(BOOT_GDT[CODE_INDEX as usize], CODE_INDEX);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = kvm_segment_from_gdt(BOOT_GDT[TSS_INDEX as usize], TSS_INDEX);
    write_page_tables(mem)?;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    Ok(sregs)
}

/// General registers at the kernel's 64-bit entry.
pub fn boot_regs(entry: GuestAddress) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry.raw_value(),
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

/// MSRs as firmware leaves them: syscall MSRs clear, TSC 0, fast strings on, MTRRs enabled
/// with write-back as the default type.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    let e = |index, data| kvm_msr_entry { index, data, ..Default::default() };
    vec![
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_TSC, 0),
        e(MSR_IA32_MISC_ENABLE, 1),
        e(MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
    ]
}

/// Puts a vCPU at the kernel's 64-bit entry.
pub fn setup_boot_vcpu(vcpu: &VcpuFd, mem: &GuestMemoryMmap, entry: GuestAddress) -> Result<(), RegsError> {
    let io = |what| move |source| RegsError::Ioctl { what, source };
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(io("set the FPU of"))?;
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::Msrs { set: 0, wanted: entries.len() })?;
    let set = vcpu.set_msrs(&msrs).map_err(io("set the MSRs of"))?;
    if set != entries.len() {
        return Err(RegsError::Msrs { set, wanted: entries.len() });
    }
    let sregs = vcpu.get_sregs().map_err(io("read"))?;
    vcpu.set_sregs(&long_mode_sregs(mem, sregs)?).map_err(io("set the segment registers of"))?;
    vcpu.set_regs(&boot_regs(entry)).map_err(io("set"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory")
    }

    #[test]
    fn page_tables_identity_map_the_first_gib() {
        let m = mem();
        write_page_tables(&m).expect("write");
        assert_eq!(m.read_obj::<u64>(GuestAddress(PML4_START)).unwrap(), PDPTE_START | 3);
        assert_eq!(m.read_obj::<u64>(GuestAddress(PDPTE_START)).unwrap(), PDE_START | 3);
        assert_eq!(m.read_obj::<u64>(GuestAddress(PDE_START)).unwrap(), 0x83);
        assert_eq!(m.read_obj::<u64>(GuestAddress(PDE_START + 511 * 8)).unwrap(), (511 << 21) | 0x83);
    }

    #[test]
    fn sregs_enter_long_mode_with_the_boot_gdt() {
        let m = mem();
        let s = long_mode_sregs(&m, kvm_sregs::default()).expect("sregs");
        assert_eq!((s.cr0 & X86_CR0_PG != 0, s.cr0 & X86_CR0_PE != 0, s.cr4 & X86_CR4_PAE != 0), (true, true, true));
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!((s.cr3, s.gdt.base, s.gdt.limit, s.idt.limit), (PML4_START, BOOT_GDT_START, 31, 7));
        assert_eq!((s.cs.selector, s.cs.l, s.ss.selector, s.tr.selector), (8, 1, 0x10, 0x18));
        for (i, e) in BOOT_GDT.iter().enumerate() {
            assert_eq!(m.read_obj::<u64>(GuestAddress(BOOT_GDT_START + i as u64 * 8)).unwrap(), *e);
        }
    }

    #[test]
    fn regs_point_at_entry_and_zero_page() {
        let r = boot_regs(GuestAddress(0x100_0200));
        assert_eq!((r.rip, r.rsi, r.rsp, r.rflags), (0x100_0200, ZERO_PAGE_START, BOOT_STACK_POINTER, 2));
    }
}
