//! CPUID for a vCPU: what KVM supports (KVM_GET_SUPPORTED_CPUID), with the vCPU's own APIC id
//! and topology, and the hypervisor bit set so the guest knows it is virtualized. Leaf 1
//! feature bits cannot be hidden on every host (see the notes on PVM): features a guest must
//! not use are turned off on its command line instead.

use kvm_bindings::kvm_cpuid_entry2;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EBX_CLFLUSH_SIZE_SHIFT: u32 = 8;
const EBX_CPU_COUNT_SHIFT: u32 = 16;
const EBX_APIC_ID_SHIFT: u32 = 24;
const EDX_HTT: u32 = 1 << 28;

/// Adjusts KVM's supported entries for vCPU `cpu` of `count`.
pub fn filter(entries: &mut [kvm_cpuid_entry2], cpu: u8, count: u8) {
    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (u32::from(cpu) << EBX_APIC_ID_SHIFT) | (8 << EBX_CLFLUSH_SIZE_SHIFT) | (u32::from(count) << EBX_CPU_COUNT_SHIFT);
                e.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            // x2APIC id of this vCPU in every topology sub-leaf.
            LEAF_EXT_TOPOLOGY => e.edx = u32::from(cpu),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, ebx: 0xdead_beef, edx: EDX_HTT, ..Default::default() }
    }

    #[test]
    fn apic_id_count_and_hypervisor_bit() {
        let mut e = [entry(1), entry(0xb), entry(0)];
        filter(&mut e, 2, 4);
        assert_eq!(e[0].ebx >> 24, 2);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e[0].edx & EDX_HTT, 0);
        assert_eq!(e[1].edx, 2);
        assert_eq!(e[2].ebx, 0xdead_beef, "other leaves untouched");
        let mut one = [entry(1)];
        filter(&mut one, 0, 1);
        assert_eq!(one[0].edx & EDX_HTT, 0);
    }
}
