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
    #[error("The vmlinux's ELF header or program headers lie outside the file, or are not ELF64's.")]
    BadHeaders,
    #[error("The vmlinux has no room for {needed} program headers before its first segment.")]
    NoRoomForHeaders { needed: usize },
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

const PAGE: usize = 4096;
/// Fewer pages of fill than this stay in their segment: a split costs a program header, and the
/// large runs are what matter (the kernel's 2 MiB alignments).
const MIN_FILL_PAGES: usize = 8;
const PT_LOAD: u32 = 1;
const PF_X: u32 = 1;
const PHDR_SIZE: usize = 56;

/// Whether a page of a segment is fill the loader need not write: zeros (a new VM's memory is
/// zeros already), or in code the int3 bytes (0xcc) the kernel's linker script pads with.
fn is_fill(page: &[u8], code: bool) -> bool {
    page.iter().all(|&b| b == 0) || (code && page.iter().all(|&b| b == 0xcc))
}

fn u64_at(b: &[u8], at: usize) -> Result<u64, VmlinuxError> {
    Ok(u64::from_le_bytes(b.get(at..at + 8).ok_or(VmlinuxError::BadHeaders)?.try_into().map_err(|_| VmlinuxError::BadHeaders)?))
}

fn u16_at(b: &[u8], at: usize) -> Result<usize, VmlinuxError> {
    Ok(u16::from_le_bytes(b.get(at..at + 2).ok_or(VmlinuxError::BadHeaders)?.try_into().map_err(|_| VmlinuxError::BadHeaders)?).into())
}

/// The vmlinux with its loadable segments split around runs of fill pages, so that what a VMM
/// writes into guest memory is the kernel and not its padding. The kernel pads its text to
/// 2 MiB boundaries (rodata's start; the entry text that page-table isolation maps alone, before
/// and after it): measured 3.7 MiB of int3 pages and 2.6 MiB of zero pages in a 13.5 MiB image.
/// A VMM loading a segment writes every byte of it, so every pod's guest had those pages
/// backed. Left out, they are a new VM's zeros: never executed (int3 is only there to trap a
/// stray jump) and never written by the loader.
pub fn without_padding(elf: &[u8]) -> Result<Vec<u8>, VmlinuxError> {
    if !elf.starts_with(b"\x7fELF") || elf.get(4) != Some(&2) {
        return Err(VmlinuxError::NotElf);
    }
    let phoff = usize::try_from(u64_at(elf, 0x20)?).map_err(|_| VmlinuxError::BadHeaders)?;
    let shoff = usize::try_from(u64_at(elf, 0x28)?).map_err(|_| VmlinuxError::BadHeaders)?;
    if u16_at(elf, 0x36)? != PHDR_SIZE {
        return Err(VmlinuxError::BadHeaders);
    }
    let phnum = u16_at(elf, 0x38)?;
    let old_end = phoff.checked_add(phnum * PHDR_SIZE).ok_or(VmlinuxError::BadHeaders)?;
    let old = elf.get(phoff..old_end).ok_or(VmlinuxError::BadHeaders)?;
    let mut phdrs: Vec<[u8; PHDR_SIZE]> = Vec::new();
    // The first byte of the file that holds anything after the program headers.
    let mut first_used = if shoff > phoff { shoff } else { elf.len() };
    for h in old.chunks_exact(PHDR_SIZE) {
        let h: [u8; PHDR_SIZE] = h.try_into().map_err(|_| VmlinuxError::BadHeaders)?;
        let p_type = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let flags = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        let field = |at: usize| u64_at(&h, at).and_then(|v| usize::try_from(v).map_err(|_| VmlinuxError::BadHeaders));
        let (offset, filesz, memsz) = (field(8)?, field(32)?, field(40)?);
        if filesz > 0 {
            first_used = first_used.min(offset);
        }
        let data = elf.get(offset..offset.checked_add(filesz).ok_or(VmlinuxError::BadHeaders)?).ok_or(VmlinuxError::BadHeaders)?;
        if p_type != PT_LOAD || offset % PAGE != 0 {
            phdrs.push(h);
            continue;
        }
        // Kept pieces of the segment, as byte ranges of its file part.
        let mut kept: Vec<(usize, usize)> = Vec::new();
        let (mut from, mut run) = (0, None);
        let pages = data.chunks(PAGE).enumerate().map(|(i, page)| (i * PAGE, page.len() == PAGE && is_fill(page, flags & PF_X != 0)));
        // The end of the file part closes a run as a page that is kept does.
        for (at, fill) in pages.chain(std::iter::once((filesz, false))) {
            if fill {
                run.get_or_insert(at);
                continue;
            }
            if let Some(start) = run.take() {
                if at - start >= MIN_FILL_PAGES * PAGE {
                    kept.push((from, start));
                    from = at;
                }
            }
        }
        let last = kept.len();
        kept.push((from, filesz));
        for (i, (start, end)) in kept.into_iter().enumerate() {
            // The last piece keeps what lies past the file part (bss: zeroed by the loader).
            let mem = if i == last { memsz.saturating_sub(start) } else { end - start };
            if end == start && mem == 0 {
                continue;
            }
            let mut piece = h;
            let base = |at: usize| u64_at(&h, at).map(|v| v + start as u64);
            piece[8..16].copy_from_slice(&base(8)?.to_le_bytes());
            piece[16..24].copy_from_slice(&base(16)?.to_le_bytes());
            piece[24..32].copy_from_slice(&base(24)?.to_le_bytes());
            piece[32..40].copy_from_slice(&((end - start) as u64).to_le_bytes());
            piece[40..48].copy_from_slice(&(mem as u64).to_le_bytes());
            phdrs.push(piece);
        }
    }
    let new_end = phoff + phdrs.len() * PHDR_SIZE;
    // The headers grow into the space before the first segment, which must hold nothing.
    if new_end > first_used || elf.get(old_end..new_end.max(old_end)).is_none_or(|b| b.iter().any(|&x| x != 0)) {
        return Err(VmlinuxError::NoRoomForHeaders { needed: phdrs.len() });
    }
    let mut out = elf.to_vec();
    out[0x38..0x3a].copy_from_slice(&u16::try_from(phdrs.len()).map_err(|_| VmlinuxError::NoRoomForHeaders { needed: phdrs.len() })?.to_le_bytes());
    for (i, h) in phdrs.iter().enumerate() {
        out[phoff + i * PHDR_SIZE..phoff + (i + 1) * PHDR_SIZE].copy_from_slice(h);
    }
    Ok(out)
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

    /// An ELF64 with one PT_LOAD at file offset 2 MiB holding `pages` (page-sized, each filled
    /// with its byte) and `bss` bytes past them.
    fn elf_with(pages: &[u8], flags: u32, bss: u64) -> Vec<u8> {
        let offset = 0x20_0000usize;
        let mut elf = vec![0u8; offset];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        let h = &mut elf[64..64 + PHDR_SIZE];
        h[0..4].copy_from_slice(&PT_LOAD.to_le_bytes());
        h[4..8].copy_from_slice(&flags.to_le_bytes());
        h[8..16].copy_from_slice(&(offset as u64).to_le_bytes());
        h[16..24].copy_from_slice(&0xffff_ffff_8100_0000u64.to_le_bytes());
        h[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes());
        let filesz = (pages.len() * PAGE) as u64;
        h[32..40].copy_from_slice(&filesz.to_le_bytes());
        h[40..48].copy_from_slice(&(filesz + bss).to_le_bytes());
        h[48..56].copy_from_slice(&0x20_0000u64.to_le_bytes());
        for &b in pages {
            elf.extend(std::iter::repeat(b).take(PAGE));
        }
        elf
    }

    /// (offset, paddr, filesz, memsz) of each program header.
    fn segments(elf: &[u8]) -> Vec<(u64, u64, u64, u64)> {
        let n = u16_at(elf, 0x38).unwrap();
        (0..n).map(|i| 64 + i * PHDR_SIZE).map(|h| (u64_at(elf, h + 8).unwrap(), u64_at(elf, h + 24).unwrap(), u64_at(elf, h + 32).unwrap(), u64_at(elf, h + 40).unwrap())).collect()
    }

    #[test]
    fn runs_of_fill_pages_are_left_out_of_the_segments() {
        let p = PAGE as u64;
        // code, 8 int3 pages, code, 3 zero pages (too few to split on), code, 9 zero pages, bss
        let mut pages = vec![0x90];
        pages.extend([0xcc; 8]);
        pages.push(0x48);
        pages.extend([0; 3]);
        pages.push(0x48);
        pages.extend([0; 9]);
        let elf = elf_with(&pages, PF_X | 4, 100);
        let out = without_padding(&elf).unwrap();
        let base = 0x20_0000u64;
        assert_eq!(
            segments(&out),
            vec![(base, 0x100_0000, p, p), (base + 9 * p, 0x100_0000 + 9 * p, 5 * p, 5 * p), (base + 23 * p, 0x100_0000 + 23 * p, 0, 100)]
        );
        // The file's bytes are where they were: only the headers changed.
        assert_eq!(out.len(), elf.len());
        assert_eq!(out[base as usize..], elf[base as usize..]);
        // In data, int3 pages are data.
        let data = elf_with(&pages, 6, 0);
        assert_eq!(segments(&without_padding(&data).unwrap()), vec![(base, 0x100_0000, 14 * p, 14 * p)]);
    }

    #[test]
    fn headers_with_no_room_to_grow_are_refused() {
        let mut pages = vec![0x90];
        pages.extend([0xcc; 8]);
        pages.push(0x90);
        let mut elf = elf_with(&pages, PF_X, 0);
        elf[64 + PHDR_SIZE] = 1;
        assert!(matches!(without_padding(&elf), Err(VmlinuxError::NoRoomForHeaders { needed: 2 })));
        assert!(matches!(without_padding(&elf[..100]), Err(VmlinuxError::BadHeaders)));
        assert!(matches!(without_padding(b"MZ"), Err(VmlinuxError::NotElf)));
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
