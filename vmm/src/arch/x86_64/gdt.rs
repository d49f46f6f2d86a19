//! The boot GDT: flat code and data segments for 64-bit mode, and the TSS KVM wants loaded.
//! Entries are encoded as the CPU reads them, and decoded into the `kvm_segment`s the vCPU's
//! segment registers are set to, so that both always agree.

use kvm_bindings::kvm_segment;

/// A GDT entry from flags (access byte + granularity nibble, as `0xa09b`), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn base(entry: u64) -> u64 {
    ((entry & 0xff00_0000_0000_0000) >> 32) | ((entry & 0x0000_00ff_0000_0000) >> 16) | ((entry & 0x0000_0000_ffff_0000) >> 16)
}

fn limit(entry: u64) -> u32 {
    (((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0x0000_0000_0000_ffff)) as u32
}

fn bit(entry: u64, n: u32) -> u8 {
    ((entry >> n) & 1) as u8
}

/// The segment register value for GDT entry `index` holding `entry`.
pub fn kvm_segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    kvm_segment {
        base: base(entry),
        limit: limit(entry),
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(entry, 47),
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(entry, 54),
        s: bit(entry, 44),
        l: bit(entry, 53),
        g: bit(entry, 55),
        avl: bit(entry, 52),
        padding: 0,
        unusable: u8::from(bit(entry, 47) == 0),
    }
}

/// NULL, 64-bit code, data, TSS.
pub const BOOT_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];
pub const CODE_INDEX: u8 = 1;
pub const DATA_INDEX: u8 = 2;
pub const TSS_INDEX: u8 = 3;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_64_bit_present_ring_0() {
        let cs = kvm_segment_from_gdt(BOOT_GDT[1], CODE_INDEX);
        assert_eq!((cs.selector, cs.l, cs.db, cs.present, cs.dpl, cs.s, cs.type_, cs.g), (0x8, 1, 0, 1, 0, 1, 0xb, 1));
        assert_eq!((cs.base, cs.limit), (0, 0xfffff));
    }

    #[test]
    fn data_and_tss_segments() {
        let ds = kvm_segment_from_gdt(BOOT_GDT[2], DATA_INDEX);
        assert_eq!((ds.selector, ds.type_, ds.db, ds.l, ds.present), (0x10, 0x3, 1, 0, 1));
        let tr = kvm_segment_from_gdt(BOOT_GDT[3], TSS_INDEX);
        assert_eq!((tr.selector, tr.type_, tr.s, tr.present), (0x18, 0xb, 0, 1));
        assert_eq!(kvm_segment_from_gdt(BOOT_GDT[0], 0).unusable, 1);
    }

    #[test]
    fn base_and_limit_round_trip() {
        let e = gdt_entry(0x809b, 0x1234_5678, 0xabcde);
        assert_eq!((base(e), limit(e)), (0x1234_5678, 0xabcde));
    }
}
