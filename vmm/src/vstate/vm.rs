//! The KVM VM: its guest memory registered as memory slots, the in-kernel irqchip (PIC, IOAPIC,
//! LAPICs) and PIT, and the CPUID KVM supports here.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MEM_READONLY, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{Address, GuestMemory, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

use crate::arch::x86_64::layout::KVM_TSS_ADDRESS;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("Cannot open /dev/kvm: {0}.")]
    Open(#[source] kvm_ioctls::Error),
    #[error("/dev/kvm speaks API version {0}, not 12.")]
    ApiVersion(i32),
    #[error("KVM on this host lacks {0:?}, which hull-vmm needs.")]
    MissingCap(Cap),
    #[error("Cannot {what}: {source}.")]
    Ioctl { what: &'static str, source: kvm_ioctls::Error },
    #[error("Guest memory region at {0:#x} has no host mapping.")]
    HostAddress(u64),
}

pub struct Vm {
    pub fd: VmFd,
    pub memory: GuestMemoryMmap,
    pub supported_cpuid: CpuId,
}

impl Vm {
    pub fn new(memory: GuestMemoryMmap) -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(VmError::Open)?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(VmError::ApiVersion(version));
        }
        for cap in [Cap::Irqchip, Cap::Ioeventfd, Cap::Irqfd, Cap::UserMemory, Cap::SetTssAddr, Cap::Pit2] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(cap));
            }
        }
        let io = |what| move |source| VmError::Ioctl { what, source };
        let fd = kvm.create_vm().map_err(io("create the VM"))?;
        for (slot, region) in memory.iter().enumerate() {
            let host = region.get_host_address(MemoryRegionAddress(0)).map_err(|_| VmError::HostAddress(region.start_addr().raw_value()))?;
            let mem_region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping of exactly `memory_size` bytes owned by
            // `memory`, which the Vm keeps for as long as the VM fd exists.
            unsafe { fd.set_user_memory_region(mem_region) }.map_err(io("register guest memory with KVM"))?;
        }
        fd.set_tss_address(KVM_TSS_ADDRESS as usize).map_err(io("set the TSS address"))?;
        fd.create_irq_chip().map_err(io("create the in-kernel irqchip"))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        fd.create_pit2(pit).map_err(io("create the in-kernel PIT"))?;
        let supported_cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(io("read the supported CPUID"))?;
        Ok(Vm { fd, memory, supported_cpuid })
    }

    /// Maps `mapping` into guest physical memory at `guest_addr` as a read-only slot (the slot
    /// after guest RAM's): the guest reads it, and its writes exit as MMIO.
    pub fn map_read_only(&self, guest_addr: u64, mapping: &crate::devices::virtio::pmem::ImageMapping) -> Result<(), VmError> {
        let region = kvm_userspace_memory_region {
            slot: self.memory.num_regions() as u32,
            flags: KVM_MEM_READONLY,
            guest_phys_addr: guest_addr,
            memory_size: mapping.len(),
            userspace_addr: mapping.host_address(),
        };
        // SAFETY: the mapping is live for `memory_size` bytes and read-only; the device that
        // owns it lives as long as the VM's vCPUs run (it is on the VM's MMIO bus).
        unsafe { self.fd.set_user_memory_region(region) }.map_err(|source| VmError::Ioctl { what: "register the pmem image with KVM (read-only)", source })
    }
}
