//! What a VM is made of, as its user states it: kernel, initramfs, command line, vCPUs, memory,
//! console and devices. `builder::start` turns a `VmConfig` into a running VM; the device
//! configs here are what `device_manager` attaches.

use std::io::Write;
use std::path::PathBuf;

/// What the guest kernel needs on a machine with only these devices: the console on COM1, no
/// PCI probing, no ACPI (hull-vmm describes the machine with an MP table; hull's guest kernel
/// has ACPI for QEMU's pc machine), the i8042 without its keyboard and mouse probes.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off acpi=off i8042.noaux i8042.nomux i8042.dumbkbd";

pub struct VmConfig {
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u8,
    pub memory_mib: u64,
    /// Where COM1's output goes.
    pub console: Box<dyn Write + Send>,
    pub devices: Devices,
    /// Install seccomp filters on the vCPU and device threads (off only for debugging).
    pub seccomp: bool,
    /// With seccomp: the unprivileged uid and gid every thread but the virtio-fs workers takes
    /// before its filter (a hull-vmm that runs as root only to serve a share).
    pub thread_user: Option<(u32, u32)>,
    /// A snapshot directory (`hull-vmm ctl ... snapshot DIR`) to restore instead of booting:
    /// the kernel, initramfs and command line are then the snapshot's (in its memory), and the
    /// rest of this configuration must be the saved VM's but for the devices' identities.
    pub restore: Option<PathBuf>,
}

/// The virtio devices of a VM. The guest sees disks first (vda, vdb, ... in this order), then
/// the NICs, vsock, the shares, rng and the balloon.
#[derive(Debug, Default, Clone)]
pub struct Devices {
    pub disks: Vec<DiskConfig>,
    pub nics: Vec<NicConfig>,
    pub vsock: Option<VsockConfig>,
    pub shares: Vec<ShareConfig>,
    pub rng: bool,
    /// A virtio-balloon that only takes free page reports (see `devices::virtio::balloon`).
    pub free_page_reporting: bool,
    /// A read-only file on virtio-pmem (the guest's root image, see `devices::virtio::pmem`).
    pub pmem: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct NicConfig {
    pub tap: TapSource,
    /// The guest NIC's MAC address.
    pub mac: [u8; 6],
}

#[derive(Debug, Clone)]
pub enum TapSource {
    /// Opened (created if missing) by name.
    Name(String),
    /// An open tap fd this process owns (the shim hands it over as a child's fd).
    Fd(i32),
    /// No tap: a NIC with no cable, for a VM a snapshot is made of (each VM restored from it
    /// gets a tap of its own).
    None,
}

#[derive(Debug, Clone)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
    /// What GET_ID answers (/sys/block/vdX/serial), at most 20 bytes.
    pub id: String,
}

#[derive(Debug, Clone)]
pub struct VsockConfig {
    pub guest_cid: u64,
    /// The hybrid vsock's host socket (`CONNECT <port>`; guest connections go to `<uds>_<port>`).
    pub uds: PathBuf,
}

#[derive(Debug, Clone)]
pub struct ShareConfig {
    pub tag: String,
    pub server: ShareServer,
}

/// Who serves a share's files.
#[derive(Debug, Clone)]
pub enum ShareServer {
    /// This process, the directory: its virtio-fs worker keeps the process's privileges.
    InProcess(PathBuf),
    /// A vhost-user fs backend (`hull-vmm vhost-user fs`) listening on this socket, in a
    /// process (and jail) of its own.
    VhostUser(PathBuf),
}
