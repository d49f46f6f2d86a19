//! Snapshots of a paused VM, and VMs restored from them (the builtin engine's answer to QEMU's
//! migration): a directory with the guest's memory (`memory`, the pages that hold data, at
//! their offsets; holes elsewhere) and everything else (`vm.json`): each vCPU as KVM gives it
//! (registers, XSAVE, LAPIC, MSRs, pending events), the irqchip, PIT and kvmclock, COM1's
//! UART, and each virtio-mmio device's registers and the positions its worker had reached in
//! its rings.
//!
//! A restored VM is built from the same configuration as the one saved (the same memory size,
//! vCPUs and devices in the same order; `builder::start` checks), except its identity: the
//! vsock CID and host socket are the new VM's, and its vsock device sends the guest a transport
//! reset so that the driver drops the saved VM's connections and reads its new CID. Its memory
//! is its own copy of `memory`: nothing writable is shared with the snapshot or another VM.
//!
//! A device another process serves (vhost-user) is saved as its queues' positions, which its
//! backend gives back (GET_VRING_BASE); a restored VM hands those queues to its own backend.
//! What the backend itself holds (a FUSE session) is not saved: a VM is saved before its guest
//! has used such a device (hull's template VMs mount no share).

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

use crate::devices::legacy::serial::{SavedSerial, SerialConsole};
use crate::devices::virtio::mmio::{lock, TransportSnapshotError, TransportState};
use crate::devices::MmioBus;
use crate::vstate::control::{SaveError, VcpuControl};
use crate::vstate::vcpu::VcpuState;
use crate::vstate::vm::{Vm, VmError, VmState};

/// Bumped when what `vm.json` holds changes.
/// 2: the CPUID and each vCPU's TSC frequency.
const FORMAT: u32 = 2;
pub const STATE_FILE: &str = "vm.json";
pub const MEMORY_FILE: &str = "memory";
/// A VM's state besides its memory is tens of KiB; a larger file is not one of hull-vmm's.
const MAX_STATE: u64 = 16 << 20;
const PAGE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("Cannot {what} {path:?}: {source}.")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("The VM has ended; there is nothing to save.")]
    Ended,
    #[error(transparent)]
    Vcpus(#[from] SaveError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Device(#[from] TransportSnapshotError),
    #[error("{path:?} is not a hull-vmm snapshot: {source}.")]
    Format { path: PathBuf, source: serde_json::Error },
    #[error("{path:?} is larger than any hull-vmm snapshot's state ({size} bytes).")]
    TooBig { path: PathBuf, size: u64 },
    #[error("The snapshot is of format {found}; this hull-vmm reads format {FORMAT}.")]
    Version { found: u32 },
    #[error("The snapshot was made {saved}; this VM has {asked}.")]
    Mismatch { saved: String, asked: String },
    #[error("Cannot set up the restored VM's memory: {0}")]
    Memory(#[from] crate::vstate::memory::MemoryError),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.to_path_buf();
    move |source| SnapshotError::Io { what, path, source }
}

/// Everything in `vm.json`.
#[derive(Serialize, Deserialize)]
pub struct MachineState {
    format: u32,
    pub memory_mib: u64,
    /// The CPUID KVM offered the saved VM (what its guest booted on): a host that offers
    /// another CPU cannot restore it.
    pub cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    pub serial: SavedSerial,
    pub devices: Vec<TransportState>,
}

impl MachineState {
    /// Reads `dir`'s `vm.json`.
    pub fn load(dir: &Path) -> Result<MachineState, SnapshotError> {
        let path = dir.join(STATE_FILE);
        let file = File::open(&path).map_err(io("open", &path))?;
        let size = file.metadata().map_err(io("read", &path))?.len();
        if size > MAX_STATE {
            return Err(SnapshotError::TooBig { path, size });
        }
        let state: MachineState = serde_json::from_reader(std::io::BufReader::new(file)).map_err(|source| SnapshotError::Format { path: path.clone(), source })?;
        if state.format != FORMAT {
            return Err(SnapshotError::Version { found: state.format });
        }
        Ok(state)
    }

    /// Refuses a host whose KVM offers another CPU than the one the saved guest booted on.
    pub fn check_cpu(&self, offered: &[kvm_bindings::kvm_cpuid_entry2]) -> Result<(), SnapshotError> {
        // What KVM reports of the CPU it runs the ioctl on (APIC ids, topology), which differs
        // from one host CPU to the next and which every vCPU gets its own of, is left out.
        let key = |e: &kvm_bindings::kvm_cpuid_entry2| match e.function {
            0x1 => Some((e.function, e.index, e.flags, e.eax, 0, e.ecx, e.edx)),
            0xb | 0x1f => Some((e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, 0)),
            0x8000_001e => None,
            _ => Some((e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)),
        };
        let sorted = |entries: &[kvm_bindings::kvm_cpuid_entry2]| {
            let mut keys: Vec<_> = entries.iter().filter_map(key).collect();
            keys.sort_unstable();
            keys
        };
        if sorted(&self.cpuid) != sorted(offered) {
            return Err(SnapshotError::Mismatch { saved: "on a host whose KVM offers another CPU (CPUID)".into(), asked: "this host's".into() });
        }
        Ok(())
    }

    /// Refuses a VM made differently from the saved one (its devices once they exist).
    pub fn check(&self, memory_mib: u64, vcpus: u8, devices: Option<&[String]>) -> Result<(), SnapshotError> {
        let saved_devices: Vec<&str> = self.devices.iter().map(|d| d.name.as_str()).collect();
        let mismatch = |saved: String, asked: String| Err(SnapshotError::Mismatch { saved, asked });
        if self.memory_mib != memory_mib {
            return mismatch(format!("with {} MiB of memory", self.memory_mib), format!("{memory_mib} MiB"));
        }
        if self.vcpus.len() != usize::from(vcpus) {
            return mismatch(format!("with {} vCPUs", self.vcpus.len()), format!("{vcpus}"));
        }
        match devices {
            Some(devices) if saved_devices != devices.iter().map(String::as_str).collect::<Vec<_>>() => {
                mismatch(format!("with the devices [{}]", saved_devices.join(", ")), format!("[{}]", devices.join(", ")))
            }
            _ => Ok(()),
        }
    }
}

/// What a running VM's snapshot is taken from.
pub struct Machine {
    /// Weak: the VM is freed when its vCPUs are joined, whoever still holds a controller.
    pub vm: Weak<Vm>,
    pub mmio: Arc<MmioBus>,
    pub serial: Arc<Mutex<SerialConsole>>,
    pub memory_mib: u64,
    pub vcpus: usize,
}

/// What a snapshot took.
#[derive(Debug)]
pub struct Saved {
    pub memory_bytes: u64,
    pub state_bytes: u64,
}

impl Machine {
    /// Saves the paused VM into `dir` (created if missing; a snapshot there is replaced).
    /// `kick` kicks the vCPUs out of KVM_RUN. The VM can be resumed afterwards.
    pub fn save(&self, dir: &Path, control: &VcpuControl, kick: impl Fn()) -> Result<Saved, SnapshotError> {
        let vm = self.vm.upgrade().ok_or(SnapshotError::Ended)?;
        if !control.paused() {
            return Err(SnapshotError::Vcpus(SaveError::NotPaused("running")));
        }
        // The devices first: once they are still, no interrupt reaches a vCPU whose LAPIC was
        // already read (an edge would be lost in between).
        let transports: Vec<_> = self.mmio.devices().cloned().collect();
        let mut devices = Vec::new();
        let mut asked = Vec::new();
        let mut result = Ok(());
        for t in &transports {
            // Thawed afterwards whatever freeze answered: a worker that failed waits too.
            asked.push(t.clone());
            match lock(t).freeze() {
                Ok(state) => devices.push(state),
                Err(e) => {
                    result = Err(SnapshotError::from(e));
                    break;
                }
            }
        }
        // Nothing writes guest memory now until the memory is saved.
        let saved = result.and_then(|()| {
            let vcpus = control.save_all(self.vcpus, Duration::from_secs(10), kick)?;
            let state =
                MachineState { format: FORMAT, memory_mib: self.memory_mib, cpuid: vm.supported_cpuid.as_slice().to_vec(), vcpus, vm: vm.save_state()?, serial: lock(&self.serial).save(), devices };
            write_snapshot(dir, &state, &vm.memory)
        });
        for t in &asked {
            lock(t).thaw();
        }
        saved
    }
}

fn write_snapshot(dir: &Path, state: &MachineState, memory: &GuestMemoryMmap) -> Result<Saved, SnapshotError> {
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    let memory_path = dir.join(MEMORY_FILE);
    let memory_bytes = save_memory(memory, &memory_path).map_err(io("write", &memory_path))?.bytes;
    let json = serde_json::to_vec(state).map_err(|source| SnapshotError::Format { path: dir.join(STATE_FILE), source })?;
    // The state last, and whole: a directory with a vm.json holds a complete snapshot.
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    let mut f = File::create(&tmp).map_err(io("create", &tmp))?;
    f.write_all(&json).and_then(|()| f.sync_all()).map_err(io("write", &tmp))?;
    std::fs::rename(&tmp, dir.join(STATE_FILE)).map_err(io("rename", &tmp))?;
    Ok(Saved { memory_bytes, state_bytes: json.len() as u64 })
}

/// The guest memory file (a memfd) and where each region starts in it.
fn memory_file(memory: &GuestMemoryMmap) -> std::io::Result<(&File, u64)> {
    let mut file = None;
    let mut len = 0u64;
    for region in memory.iter() {
        let fo = region.file_offset().ok_or_else(|| std::io::Error::new(std::io::ErrorKind::Unsupported, "guest memory without a file"))?;
        file.get_or_insert(fo.file());
        len = len.max(fo.start() + region.len());
    }
    Ok((file.ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no guest memory"))?, len))
}

/// The extents of `file` below `end` that hold data (SEEK_DATA/SEEK_HOLE: pages never written
/// are holes).
fn data_extents(file: &File, end: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut extents = Vec::new();
    let mut at = 0i64;
    while (at as u64) < end {
        // SAFETY: lseek on a descriptor `file` owns; no memory is passed.
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let hole = (hole as u64).min(end);
        if data as u64 >= end {
            break;
        }
        extents.push((data as u64, hole));
        at = hole as i64;
    }
    Ok(extents)
}

/// What a copy of data pages did: bytes written, and the time spent reading the source and
/// writing the pages (the write backs new pages: where a restore's memory time goes).
#[derive(Debug, Default, Clone, Copy)]
pub struct Copied {
    pub bytes: u64,
    pub read: Duration,
    pub write: Duration,
}

/// Copies the pages of `from` (below `end`) that hold anything but zeros into `to` at the
/// same offsets.
fn copy_data_pages(from: &File, to: &File, end: u64) -> std::io::Result<Copied> {
    let mut buf = vec![0u8; 1 << 20];
    let mut copied = Copied::default();
    for (start, stop) in data_extents(from, end)? {
        let mut at = start;
        while at < stop {
            let n = (buf.len() as u64).min(stop - at) as usize;
            let reading = Instant::now();
            from.read_exact_at(&mut buf[..n], at)?;
            copied.read += reading.elapsed();
            // Each run of pages with data is one write: a write per page cost a restore in L1
            // (every system call emulated) most of its setup time.
            let data: Vec<bool> = buf[..n].chunks(PAGE).map(|page| page.iter().any(|&b| b != 0)).collect();
            let mut page = 0;
            while page < data.len() {
                if !data[page] {
                    page += 1;
                    continue;
                }
                let run = data[page..].iter().take_while(|&&d| d).count();
                let (lo, hi) = (page * PAGE, ((page + run) * PAGE).min(n));
                let writing = Instant::now();
                to.write_all_at(&buf[lo..hi], at + lo as u64)?;
                copied.write += writing.elapsed();
                copied.bytes += (hi - lo) as u64;
                page += run;
            }
            at += n as u64;
        }
    }
    Ok(copied)
}

/// Writes the guest's memory to a new sparse file at `path`: only the pages with data.
fn save_memory(memory: &GuestMemoryMmap, path: &Path) -> std::io::Result<Copied> {
    let (from, len) = memory_file(memory)?;
    let _ = std::fs::remove_file(path);
    let to = std::fs::OpenOptions::new().write(true).create_new(true).open(path)?;
    to.set_len(len)?;
    copy_data_pages(from, &to, len)
}

/// New guest memory of `mib` MiB holding a copy of the snapshot's memory in `dir`, and what the
/// copy did.
pub fn restore_memory(dir: &Path, mib: u64) -> Result<(GuestMemoryMmap, Copied), SnapshotError> {
    let path = dir.join(MEMORY_FILE);
    let from = File::open(&path).map_err(io("open", &path))?;
    let len = from.metadata().map_err(io("read", &path))?.len();
    if len != mib << 20 {
        return Err(SnapshotError::Mismatch { saved: format!("with a memory file of {len} bytes"), asked: format!("{mib} MiB") });
    }
    let memory = crate::vstate::memory::create(mib)?;
    let (to, _) = memory_file(&memory).map_err(io("set up guest memory for", &path))?;
    // Zero pages are checked for here too: a file system without SEEK_DATA reports the whole
    // file as data, and writing its zeros would back every page of the new VM's memory.
    let copied = copy_data_pages(&from, to, len).map_err(io("read", &path))?;
    Ok((memory, copied))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    /// KVM's supported CPUID read on each host CPU in turn: the check must take them as one
    /// CPU (they differ in the APIC ids of the CPU the ioctl ran on), or a restore fails on
    /// whichever CPU its hull-vmm happens to start.
    #[test]
    fn the_cpu_check_takes_every_host_cpu_as_the_same_cpu() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("SKIP the_cpu_check_takes_every_host_cpu_as_the_same_cpu: no /dev/kvm");
            return;
        };
        let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| {
                // SAFETY: a zeroed cpu_set_t is valid; sched_getaffinity fills it for this thread.
                let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
                // SAFETY: as above; CPU_ISSET reads the set.
                unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 && libc::CPU_ISSET(c, &set) }
            })
            .collect();
        let on = |cpu: usize| {
            std::thread::spawn(move || {
                // SAFETY: a zeroed set with one CPU, for this thread alone.
                unsafe {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu, &mut set);
                    assert_eq!(libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set), 0);
                }
                kvm_ioctls::Kvm::new().unwrap().get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES).unwrap().as_slice().to_vec()
            })
            .join()
            .unwrap()
        };
        drop(kvm);
        let first = on(cpus[0]);
        let saved = MachineState { format: FORMAT, memory_mib: 0, cpuid: first, vcpus: Vec::new(), vm: VmState::default(), serial: SavedSerial::default(), devices: Vec::new() };
        for &cpu in &cpus {
            saved.check_cpu(&on(cpu)).unwrap_or_else(|e| panic!("CPU {cpu}: {e}"));
        }
        let mut other = on(cpus[0]);
        if let Some(e) = other.iter_mut().find(|e| e.function == 0x7 && e.index == 0) {
            e.ebx ^= 1 << 5; // AVX2
            assert!(saved.check_cpu(&other).is_err(), "a CPU with another feature is refused");
        }
    }

    #[test]
    fn memory_round_trips_through_a_sparse_file_of_its_data_pages() {
        let mem = crate::vstate::memory::create(4).expect("memory");
        mem.write_slice(&[0xaa; 3 * PAGE], GuestAddress(0x1000)).expect("write");
        mem.write_obj(0x1234_5678u32, GuestAddress((3 << 20) + 8)).expect("write");
        // A page written with zeros only is left out.
        mem.write_slice(&[0; PAGE], GuestAddress(0x20_0000)).expect("write");
        // A run of pages across the copy's 1 MiB reads.
        mem.write_slice(&[0xbb; 2 * PAGE], GuestAddress((1 << 20) - PAGE as u64)).expect("write");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(MEMORY_FILE);
        let written = save_memory(&mem, &path).expect("save").bytes;
        assert_eq!(written, 6 * PAGE as u64, "three pages of 0xaa, two of 0xbb and one with the word");
        let (restored, copied) = restore_memory(dir.path(), 4).expect("restore");
        assert_eq!(copied.bytes, written, "the restore writes the saved pages back, no more");
        let (file, _) = memory_file(&restored).expect("memory file");
        let backed = std::os::unix::fs::MetadataExt::blocks(&file.metadata().expect("stat")) * 512;
        assert_eq!(backed, 6 * PAGE as u64, "only the data pages are written into the new memory");
        let mut a = vec![0u8; 4 << 20];
        let mut b = vec![1u8; 4 << 20];
        mem.read_slice(&mut a, GuestAddress(0)).expect("read");
        restored.read_slice(&mut b, GuestAddress(0)).expect("read");
        assert!(a == b, "the restored memory is the saved memory");
        assert!(matches!(restore_memory(dir.path(), 8), Err(SnapshotError::Mismatch { .. })), "another memory size is refused");
    }
}
