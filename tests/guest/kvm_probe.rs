//! /init of the guest that tests hull-vmm's virtio-mmio devices under real KVM with a real
//! Linux kernel. Built by the test with plain `rustc` (std only, static), so it needs no
//! crates and no busybox. It reports on the console, one `probe:` line per step, and reboots.
//!
//! Steps: count the CPUs; read the first line of the read-only disk /dev/vda; write a marker to sector 0 of the
//! read-write disk /dev/vdb; read 16 bytes of /dev/hwrng; mount the virtio-fs share `share`,
//! (or `hull`) read in.txt and write out.txt; accept a host-initiated vsock connection on port 5000, echo
//! one line, then read a payload to EOF and answer its length and byte sum; connect to the host
//! (CID 2) port 5001, send a line, print the answer and stream 1 MiB back.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::fd::FromRawFd;

extern "C" {
    fn mount(src: *const i8, target: *const i8, fstype: *const i8, flags: u64, data: *const u8) -> i32;
    fn socket(domain: i32, ty: i32, proto: i32) -> i32;
    fn bind(fd: i32, addr: *const SockaddrVm, len: u32) -> i32;
    fn listen(fd: i32, backlog: i32) -> i32;
    fn accept(fd: i32, addr: *mut u8, len: *mut u32) -> i32;
    fn connect(fd: i32, addr: *const SockaddrVm, len: u32) -> i32;
    fn shutdown(fd: i32, how: i32) -> i32;
    fn reboot(cmd: i32) -> i32;
    fn sync();
}

#[repr(C)]
struct SockaddrVm {
    family: u16,
    reserved: u16,
    port: u32,
    cid: u32,
    flags: u8,
    zero: [u8; 3],
}

const AF_VSOCK: i32 = 40;
const SOCK_STREAM: i32 = 1;

fn say(s: &str) {
    println!("probe: {s}");
}

fn check(what: &str, r: i32) -> Result<i32, String> {
    if r < 0 {
        Err(format!("{what}: {}", std::io::Error::last_os_error()))
    } else {
        Ok(r)
    }
}

fn mount_fs(src: &str, target: &str, fstype: &str) -> Result<(), String> {
    let _ = std::fs::create_dir_all(target);
    let (s, t, f) = (CString::new(src).unwrap(), CString::new(target).unwrap(), CString::new(fstype).unwrap());
    // SAFETY: the strings are NUL-terminated and live across the call; no data argument.
    check(&format!("mount {fstype} on {target}"), unsafe { mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), 0, std::ptr::null()) }).map(|_| ())
}

fn vsock_addr(cid: u32, port: u32) -> SockaddrVm {
    SockaddrVm { family: AF_VSOCK as u16, reserved: 0, port, cid, flags: 0, zero: [0; 3] }
}

fn steps() -> Result<(), String> {
    mount_fs("devtmpfs", "/dev", "devtmpfs")?;
    say("up");
    say(&format!("cpus {}", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)));

    let mut line = String::new();
    BufReader::new(File::open("/dev/vda").map_err(|e| format!("open vda: {e}"))?).read_line(&mut line).map_err(|e| format!("read vda: {e}"))?;
    say(&format!("vda says {}", line.trim_end()));
    match OpenOptions::new().write(true).open("/dev/vda") {
        Ok(mut f) => say(&format!("vda write {}", if f.write_all(&[0u8; 512]).and_then(|_| f.sync_all()).is_err() { "refused" } else { "ALLOWED" })),
        Err(_) => say("vda write refused"),
    }
    let mut vdb = OpenOptions::new().read(true).write(true).open("/dev/vdb").map_err(|e| format!("open vdb: {e}"))?;
    let mut sector = [0u8; 512];
    sector[..22].copy_from_slice(b"guest wrote to vdb ok\n");
    vdb.seek(SeekFrom::Start(0)).and_then(|_| vdb.write_all(&sector)).and_then(|_| vdb.sync_all()).map_err(|e| format!("write vdb: {e}"))?;
    say("vdb written");

    let mut rnd = [0u8; 16];
    File::open("/dev/hwrng").and_then(|mut f| f.read_exact(&mut rnd)).map_err(|e| format!("hwrng: {e}"))?;
    say(&format!("hwrng gave {} nonzero bytes", rnd.iter().filter(|&&b| b != 0).count().min(1)));

    // hull-vmm's test shares under `share`, the QEMU path under the runtime's tag `hull`.
    mount_fs("share", "/mnt", "virtiofs").or_else(|e| mount_fs("hull", "/mnt", "virtiofs").map_err(|f| format!("{e}; {f}")))?;
    let text = std::fs::read_to_string("/mnt/in.txt").map_err(|e| format!("read share: {e}"))?;
    say(&format!("share says {}", text.trim_end()));
    std::fs::write("/mnt/out.txt", "written by the guest\n").map_err(|e| format!("write share: {e}"))?;
    say("share written");

    // SAFETY: plain socket syscalls on fds this function owns; addresses are live locals of
    // the size passed.
    unsafe {
        let l = check("vsock socket", socket(AF_VSOCK, SOCK_STREAM, 0))?;
        let addr = vsock_addr(u32::MAX, 5000);
        check("vsock bind", bind(l, &addr, std::mem::size_of::<SockaddrVm>() as u32))?;
        check("vsock listen", listen(l, 1))?;
        say("listening on vsock 5000");
        let c = check("vsock accept", accept(l, std::ptr::null_mut(), std::ptr::null_mut()))?;
        let mut conn = File::from_raw_fd(c);
        let mut reader = BufReader::new(conn.try_clone().map_err(|e| e.to_string())?);
        let mut line = String::new();
        reader.read_line(&mut line).map_err(|e| format!("vsock read: {e}"))?;
        conn.write_all(format!("echo {line}").as_bytes()).map_err(|e| format!("vsock write: {e}"))?;
        let (mut len, mut sum) = (0u64, 0u64);
        let mut buf = vec![0u8; 65536];
        loop {
            let n = reader.read(&mut buf).map_err(|e| format!("vsock payload: {e}"))?;
            if n == 0 {
                break;
            }
            len += n as u64;
            sum = buf[..n].iter().fold(sum, |s, &b| s.wrapping_add(u64::from(b)));
        }
        conn.write_all(format!("{len} {sum}\n").as_bytes()).map_err(|e| format!("vsock write: {e}"))?;
        shutdown(c, 1);
        say(&format!("host sent {len} bytes"));

        let s = check("vsock socket", socket(AF_VSOCK, SOCK_STREAM, 0))?;
        let host = vsock_addr(2, 5001);
        check("vsock connect to the host", connect(s, &host, std::mem::size_of::<SockaddrVm>() as u32))?;
        let mut out = File::from_raw_fd(s);
        out.write_all(b"hello from the guest\n").map_err(|e| format!("vsock write: {e}"))?;
        let mut answer = String::new();
        BufReader::new(out.try_clone().map_err(|e| e.to_string())?).read_line(&mut answer).map_err(|e| format!("vsock read: {e}"))?;
        say(&format!("host answered {}", answer.trim_end()));
        // The host's payload sequence, back the other way; the host compares it byte for byte.
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
        out.write_all(&data).map_err(|e| format!("vsock write: {e}"))?;
        shutdown(s, 1);
        // The host closes once it has read everything: rebooting before that could lose bytes
        // still queued in the guest kernel.
        let mut rest = Vec::new();
        out.read_to_end(&mut rest).map_err(|e| format!("vsock read to the host's close: {e}"))?;
        say(&format!("sent the host {} bytes", data.len()));
    }
    Ok(())
}

fn main() {
    match steps() {
        Ok(()) => say("done"),
        Err(e) => say(&format!("FAILED {e}")),
    }
    // SAFETY: sync and reboot take no pointers; RB_AUTOBOOT restarts the machine, which
    // hull-vmm takes as the end of the VM.
    unsafe {
        sync();
        reboot(0x0123_4567);
    }
}
