//! The Intel MultiProcessor table (MP spec 1.4): how a guest kernel without ACPI finds its
//! CPUs, its IOAPIC and how the ISA interrupts reach it. Without it Linux boots one CPU in PIC
//! mode; with it every vCPU comes up (INIT/SIPI through the in-kernel LAPICs) and interrupts go
//! through the in-kernel IOAPIC, pin N = IRQ N, as KVM routes GSIs by default.
//!
//! Layout at the start of the EBDA (the last KiB of base memory, which Linux scans): the 16-byte
//! floating pointer, then the configuration table right after it.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::EBDA_START;

pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// ISA IRQs routed 1:1 to IOAPIC pins.
const ISA_IRQS: u8 = 16;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// family 6, and the FPU and APIC feature flags.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_INTSRC: u8 = 3;
const ENTRY_LINTSRC: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("An MP table cannot describe {0} vCPUs (at most 254).")]
    TooManyCpus(u8),
    #[error("Cannot write the MP table into guest memory: {0}.")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// The table's bytes for `cpus` vCPUs (APIC ids 0..cpus, the IOAPIC's id after them), placed
/// at `base`.
pub fn build(cpus: u8, base: u64) -> Result<Vec<u8>, MpTableError> {
    if cpus == 0 || cpus > 254 {
        return Err(MpTableError::TooManyCpus(cpus));
    }
    let ioapic_id = cpus;
    let mut entries = Vec::new();
    for id in 0..cpus {
        entries.push(ENTRY_PROCESSOR);
        entries.push(id);
        entries.push(APIC_VERSION);
        entries.push(if id == 0 { 0x3 } else { 0x1 }); // enabled, and the BSP
        entries.extend(CPU_SIGNATURE.to_le_bytes());
        entries.extend(CPU_FEATURES.to_le_bytes());
        entries.extend([0u8; 8]);
    }
    entries.extend([ENTRY_BUS, 0]);
    entries.extend(b"ISA   ");
    entries.extend([ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend(IOAPIC_ADDR.to_le_bytes());
    for irq in 0..ISA_IRQS {
        // type, irq type, flags (conforming to the bus: ISA is edge, active high), bus, bus irq,
        // IOAPIC, pin.
        entries.extend([ENTRY_INTSRC, INT_TYPE_INT, 0, 0, 0, irq, ioapic_id, irq]);
    }
    // The PIC's output on every LAPIC's LINT0, NMI on LINT1 (as interrupts.rs programs them).
    entries.extend([ENTRY_LINTSRC, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend([ENTRY_LINTSRC, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    let count = u16::from(cpus) + 1 + 1 + u16::from(ISA_IRQS) + 2;

    let table_addr = base + 16;
    let mut table = Vec::new();
    table.extend(b"PCMP");
    let len = (44 + entries.len()) as u16;
    table.extend(len.to_le_bytes());
    table.push(4); // spec 1.4
    table.push(0); // checksum, below
    table.extend(b"HULL    ");
    table.extend(b"HULL-VMM    ");
    table.extend(0u32.to_le_bytes()); // no OEM table
    table.extend(0u16.to_le_bytes());
    table.extend(count.to_le_bytes());
    table.extend(LAPIC_ADDR.to_le_bytes());
    table.extend(0u32.to_le_bytes());
    table.extend(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::new();
    fp.extend(b"_MP_");
    fp.extend((table_addr as u32).to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(4); // spec 1.4
    fp.push(0); // checksum, below
    fp.extend([0u8; 5]); // feature bytes: 0 = a configuration table is present
    fp[10] = checksum(&fp);
    fp.extend(table);
    Ok(fp)
}

/// Writes the table at the start of the EBDA.
pub fn setup(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), MpTableError> {
    let bytes = build(cpus, EBDA_START)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START)).map_err(MpTableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointer_and_table_check_and_describe_every_cpu() {
        let t = build(4, EBDA_START).unwrap();
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(t[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0, "floating pointer checksum");
        let table_addr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
        assert_eq!(table_addr, EBDA_START + 16);
        let table = &t[16..];
        assert_eq!(&table[..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(table.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0, "table checksum");
        // Walk the entries as Linux does.
        let mut off = 44;
        let (mut cpus, mut bsp, mut ioapics, mut ints) = (0, 0, 0, 0);
        let count = u16::from_le_bytes([table[34], table[35]]);
        for _ in 0..count {
            match table[off] {
                ENTRY_PROCESSOR => {
                    cpus += 1;
                    if table[off + 3] & 2 != 0 {
                        bsp += 1;
                        assert_eq!(table[off + 1], 0, "the BSP is APIC 0");
                    }
                    off += 20;
                }
                ENTRY_IOAPIC => {
                    ioapics += 1;
                    assert_eq!(table[off + 1], 4, "the IOAPIC's id follows the CPUs'");
                    off += 8;
                }
                ENTRY_INTSRC => {
                    ints += 1;
                    assert_eq!(table[off + 5], table[off + 7], "IRQ n on pin n");
                    off += 8;
                }
                ENTRY_BUS | ENTRY_LINTSRC => off += 8,
                other => panic!("unknown entry type {other}"),
            }
        }
        assert_eq!(off, len, "the entries fill the table");
        assert_eq!((cpus, bsp, ioapics, ints), (4, 1, 1, 16));
        assert!(t.len() <= 1024, "fits in the EBDA's first KiB");
    }

    #[test]
    fn cpu_counts_outside_the_table_are_refused() {
        assert!(build(0, EBDA_START).is_err());
        assert!(build(255, EBDA_START).is_err());
        assert!(build(254, EBDA_START).unwrap().len() > 254 * 20);
    }
}
