//! hull-vmm's boot path on the real /dev/kvm, with a tiny 64-bit "kernel" (an ELF the test
//! assembles by hand) instead of Linux, so that it runs in milliseconds even where KVM is
//! slow: the VMM's long-mode set-up (GDT, identity page tables, EFER), the zero page in rsi,
//! the command line, COM1 and the i8042 reset all have to be right for the guest to print
//! what it prints and end the VM with exit status 0. A guest that triple-faults ends the VM
//! with an error naming the exit and the registers.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

/// Why KVM tests cannot run here, or None.
fn missing_kvm() -> Option<String> {
    if !nix_is_root() {
        return Some("needs root for /dev/kvm".into());
    }
    if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        return Some("needs a usable /dev/kvm".into());
    }
    None
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

macro_rules! require_kvm {
    () => {
        if let Some(why) = missing_kvm() {
            if std::env::var_os("HULL_REQUIRE_ALL").is_some() {
                panic!("prerequisite missing under HULL_REQUIRE_ALL: {why}");
            }
            eprintln!("SKIP {}: {why}", module_path!());
            return;
        }
    };
}

const LOAD_ADDR: u64 = 0x10_0000;

/// An ELF64 executable with one PT_LOAD segment holding `code` at 1 MiB, entered there.
fn elf_kernel(code: &[u8]) -> Vec<u8> {
    let phoff = 64u64;
    let code_off = phoff + 56;
    let mut e = Vec::new();
    e.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // entry
    e.extend_from_slice(&phoff.to_le_bytes());
    e.extend_from_slice(&0u64.to_le_bytes()); // no sections
    e.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, 1, 64, 0, 0] {
        e.extend_from_slice(&v.to_le_bytes());
    }
    assert_eq!(e.len() as u64, phoff);
    e.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e.extend_from_slice(&5u32.to_le_bytes()); // R X
    for v in [code_off, LOAD_ADDR, LOAD_ADDR, code.len() as u64, code.len() as u64, 0x1000] {
        e.extend_from_slice(&v.to_le_bytes());
    }
    e.extend_from_slice(code);
    e
}

/// Prints "ok " on COM1, then the zero page's "HdrS" magic byte ('H', at rsi+0x202) and the
/// command line's first byte (through the pointer at rsi+0x228), then resets through the i8042.
fn hello_guest() -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for b in b"ok " {
        c.extend_from_slice(&[0xb0, *b, 0xee]); // mov al, b; out dx, al
    }
    c.extend_from_slice(&[0x8a, 0x86, 0x02, 0x02, 0x00, 0x00, 0xee]); // mov al, [rsi+0x202]; out
    c.extend_from_slice(&[0x8b, 0x9e, 0x28, 0x02, 0x00, 0x00]); // mov ebx, [rsi+0x228]
    c.extend_from_slice(&[0x8a, 0x03, 0xee]); // mov al, [rbx]; out
    c.extend_from_slice(&[0xb0, b'\n', 0xee]);
    c.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64]); // mov al, 0xfe; out 0x64, al
    c.extend_from_slice(&[0xf4, 0xeb, 0xfd]); // hlt; jmp hlt
    c
}

fn write_kernel(dir: &Path, code: &[u8]) -> PathBuf {
    let p = dir.join("kernel.elf");
    std::fs::write(&p, elf_kernel(code)).expect("write kernel");
    p
}

#[test]
fn tiny_guest_prints_reads_its_zero_page_and_reboots() {
    require_kvm!();
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = write_kernel(dir.path(), &hello_guest());
    assert_eq!(boot_to_reset(&kernel, &dir.path().join("console.log"), &["--cmdline", "Zcmdline-first-byte"]), "ok HZ\n");
}

/// Boots `kernel` with 64 MiB and `args` until the guest resets (hull-vmm must exit 0);
/// returns what it wrote to the console.
fn boot_to_reset(kernel: &std::path::Path, console: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_hull-vmm"))
        .args(["boot", "--memory-mib", "64"])
        .args(args)
        .arg("--kernel")
        .arg(kernel)
        .arg("--console")
        .arg(console)
        .output()
        .expect("hull-vmm runs");
    let text = std::fs::read_to_string(console).unwrap_or_default();
    assert!(out.status.success(), "exit {:?}: {} console: {text:?}", out.status, String::from_utf8_lossy(&out.stderr));
    text
}

/// Prints the whole command line (through the pointer at rsi+0x228) on COM1, then a newline,
/// then resets through the i8042.
fn cmdline_guest() -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    c.extend_from_slice(&[0x8b, 0x9e, 0x28, 0x02, 0x00, 0x00]); // mov ebx, [rsi+0x228]
    c.extend_from_slice(&[0x8a, 0x03]); // L: mov al, [rbx]
    c.extend_from_slice(&[0x84, 0xc0]); // test al, al
    c.extend_from_slice(&[0x74, 0x06]); // jz done
    c.push(0xee); // out dx, al
    c.extend_from_slice(&[0x48, 0xff, 0xc3]); // inc rbx
    c.extend_from_slice(&[0xeb, 0xf2]); // jmp L
    c.extend_from_slice(&[0xb0, b'\n', 0xee]); // done: mov al, '\n'; out dx, al
    c.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64]); // mov al, 0xfe; out 0x64, al
    c.extend_from_slice(&[0xf4, 0xeb, 0xfd]); // hlt; jmp hlt
    c
}

#[test]
fn append_adds_words_after_the_command_line_and_its_default() {
    require_kvm!();
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = write_kernel(dir.path(), &cmdline_guest());
    let console = dir.path().join("console.log");
    let boot = |args: &[&str]| boot_to_reset(&kernel, &console, args);
    assert_eq!(boot(&["--cmdline", "first"]), "first\n", "no --append: the command line as given");
    assert_eq!(boot(&["--cmdline", "first", "--append", "two words", "--append", "last"]), "first two words last\n");
    assert_eq!(boot(&["--append", "panic=-1"]), format!("{} panic=-1\n", hull_vmm::config::DEFAULT_CMDLINE));
}

#[test]
fn triple_fault_ends_the_vm_with_the_exit_and_registers() {
    require_kvm!();
    let dir = tempfile::tempdir().expect("tempdir");
    // ud2 with an empty IDT: #UD, #GP, #DF all fail to deliver -> triple fault.
    let kernel = write_kernel(dir.path(), &[0x90, 0x0f, 0x0b]);
    let sink = Arc::new(Mutex::new(Vec::new()));
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let config = hull_vmm::config::VmConfig {
        kernel,
        initramfs: None,
        cmdline: "x".into(),
        vcpus: 1,
        memory_mib: 64,
        devices: Default::default(),
        seccomp: true,
        thread_user: None,
        restore: None,
        console: Box::new(Sink(sink.clone())),
    };
    let e = hull_vmm::builder::run(config).expect_err("a triple fault is an error").to_string();
    assert!(e.contains("vCPU 0 stopped the VM on a") && e.contains("rip=0x10000"), "{e}");
    assert!(e.contains("shutdown") || e.contains("internal error"), "{e}");
}

#[test]
fn missing_kernel_and_oversized_initramfs_are_named() {
    require_kvm!();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = |kernel: PathBuf, initramfs: Option<PathBuf>| hull_vmm::config::VmConfig {
        kernel,
        initramfs,
        cmdline: "x".into(),
        vcpus: 1,
        memory_mib: 16,
        devices: Default::default(),
        seccomp: true,
        thread_user: None,
        restore: None,
        console: Box::new(std::io::sink()),
    };
    let e = hull_vmm::builder::run(config(dir.path().join("nope"), None)).expect_err("no kernel").to_string();
    assert!(e.contains("the kernel") && e.contains("nope"), "{e}");
    let kernel = write_kernel(dir.path(), &hello_guest());
    let big = dir.path().join("big.cpio");
    std::fs::write(&big, vec![0u8; 17 << 20]).unwrap();
    let e = hull_vmm::builder::run(config(kernel.clone(), Some(big))).expect_err("initramfs too big").to_string();
    assert!(e.contains("initramfs") && e.contains("does not fit"), "{e}");
    let junk = dir.path().join("junk");
    std::fs::write(&junk, b"not a kernel at all, just some bytes").unwrap();
    let e = hull_vmm::builder::run(config(junk, None)).expect_err("junk kernel").to_string();
    assert!(e.contains("Cannot load the kernel"), "{e}");
}

/// Writes 'x' to COM1 forever, with a short delay loop between writes.
fn chatty_guest() -> Vec<u8> {
    vec![
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb9, 0x00, 0x10, 0x00, 0x00, // L: mov ecx, 0x1000
        0xe2, 0xfe, // loop $
        0xb0, b'x', // mov al, 'x'
        0xee, // out dx, al
        0xeb, 0xf4, // jmp L
    ]
}

#[test]
fn the_api_socket_pauses_resumes_and_stops_the_vm() {
    require_kvm!();
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = write_kernel(dir.path(), &chatty_guest());
    let console = dir.path().join("console.log");
    let api = dir.path().join("api.sock");
    let mut vmm = Command::new(env!("CARGO_BIN_EXE_hull-vmm"))
        .args(["boot", "--memory-mib", "32"])
        .arg("--kernel")
        .arg(&kernel)
        .arg("--console")
        .arg(&console)
        .arg("--api-socket")
        .arg(&api)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("hull-vmm starts");
    let size = || std::fs::metadata(&console).map(|m| m.len()).unwrap_or(0);
    let ctl = |req: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_hull-vmm")).arg("ctl").arg("--api-socket").arg(&api).arg(req).output().expect("ctl runs");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).trim().to_string(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let wait_growth = |from: u64| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while size() <= from {
            assert!(std::time::Instant::now() < deadline, "the guest does not write");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    wait_growth(0);
    assert_eq!(ctl("state").1, "running");
    assert_eq!(ctl("pause").1, "ok (was: running)");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let paused_at = size();
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(size(), paused_at, "a paused guest does not run");
    assert_eq!(ctl("state").1, "paused");
    assert_eq!(ctl("resume").1, "ok (was: paused)");
    wait_growth(paused_at);
    let (ok, _, err) = ctl("explode");
    assert!(!ok && err.contains("unknown request"), "{err}");
    assert_eq!(ctl("stop").1, "ok");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        if let Some(st) = vmm.try_wait().expect("wait") {
            break st;
        }
        assert!(std::time::Instant::now() < deadline, "hull-vmm did not stop");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut stderr = String::new();
    let _ = std::io::Read::read_to_string(&mut vmm.stderr.take().expect("stderr"), &mut stderr);
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.contains("Stopped"), "{stderr}");
}
