//! What a hostile container runs to reach its pod's agent over vsock: for each `CID:PORT`
//! argument it opens an AF_VSOCK stream socket and connects, then prints one line,
//! `CID:PORT connected` or `CID:PORT refused errno N`. Static, std only (built with rustc by
//! the boundary suite and bind-mounted into an ordinary container).

use std::time::Duration;

#[repr(C)]
struct SockaddrVm {
    family: u16,
    reserved: u16,
    port: u32,
    cid: u32,
    flags: u8,
    zero: [u8; 3],
}

extern "C" {
    fn socket(domain: i32, ty: i32, proto: i32) -> i32;
    fn connect(fd: i32, addr: *const SockaddrVm, len: u32) -> i32;
    fn setsockopt(fd: i32, level: i32, name: i32, value: *const u8, len: u32) -> i32;
    fn close(fd: i32) -> i32;
    fn __errno_location() -> *mut i32;
}

const AF_VSOCK: i32 = 40;
const SOCK_STREAM: i32 = 1;
/// AF_VSOCK's socket option level and SO_VM_SOCKETS_CONNECT_TIMEOUT_OLD (a struct timeval).
const AF_VSOCK_LEVEL: i32 = 40;
const SO_VM_SOCKETS_CONNECT_TIMEOUT: i32 = 6;

fn errno() -> i32 {
    // SAFETY: __errno_location returns this thread's errno slot, valid for the thread's life.
    unsafe { *__errno_location() }
}

fn dial(cid: u32, port: u32) -> Result<(), i32> {
    // SAFETY: plain socket calls on a descriptor this function owns; the address and the
    // timeval outlive the calls that read them.
    unsafe {
        let fd = socket(AF_VSOCK, SOCK_STREAM, 0);
        if fd < 0 {
            return Err(errno());
        }
        let timeout: [i64; 2] = [Duration::from_secs(3).as_secs() as i64, 0];
        setsockopt(fd, AF_VSOCK_LEVEL, SO_VM_SOCKETS_CONNECT_TIMEOUT, timeout.as_ptr().cast(), 16);
        let addr = SockaddrVm { family: AF_VSOCK as u16, reserved: 0, port, cid, flags: 0, zero: [0; 3] };
        let r = connect(fd, &addr, std::mem::size_of::<SockaddrVm>() as u32);
        let e = errno();
        close(fd);
        if r == 0 {
            Ok(())
        } else {
            Err(e)
        }
    }
}

fn main() {
    for arg in std::env::args().skip(1) {
        let Some((cid, port)) = arg.split_once(':').and_then(|(c, p)| Some((c.parse::<u32>().ok()?, p.parse::<u32>().ok()?))) else {
            println!("{arg} bad argument");
            continue;
        };
        match dial(cid, port) {
            Ok(()) => println!("{arg} connected"),
            Err(e) => println!("{arg} refused errno {e}"),
        }
    }
}
