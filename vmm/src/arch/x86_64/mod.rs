//! x86_64: the guest's physical memory layout, and the zero page (boot_params) Linux's 64-bit
//! boot protocol reads: command line, initramfs and the e820 map.

pub mod cpuid;
pub mod gdt;
pub mod interrupts;
pub mod mptable;
pub mod regs;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Address, GuestAddress, GuestMemory, GuestMemoryMmap};

/// Low memory the VMM lays out (all below 1 MiB, where the kernel does not go).
pub mod layout {
    pub const BOOT_GDT_START: u64 = 0x500;
    pub const BOOT_IDT_START: u64 = 0x520;
    /// The zero page: boot_params.
    pub const ZERO_PAGE_START: u64 = 0x7000;
    pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
    pub const PML4_START: u64 = 0x9000;
    pub const PDPTE_START: u64 = 0xa000;
    pub const PDE_START: u64 = 0xb000;
    pub const CMDLINE_START: u64 = 0x20000;
    pub const CMDLINE_MAX_SIZE: usize = 4096;
    /// Start of the EBDA: RAM below it is usable, from it to 1 MiB is not.
    pub const EBDA_START: u64 = 0x9fc00;
    /// Where the kernel goes.
    pub const HIMEM_START: u64 = 0x10_0000;
    /// Device MMIO lives in [MMIO_GAP_START, 4 GiB): no RAM there.
    pub const MMIO_GAP_START: u64 = 0xd000_0000;
    pub const MMIO_GAP_END: u64 = 1 << 32;
    /// Device memory (virtio-pmem) starts at the first GiB boundary at or above 4 GiB past RAM.
    pub const DEVICE_MEMORY_ALIGN: u64 = 1 << 30;
    /// KVM's TSS (three pages) just below 4 GiB, inside the gap.
    pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
}

use layout::*;

#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    #[error("Guest memory of {0} MiB is too small: the kernel is loaded at 1 MiB and needs room above it.")]
    MemoryTooSmall(u64),
    #[error("The initramfs ({size} bytes) does not fit in guest memory between the kernel's end ({kernel_end:#x}) and {top:#x}.")]
    InitramfsTooLarge { size: u64, kernel_end: u64, top: u64 },
    #[error("Cannot write the boot parameters into guest memory: {0}.")]
    BootParams(#[source] linux_loader::configurator::Error),
}

/// The guest RAM regions for `mem_bytes` of memory: below the MMIO gap, and the rest above
/// 4 GiB.
pub fn memory_regions(mem_bytes: u64) -> Vec<(GuestAddress, usize)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(GuestAddress(0), mem_bytes as usize)]
    } else {
        vec![(GuestAddress(0), MMIO_GAP_START as usize), (GuestAddress(MMIO_GAP_END), (mem_bytes - MMIO_GAP_START) as usize)]
    }
}

/// Where device memory (the pmem image) goes for `mem_bytes` of RAM: above 4 GiB and above RAM,
/// on a GiB boundary; nothing else of the machine is there.
pub fn device_memory_start(mem_bytes: u64) -> u64 {
    let ram_end = memory_regions(mem_bytes).last().map(|(a, l)| a.raw_value() + *l as u64).unwrap_or(0);
    ram_end.max(MMIO_GAP_END).div_ceil(DEVICE_MEMORY_ALIGN) * DEVICE_MEMORY_ALIGN
}

/// The e820 map of `mem`: low RAM up to the EBDA, then RAM from 1 MiB (and above 4 GiB).
pub fn e820_map(mem: &GuestMemoryMmap) -> Vec<boot_e820_entry> {
    const E820_RAM: u32 = 1;
    let ram = |addr: u64, size: u64| boot_e820_entry { addr, size, type_: E820_RAM };
    let mut map = vec![ram(0, EBDA_START)];
    let end = mem.last_addr().raw_value() + 1;
    let low_end = end.min(MMIO_GAP_START);
    if low_end > HIMEM_START {
        map.push(ram(HIMEM_START, low_end - HIMEM_START));
    }
    if end > MMIO_GAP_END {
        map.push(ram(MMIO_GAP_END, end - MMIO_GAP_END));
    }
    map
}

/// Where an initramfs of `size` bytes goes: as high as it fits in low memory, page aligned.
pub fn initramfs_address(mem: &GuestMemoryMmap, size: u64, kernel_end: u64) -> Result<GuestAddress, ArchError> {
    let top = (mem.last_addr().raw_value() + 1).min(MMIO_GAP_START);
    let too_large = ArchError::InitramfsTooLarge { size, kernel_end, top };
    let addr = top.checked_sub(size).ok_or(too_large)? & !0xfff;
    if addr < kernel_end {
        return Err(ArchError::InitramfsTooLarge { size, kernel_end, top });
    }
    Ok(GuestAddress(addr))
}

/// Writes the zero page: the kernel's own setup header (bzImage) or a fresh one, the command
/// line's address and size, the initramfs, and the e820 map.
pub fn configure_system(
    mem: &GuestMemoryMmap,
    setup_header: Option<setup_header>,
    cmdline_size: usize,
    initramfs: Option<(GuestAddress, u64)>,
) -> Result<(), ArchError> {
    const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
    const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
    const KERNEL_LOADER_OTHER: u8 = 0xff;
    const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
    let mut params = boot_params::default();
    if let Some(hdr) = setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_size as u32;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    if let Some((addr, size)) = initramfs {
        params.hdr.ramdisk_image = addr.raw_value() as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = e820_map(mem);
    for (slot, entry) in params.e820_table.iter_mut().zip(&map) {
        *slot = *entry;
    }
    params.e820_entries = map.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)), mem)
        .map_err(ArchError::BootParams)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn mem(mib: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&memory_regions(mib << 20)).expect("guest memory")
    }

    #[test]
    fn regions_skip_the_mmio_gap() {
        assert_eq!(memory_regions(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
        let big = memory_regions(4 << 30);
        assert_eq!(big, vec![(GuestAddress(0), MMIO_GAP_START as usize), (GuestAddress(1 << 32), ((4u64 << 30) - MMIO_GAP_START) as usize)]);
    }

    #[test]
    fn e820_covers_ram_but_not_the_bios_hole() {
        let map = e820_map(&mem(128));
        let got: Vec<_> = map.iter().map(|e| (e.addr, e.size, e.type_)).collect();
        assert_eq!(got, vec![(0, EBDA_START, 1), (HIMEM_START, (128 << 20) - HIMEM_START, 1)]);
    }

    #[test]
    fn initramfs_goes_high_and_never_over_the_kernel() {
        let m = mem(64);
        let addr = initramfs_address(&m, 10_000, 0x20_0000).expect("fits");
        assert_eq!(addr.raw_value(), ((64 << 20) - 10_000) & !0xfff);
        assert!(initramfs_address(&m, 63 << 20, 0x20_0000).is_err());
        assert!(initramfs_address(&m, 65 << 20, 0).is_err());
    }

    #[test]
    fn zero_page_has_cmdline_initramfs_and_e820() {
        let m = mem(128);
        configure_system(&m, None, 42, Some((GuestAddress(0x400_0000), 1234))).expect("configure");
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).expect("read");
        let (hdr, boot_flag, ptr, size, image, rsize) =
            (p.hdr.header, p.hdr.boot_flag, p.hdr.cmd_line_ptr, p.hdr.cmdline_size, p.hdr.ramdisk_image, p.hdr.ramdisk_size);
        assert_eq!((hdr, boot_flag, ptr, size, image, rsize), (0x5372_6448, 0xaa55, CMDLINE_START as u32, 42, 0x400_0000, 1234));
        assert_eq!(p.e820_entries, 2);
    }
}
