//! The KVM VM: its guest memory registered as memory slots, the in-kernel irqchip (PIC, IOAPIC,
//! LAPICs) and PIT, and the CPUID KVM supports here.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region, CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_MEM_READONLY, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use serde::{Deserialize, Serialize};
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
    /// The MSRs KVM saves and restores, for a snapshot's vCPUs.
    pub msr_indices: Vec<u32>,
    /// The size of this host's XSAVE area as KVM_GET_XSAVE2 gives it (0: the 4 KiB one).
    pub xsave_size: usize,
}

/// The VM's own state besides its vCPUs and memory: the in-kernel irqchip (both PICs and the
/// IOAPIC), the PIT, and kvmclock.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct VmState {
    pic_master: kvm_irqchip,
    pic_slave: kvm_irqchip,
    ioapic: kvm_irqchip,
    pit: kvm_pit_state2,
    clock: kvm_clock_data,
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
        let msr_indices = kvm.get_msr_index_list().map_err(io("read the MSR index list"))?.as_slice().to_vec();
        let xsave_size = usize::try_from(kvm.check_extension_int(Cap::Xsave2)).unwrap_or(0);
        Ok(Vm { fd, memory, supported_cpuid, msr_indices, xsave_size })
    }

    /// Saves the irqchip, PIT and clock (the vCPUs are paused).
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let io = |what| move |source| VmError::Ioctl { what, source };
        let chip = |id| {
            let mut c = kvm_irqchip { chip_id: id, ..Default::default() };
            self.fd.get_irqchip(&mut c).map(|()| c)
        };
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER).map_err(io("read the master PIC"))?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE).map_err(io("read the slave PIC"))?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC).map_err(io("read the IOAPIC"))?,
            pit: self.fd.get_pit2().map_err(io("read the PIT"))?,
            clock: self.fd.get_clock().map_err(io("read kvmclock"))?,
        })
    }

    /// Puts a saved irqchip, PIT and clock into this new VM (after its vCPUs are restored).
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        let io = |what| move |source| VmError::Ioctl { what, source };
        self.fd.set_irqchip(&state.pic_master).map_err(io("set the master PIC"))?;
        self.fd.set_irqchip(&state.pic_slave).map_err(io("set the slave PIC"))?;
        self.fd.set_irqchip(&state.ioapic).map_err(io("set the IOAPIC"))?;
        self.fd.set_pit2(&state.pit).map_err(io("set the PIT"))?;
        // The guest's clock goes on from where it was saved; only the clock value is set
        // (the flags KVM_GET_CLOCK reported say what the old host's clock was, not asks).
        let clock = kvm_clock_data { clock: state.clock.clock, ..Default::default() };
        self.fd.set_clock(&clock).map_err(io("set kvmclock"))
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
