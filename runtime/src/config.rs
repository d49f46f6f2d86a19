//! hull's configuration: one TOML file, `/etc/hull/config.toml` by default, overridden by the
//! runtime option `ConfigPath` (containerd's runtime options) or `HULL_CONFIG`. Every key is
//! optional; a missing file means all defaults. An unknown key is an error (a typo should not
//! silently fall back to a default).
//!
//! ```toml
//! # builtin | qemu | auto. auto: builtin (hull-vmm) where KVM has VMX/SVM, else QEMU with
//! # TCG. qemu: QEMU with KVM where it can, else TCG.
//! hypervisor = "auto"
//! # The guest kernel and root (hull-guest-image build output): the root image on virtio-pmem,
//! # or with image = "" the initramfs. A config that
//! # names an initramfs and no image boots the initramfs.
//! kernel = "/usr/share/hull/vmlinux"
//! image = "/usr/share/hull/root.erofs"
//! initramfs = "/usr/share/hull/initramfs.cpio"
//! # QEMU binary and hull-vmm binary (the builtin VMM; the device backends under QEMU).
//! qemu = "qemu-system-x86_64"
//! vmm = "<directory of the shim>/hull-vmm"
//! # Pod VM size before the containers' limits are added.
//! vcpus = 1
//! memory_mib = 256
//! # Seconds for the VM to boot and the agent to answer.
//! boot_timeout_secs = 60
//! # Words appended to the guest kernel's command line, for either engine.
//! kernel_params = ""
//! # Keep the guest console in <state dir>/<sandbox>/console.log.
//! debug_console = false
//! # The most each VM log (guest console, VMM and device messages) keeps, in KiB: the
//! # newest output, under a line saying how much older output was dropped.
//! vm_log_kib = 1024
//! # The most host files each VM process may hold open (RLIMIT_NOFILE of hull-vmm and the
//! # device backends). The guest's shared filesystem holds one open for every file the guest
//! # has cached and not forgotten: this bounds the host memory a guest can pin that way; a
//! # guest that caches more sees "Too many open files" until it forgets some. A lower limit
//! # the shim inherits stays.
//! vm_open_files = 262144
//! # Run every host process of a pod VM (hull-vmm, or QEMU, and the device backends) in a jail:
//! # new mount, pid, ipc, uts and network namespaces, a per-pod root holding only what the
//! # process needs, no_new_privs, no core dumps. A process that serves the pod's share runs as
//! # uid 0 with only the capabilities of a file server; every other one with none, as the
//! # pod's own uid (the first of jail_uid .. jail_uid + jail_uids - 1 no running pod holds) and
//! # jail_gid, its uid allowed at most jail_max_processes processes and threads. Off: they run
//! # as root in the host's namespaces (debugging only).
//! jail = true
//! jail_uid = 2000000000
//! jail_uids = 65536
//! jail_gid = 2000000000
//! jail_max_processes = 1024
//! # tracing filter for the shim's log.
//! log_level = "info"
//! # Start pods from a snapshot of a pod VM booted once to agent ready, instead of booting each
//! # (either engine). One snapshot per engine and VM size is kept in
//! # snapshot_dir, made by the first pod that needs it from a VM no tenant has touched, and
//! # remade when the kernel, initramfs, VMM or kernel_params that made it change. Every
//! # restored pod gets a private copy of the snapshot's memory (README, "Snapshots").
//! snapshots = false
//! snapshot_dir = "/var/lib/hull/snapshots"
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub const DEFAULT_PATH: &str = "/etc/hull/config.toml";
pub const ENV_PATH: &str = "HULL_CONFIG";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("Cannot read the hull config {path:?}: {source}.")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("The hull config {path:?} is not valid: {reason}")]
    Parse { path: PathBuf, reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Hypervisor {
    #[default]
    Auto,
    Builtin,
    Qemu,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub hypervisor: Hypervisor,
    pub kernel: PathBuf,
    /// The guest's root as an erofs image on virtio-pmem (`root.erofs` of the guest image).
    /// Empty: boot the initramfs instead.
    pub image: PathBuf,
    pub initramfs: PathBuf,
    pub qemu: PathBuf,
    pub vmm: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub boot_timeout_secs: u64,
    pub kernel_params: String,
    pub debug_console: bool,
    pub vm_log_kib: u64,
    pub vm_open_files: u64,
    pub jail: bool,
    pub jail_uid: u32,
    pub jail_uids: u32,
    pub jail_gid: u32,
    pub jail_max_processes: u64,
    pub log_level: String,
    pub snapshots: bool,
    pub snapshot_dir: PathBuf,
}

/// The directory of the running executable: binaries installed side by side find each other.
pub fn exe_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The guest image directory: beside this program in a cargo target dir (`guest_dir_beside`),
/// else the installed location, /usr/share/hull.
pub fn guest_dir() -> PathBuf {
    guest_dir_beside(&exe_dir()).unwrap_or_else(|| PathBuf::from("/usr/share/hull"))
}

/// The guest image of the cargo target dir that holds the binaries in `bin_dir`, if it has a
/// kernel: target/guest from target/<triple>/<profile>/, or from target/<profile>/ in a build
/// that names no target.
pub fn guest_dir_beside(bin_dir: &Path) -> Option<PathBuf> {
    ["../../guest", "../guest"].map(|d| bin_dir.join(d)).into_iter().find(|g| g.join(GUEST_KERNEL).exists())
}

/// The kernel pods boot, in a guest image directory (`hull-guest-image build`): the ELF vmlinux,
/// uncompressed, which hull-vmm enters at its 64-bit entry and QEMU through its PVH note (a
/// bzImage works too, and decompresses itself first).
pub const GUEST_KERNEL: &str = "vmlinux";
/// The guest's root image in a guest image directory: the initramfs's files as erofs, which a
/// VM maps read-only on virtio-pmem (`GuestRoot::Image`).
pub const ROOT_IMAGE: &str = "root.erofs";

impl Default for Config {
    fn default() -> Config {
        let guest = guest_dir();
        Config {
            hypervisor: Hypervisor::Auto,
            kernel: guest.join(GUEST_KERNEL),
            image: guest.join(ROOT_IMAGE),
            initramfs: guest.join("initramfs.cpio"),
            qemu: "qemu-system-x86_64".into(),
            vmm: exe_dir().join("hull-vmm"),
            vcpus: 1,
            memory_mib: 256,
            boot_timeout_secs: 60,
            kernel_params: String::new(),
            debug_console: false,
            vm_log_kib: 1024,
            vm_open_files: 262144,
            jail: true,
            // Far above the ids of users and of the usual subordinate ranges (100000 up): a
            // pod process owns nothing on the host but its socket directory.
            jail_uid: 2_000_000_000,
            jail_uids: 65536,
            jail_gid: 2_000_000_000,
            // QEMU with its vCPU, I/O and RCU threads and the vsock backend use a few dozen.
            jail_max_processes: 1024,
            log_level: "info".into(),
            snapshots: false,
            snapshot_dir: "/var/lib/hull/snapshots".into(),
        }
    }
}

impl Config {
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| {
            // One line: the TOML crate's own message draws the source over several.
            let line = e.span().map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            let reason = match line {
                Some(l) => format!("line {l}: {}", e.message()),
                None => e.message().to_string(),
            };
            ConfigError::Parse { path: path.into(), reason }
        })?;
        if cfg.vcpus == 0 || cfg.memory_mib < 64 {
            return Err(ConfigError::Parse { path: path.into(), reason: "vcpus must be at least 1 and memory_mib at least 64".into() });
        }
        if cfg.kernel_params.len() > 1024 || cfg.kernel_params.chars().any(|c| c.is_control() && c != ' ') {
            return Err(ConfigError::Parse { path: path.into(), reason: "kernel_params must be one line of at most 1024 characters".into() });
        }
        if !(4..=1 << 20).contains(&cfg.vm_log_kib) {
            return Err(ConfigError::Parse { path: path.into(), reason: "vm_log_kib must be between 4 and 1048576".into() });
        }
        if !(64..=1 << 20).contains(&cfg.vm_open_files) {
            return Err(ConfigError::Parse { path: path.into(), reason: "vm_open_files must be between 64 and 1048576".into() });
        }
        if cfg.jail && (cfg.jail_uid == 0 || cfg.jail_gid == 0) {
            return Err(ConfigError::Parse { path: path.into(), reason: "jail_uid and jail_gid must not be 0 (root)".into() });
        }
        // The last uid of the range must be a uid (u32::MAX is the kernel's "no uid").
        if cfg.jail_uids == 0 || cfg.jail_uid.checked_add(cfg.jail_uids).is_none() {
            return Err(ConfigError::Parse { path: path.into(), reason: "jail_uids must be at least 1 and jail_uid + jail_uids below 4294967296".into() });
        }
        if !(16..=1 << 20).contains(&cfg.jail_max_processes) {
            return Err(ConfigError::Parse { path: path.into(), reason: "jail_max_processes must be between 16 and 1048576".into() });
        }
        // A config that names an initramfs and no image boots that initramfs, as it did before
        // pods had a root image: the default image must not silently win over it.
        if let Ok(table) = text.parse::<toml::Table>() {
            if table.contains_key("initramfs") && !table.contains_key("image") {
                cfg.image = PathBuf::new();
            }
        }
        Ok(cfg)
    }

    /// What pods boot as their root: the image unless it is set empty.
    pub fn root(&self) -> crate::hypervisor::GuestRoot {
        if self.image.as_os_str().is_empty() {
            crate::hypervisor::GuestRoot::Initramfs(self.initramfs.clone())
        } else {
            crate::hypervisor::GuestRoot::Image(self.image.clone())
        }
    }

    /// The jail of the pod VMs' processes, if they are jailed.
    pub fn jail(&self) -> Option<crate::hypervisor::jail::Jail> {
        self.jail.then_some(crate::hypervisor::jail::Jail { uid: self.jail_uid, gid: self.jail_gid, max_processes: self.jail_max_processes, leased: false })
    }

    /// Loads `explicit` (the runtime option), else `$HULL_CONFIG`, else the default path. Only
    /// the default path may be missing.
    pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        let env = std::env::var_os(ENV_PATH).filter(|v| !v.is_empty()).map(PathBuf::from);
        let (path, required) = match (explicit, env) {
            (Some(p), _) => (p.to_path_buf(), true),
            (None, Some(p)) => (p, true),
            (None, None) => (PathBuf::from(DEFAULT_PATH), false),
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => Config::parse(&path, &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Ok(Config::default()),
            Err(source) => Err(ConfigError::Read { path, source }),
        }
    }
}

/// The `ConfigPath` of containerd's runtime options (`runtimeoptions.v1.Options`), from the
/// serialized Any containerd writes to the shim's stdin at start.
pub fn config_path_from_options(any_bytes: &[u8]) -> Option<PathBuf> {
    use protobuf::Message;
    let any = protobuf::well_known_types::any::Any::parse_from_bytes(any_bytes).ok()?;
    config_path_from_any(&any)
}

/// The `ConfigPath` of the runtime options a Create carries.
pub fn config_path_from_any(any: &protobuf::well_known_types::any::Any) -> Option<PathBuf> {
    use protobuf::Message;
    if !any.type_url.ends_with("runtimeoptions.v1.Options") {
        return None;
    }
    let options = hull_proto::runtimeoptions::Options::parse_from_bytes(&any.value).ok()?;
    Some(PathBuf::from(options.config_path)).filter(|p| !p.as_os_str().is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_path_comes_out_of_runtime_options() {
        // runtimeoptions.v1.Options{type_url: "x", config_path: "/etc/hull/a.toml"}, as
        // containerd encodes it (field 1 then field 2, length-delimited).
        let mut value = vec![0x0a, 1, b'x', 0x12, 16];
        value.extend(b"/etc/hull/a.toml");
        let any = protobuf::well_known_types::any::Any { type_url: "runtimeoptions.v1.Options".into(), value, ..Default::default() };
        assert_eq!(config_path_from_any(&any).as_deref(), Some(Path::new("/etc/hull/a.toml")));
        let other = protobuf::well_known_types::any::Any { type_url: "containerd.runc.v1.Options".into(), ..Default::default() };
        assert_eq!(config_path_from_any(&other), None);
        assert_eq!(config_path_from_options(b"\xff\xff"), None);
        assert_eq!(config_path_from_options(b""), None);
    }

    #[test]
    fn the_root_is_the_image_unless_a_config_names_only_an_initramfs() {
        use crate::hypervisor::GuestRoot;
        let root = |text: &str| Config::parse(Path::new("t.toml"), text).unwrap().root();
        assert!(matches!(root(""), GuestRoot::Image(p) if p.ends_with(ROOT_IMAGE)));
        assert_eq!(root("initramfs = \"/i\"\n"), GuestRoot::Initramfs("/i".into()));
        assert_eq!(root("initramfs = \"/i\"\nimage = \"/r\"\n"), GuestRoot::Image("/r".into()));
        assert_eq!(root("image = \"\"\n"), GuestRoot::Initramfs(Config::default().initramfs));
    }

    #[test]
    fn every_key_parses_and_missing_keys_keep_their_defaults() {
        let cfg = Config::parse(Path::new("t.toml"), "hypervisor = \"qemu\"\nvcpus = 2\nmemory_mib = 512\nboot_timeout_secs = 5\ndebug_console = true\nlog_level = \"debug\"\nkernel = \"/k\"\ninitramfs = \"/i\"\nqemu = \"/q\"\nvmm = \"/v\"\nkernel_params = \"noxsave quiet\"\nvm_log_kib = 64\nvm_open_files = 4096\njail = false\njail_uid = 5000\njail_uids = 10\njail_gid = 5001\njail_max_processes = 64\n").unwrap();
        assert_eq!((cfg.jail, cfg.jail_uid, cfg.jail_uids, cfg.jail_gid, cfg.jail_max_processes), (false, 5000, 10, 5001, 64));
        assert_eq!(cfg.hypervisor, Hypervisor::Qemu);
        assert_eq!((cfg.vcpus, cfg.memory_mib, cfg.boot_timeout_secs), (2, 512, 5));
        assert!(cfg.debug_console);
        assert_eq!(cfg.kernel, Path::new("/k"));
        assert_eq!((cfg.kernel_params.as_str(), cfg.vm_log_kib, cfg.vm_open_files), ("noxsave quiet", 64, 4096));
        let cfg = Config::parse(Path::new("t.toml"), "").unwrap();
        assert_eq!(cfg.hypervisor, Hypervisor::Auto);
        assert_eq!((cfg.vcpus, cfg.memory_mib), (1, 256));
        assert!(cfg.jail().is_some(), "jailed by default");
    }

    #[test]
    fn typos_bad_values_and_unreadable_files_are_named() {
        let err = Config::parse(Path::new("/etc/hull/x.toml"), "vcpu = 2").unwrap_err().to_string();
        assert!(err.contains("/etc/hull/x.toml") && err.contains("vcpu"), "{err}");
        let err = Config::parse(Path::new("x.toml"), "hypervisor = \"xen\"").unwrap_err().to_string();
        assert!(err.contains("xen"), "{err}");
        let err = Config::parse(Path::new("x.toml"), "vcpus = 0").unwrap_err().to_string();
        assert!(err.contains("vcpus"), "{err}");
        let err = Config::parse(Path::new("x.toml"), "vm_log_kib = 1").unwrap_err().to_string();
        assert!(err.contains("vm_log_kib"), "{err}");
        let err = Config::parse(Path::new("x.toml"), "kernel_params = \"a\\nb\"").unwrap_err().to_string();
        assert!(err.contains("kernel_params"), "{err}");
        let err = Config::parse(Path::new("x.toml"), "jail_uid = 0").unwrap_err().to_string();
        assert!(err.contains("jail_uid"), "{err}");
        let err = Config::parse(Path::new("x.toml"), "jail_uid = 4294967000\njail_uids = 1000").unwrap_err().to_string();
        assert!(err.contains("jail_uids"), "{err}");
        let err = Config::parse(Path::new("x.toml"), "jail_max_processes = 1").unwrap_err().to_string();
        assert!(err.contains("jail_max_processes"), "{err}");
        let err = Config::load(Some(Path::new("/nonexistent/hull.toml"))).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/hull.toml"), "{err}");
    }
}
