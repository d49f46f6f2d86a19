//! A tap device opened by name (`hull_proto::tap`) or adopted from an fd, non-blocking,
//! carrying 12-byte virtio-net headers. The ioctls and their flags are libc's (linux/if_tun.h).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

use super::{NetError, HDR_LEN};

pub struct Tap {
    file: File,
}

impl Tap {
    /// Opens (creating if needed) the tap `name`.
    pub fn open(name: &str) -> Result<Tap, NetError> {
        let open_err = |source| NetError::Open { name: name.into(), source };
        let fd = hull_proto::tap::open(name).map_err(open_err)?;
        Tap::configure(File::from(fd))
    }

    /// Adopts a tap fd someone else opened with IFF_VNET_HDR (the shim opens it in the pod's
    /// network namespace).
    ///
    /// # Safety
    /// `fd` must be an open tap fd the caller gives up.
    pub unsafe fn from_raw_fd(fd: RawFd) -> Result<Tap, NetError> {
        // SAFETY: the caller hands over ownership of an open fd.
        Tap::configure(unsafe { File::from_raw_fd(fd) })
    }

    fn configure(file: File) -> Result<Tap, NetError> {
        let fd = file.as_raw_fd();
        let size: libc::c_int = HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int from the pointer, a live local.
        if unsafe { libc::ioctl(fd, libc::TUNSETVNETHDRSZ, &size) } < 0 {
            return Err(NetError::Configure(std::io::Error::last_os_error()));
        }
        // SAFETY: TUNSETOFFLOAD takes its flags by value; 0 turns every offload off.
        if unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, 0 as libc::c_ulong) } < 0 {
            return Err(NetError::Configure(std::io::Error::last_os_error()));
        }
        // SAFETY: F_GETFL/F_SETFL on an fd this function holds.
        let ok = unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) >= 0
        };
        if !ok {
            return Err(NetError::Configure(std::io::Error::last_os_error()));
        }
        Ok(Tap { file })
    }

    pub fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }

    pub fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize> {
        self.file.write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
