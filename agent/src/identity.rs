//! What a VM restored from a snapshot must not share with the others restored from it: the
//! host gives every sandbox its wall clock and fresh entropy (CreateSandbox), and the agent,
//! as the guest's init, sets the clock and reseeds the kernel's RNG before anything of the pod
//! runs. A cold-booted VM gets the same; it costs two system calls.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

/// The most entropy bytes taken from one request: a 256-bit reseed needs 32.
pub const MAX_ENTROPY: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("The host sent {0} bytes of entropy; at most {MAX_ENTROPY} are taken.")]
    TooMuchEntropy(usize),
    #[error("Cannot set the guest's wall clock: {0}.")]
    Clock(#[source] std::io::Error),
    #[error("Cannot open /dev/urandom: {0}.")]
    Urandom(#[source] std::io::Error),
    #[error("Cannot add the host's entropy to the guest's RNG: {0}.")]
    AddEntropy(#[source] std::io::Error),
    #[error("Cannot reseed the guest's RNG: {0}.")]
    Reseed(#[source] std::io::Error),
}

/// RNDADDENTROPY: _IOW('R', 0x03, int[2]).
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// RNDRESEEDCRNG: _IO('R', 0x07).
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Sets the wall clock to `wall_clock_ns` (unless 0) and mixes `entropy` into the kernel's RNG,
/// credited, then makes it reseed now rather than at its next interval.
pub fn apply(wall_clock_ns: u64, entropy: &[u8]) -> Result<(), IdentityError> {
    if entropy.len() > MAX_ENTROPY {
        return Err(IdentityError::TooMuchEntropy(entropy.len()));
    }
    if wall_clock_ns != 0 {
        let ts = libc::timespec { tv_sec: (wall_clock_ns / 1_000_000_000) as libc::time_t, tv_nsec: (wall_clock_ns % 1_000_000_000) as libc::c_long };
        // SAFETY: clock_settime reads the timespec, which lives across the call.
        if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } < 0 {
            return Err(IdentityError::Clock(std::io::Error::last_os_error()));
        }
    }
    if entropy.is_empty() {
        return Ok(());
    }
    let urandom = OpenOptions::new().write(true).open("/dev/urandom").map_err(IdentityError::Urandom)?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info: Vec<u8> = Vec::with_capacity(8 + entropy.len());
    info.extend_from_slice(&((entropy.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(entropy.len() as i32).to_ne_bytes());
    info.extend_from_slice(entropy);
    // SAFETY: `info` is a rand_pool_info whose buf_size matches the bytes that follow the
    // header; the kernel only reads it, within that size; the descriptor is ours and open.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) } < 0 {
        return Err(IdentityError::AddEntropy(std::io::Error::last_os_error()));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument; the descriptor is ours and open.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG as _) } < 0 {
        return Err(IdentityError::Reseed(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// IOCTL_VM_SOCKETS_GET_LOCAL_CID: _IO(7, 0xb9).
const GET_LOCAL_CID: libc::c_ulong = 0x7b9;

/// The guest's vsock CID as its kernel has it (from the vsock device the host gave the VM), for
/// the log line that says a sandbox was created; None without a vsock transport.
pub fn vsock_cid() -> Option<u32> {
    let dev = std::fs::File::open("/dev/vsock").ok()?;
    let mut cid: u32 = 0;
    // SAFETY: the ioctl writes one u32 into `cid`, which lives across the call; the
    // descriptor is ours and open.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), GET_LOCAL_CID as _, &mut cid as *mut u32) };
    (r == 0).then_some(cid)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The request is checked before anything is changed (the test runs outside a VM: it must
    /// not touch this host's clock or RNG).
    #[test]
    fn too_much_entropy_is_refused_before_anything_is_set() {
        let err = apply(1, &[0u8; MAX_ENTROPY + 1]).unwrap_err();
        assert!(matches!(err, IdentityError::TooMuchEntropy(n) if n == MAX_ENTROPY + 1), "{err}");
    }
}
