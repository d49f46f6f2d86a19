//! The uncompressed kernel, taken out of the bzImage: its payload is the stripped vmlinux ELF
//! (arch/x86/boot/compressed: `objcopy -R .comment -S`), gzip-compressed (CONFIG_KERNEL_GZIP),
//! found through the setup header (boot protocol 2.08+: `payload_offset`, `payload_length`).
//! Both engines boot it directly, hull-vmm through its 64-bit entry and QEMU through its PVH
//! note (CONFIG_PVH), which skips the kernel's own decompressor: a good part of a boot under
//! TCG, and a second copy of the kernel (compressed, then unpacked) in guest memory.

use std::io::Read;

#[derive(Debug, thiserror::Error)]
pub enum VmlinuxError {
    #[error("The kernel image is not a bzImage of boot protocol 2.08 or later (it names no payload).")]
    NotBzImage,
    #[error("The bzImage's payload lies outside the file.")]
    Truncated,
    #[error("The bzImage's payload is not gzip (the kernel must be built with CONFIG_KERNEL_GZIP).")]
    NotGzip,
    #[error("Cannot decompress the bzImage's payload: {0}.")]
    Decompress(#[source] std::io::Error),
    #[error("The bzImage's payload is not an ELF vmlinux.")]
    NotElf,
}

/// Offsets in the bzImage (Documentation/arch/x86/boot.rst).
const SETUP_SECTS: usize = 0x1f1;
const HEADER_MAGIC: usize = 0x202;
const VERSION: usize = 0x206;
const PAYLOAD_OFFSET: usize = 0x248;
const PAYLOAD_LENGTH: usize = 0x24c;

fn u32_at(b: &[u8], at: usize) -> Option<usize> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?) as usize)
}

/// The ELF vmlinux inside the bzImage `bz`.
pub fn from_bzimage(bz: &[u8]) -> Result<Vec<u8>, VmlinuxError> {
    let version = bz.get(VERSION..VERSION + 2).map(|v| u16::from_le_bytes([v[0], v[1]]));
    if bz.get(HEADER_MAGIC..HEADER_MAGIC + 4) != Some(b"HdrS") || version.is_none_or(|v| v < 0x208) {
        return Err(VmlinuxError::NotBzImage);
    }
    // The protected-mode kernel follows the boot sector and the setup sectors (0 means 4).
    let setup_sects = match bz.get(SETUP_SECTS).copied().unwrap_or(0) {
        0 => 4,
        n => usize::from(n),
    };
    let start = (setup_sects + 1) * 512;
    let (offset, length) = u32_at(bz, PAYLOAD_OFFSET).zip(u32_at(bz, PAYLOAD_LENGTH)).ok_or(VmlinuxError::NotBzImage)?;
    let from = start.checked_add(offset).ok_or(VmlinuxError::Truncated)?;
    let payload = bz.get(from..from.checked_add(length).ok_or(VmlinuxError::Truncated)?).ok_or(VmlinuxError::Truncated)?;
    if !payload.starts_with(&[0x1f, 0x8b]) {
        return Err(VmlinuxError::NotGzip);
    }
    // One gzip member; the 4-byte size the build appends after it is not read.
    let mut vmlinux = Vec::new();
    flate2::read::GzDecoder::new(payload).read_to_end(&mut vmlinux).map_err(VmlinuxError::Decompress)?;
    if !vmlinux.starts_with(b"\x7fELF") {
        return Err(VmlinuxError::NotElf);
    }
    Ok(vmlinux)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A bzImage as the kernel build lays one out: boot sector, `setup_sects` setup sectors,
    /// then the protected-mode part holding the payload at `payload_offset`.
    fn bzimage(setup_sects: u8, payload: &[u8]) -> Vec<u8> {
        let start = (usize::from(if setup_sects == 0 { 4 } else { setup_sects }) + 1) * 512;
        let mut bz = vec![0u8; start + 0x100];
        bz[SETUP_SECTS] = setup_sects;
        bz[HEADER_MAGIC..HEADER_MAGIC + 4].copy_from_slice(b"HdrS");
        bz[VERSION..VERSION + 2].copy_from_slice(&0x20fu16.to_le_bytes());
        bz[PAYLOAD_OFFSET..PAYLOAD_OFFSET + 4].copy_from_slice(&0x100u32.to_le_bytes());
        bz[PAYLOAD_LENGTH..PAYLOAD_LENGTH + 4].copy_from_slice(&(payload.len() as u32 + 4).to_le_bytes());
        bz.extend_from_slice(payload);
        bz.extend_from_slice(&1234u32.to_le_bytes());
        bz
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn the_payload_comes_out_as_the_elf_it_is() {
        let elf = [b"\x7fELF".as_slice(), &[7u8; 5000]].concat();
        for sects in [0, 1, 30] {
            assert_eq!(from_bzimage(&bzimage(sects, &gzip(&elf))).unwrap(), elf, "setup_sects {sects}");
        }
    }

    #[test]
    fn what_is_not_a_gzip_elf_bzimage_is_named() {
        assert!(matches!(from_bzimage(b"\x7fELF not a bzImage"), Err(VmlinuxError::NotBzImage)));
        let mut old = bzimage(1, &gzip(b"\x7fELF"));
        old[VERSION..VERSION + 2].copy_from_slice(&0x206u16.to_le_bytes());
        assert!(matches!(from_bzimage(&old), Err(VmlinuxError::NotBzImage)));
        assert!(matches!(from_bzimage(&bzimage(1, b"\x28\xb5\x2f\xfd zstd")), Err(VmlinuxError::NotGzip)));
        assert!(matches!(from_bzimage(&bzimage(1, &gzip(b"MZ not elf"))), Err(VmlinuxError::NotElf)));
        let whole = bzimage(1, &gzip(b"\x7fELF"));
        assert!(matches!(from_bzimage(&whole[..whole.len() - 10]), Err(VmlinuxError::Truncated)));
    }
}
