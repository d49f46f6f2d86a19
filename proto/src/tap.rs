//! The tap a pod's NIC uses: the runtime creates it in the pod's network namespace and hands the
//! fd to the VMM, hull-vmm can open one by name; both need the same kind of tap (no packet
//! information, a virtio-net header before each frame). The ioctl, its flags and
//! `struct ifreq` are libc's (linux/if_tun.h).

use std::os::fd::{AsRawFd, OwnedFd};

/// Opens (creating if needed) the tap `name` in the calling thread's network namespace, with
/// IFF_TAP | IFF_NO_PI | IFF_VNET_HDR. A name the kernel cannot take (empty, IFNAMSIZ or
/// longer) is refused as InvalidInput.
pub fn open(name: &str) -> std::io::Result<OwnedFd> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    let file = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun")?;
    // SAFETY: ifreq is plain data (a name array and a union of integers, socket addresses and a
    // pointer), valid as all zero bytes.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads an ifreq, which `req` is, laid out as the kernel expects, and it
    // outlives the call.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(OwnedFd::from(file))
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_the_kernel_cannot_take_are_refused_before_any_ioctl() {
        for name in ["", "a-name-of-sixteen", "nul\0"] {
            let e = super::open(name).expect_err(name);
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{name:?}");
        }
    }
}
