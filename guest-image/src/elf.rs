//! Is a binary static? The initramfs has no dynamic loader, so /init must not need one.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ElfError {
    #[error("{0} is not a 64-bit little-endian ELF file.")]
    NotElf(String),
    #[error("{0} is truncated.")]
    Truncated(String),
    #[error("{path} is dynamically linked (it asks for the loader {interp}); the guest has no loader.")]
    Dynamic { path: String, interp: String },
}

const PT_INTERP: u32 = 3;

fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?))
}

/// Fails unless `bytes` is an ELF64 executable without a PT_INTERP segment.
pub fn check_static(path: &str, bytes: &[u8]) -> Result<(), ElfError> {
    if bytes.get(..4) != Some(b"\x7fELF") || bytes.get(4) != Some(&2) || bytes.get(5) != Some(&1) {
        return Err(ElfError::NotElf(path.into()));
    }
    let trunc = || ElfError::Truncated(path.into());
    let phoff = u64_at(bytes, 0x20).ok_or_else(trunc)? as usize;
    let phentsize = u16_at(bytes, 0x36).ok_or_else(trunc)? as usize;
    let phnum = u16_at(bytes, 0x38).ok_or_else(trunc)? as usize;
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize).ok_or_else(trunc)?).ok_or_else(trunc)?;
        if u32_at(bytes, ph).ok_or_else(trunc)? == PT_INTERP {
            let off = u64_at(bytes, ph + 8).ok_or_else(trunc)? as usize;
            let size = u64_at(bytes, ph + 32).ok_or_else(trunc)? as usize;
            let interp = bytes.get(off..off.saturating_add(size)).ok_or_else(trunc)?;
            let interp = String::from_utf8_lossy(interp).trim_end_matches('\0').to_string();
            return Err(ElfError::Dynamic { path: path.into(), interp });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_and_dynamic_binaries_are_told_apart() {
        let sh = std::fs::read("/bin/sh").expect("/bin/sh");
        match check_static("/bin/sh", &sh) {
            Err(ElfError::Dynamic { interp, .. }) => assert!(interp.contains("ld-linux"), "{interp}"),
            other => panic!("/bin/sh should be dynamic: {other:?}"),
        }
        if let Ok(bb) = std::fs::read("/bin/busybox") {
            assert_eq!(check_static("/bin/busybox", &bb), Ok(()));
        }
        assert_eq!(check_static("x", b"#!/bin/sh\n"), Err(ElfError::NotElf("x".into())));
        assert_eq!(check_static("y", &sh[..0x30]), Err(ElfError::Truncated("y".into())));
    }
}
