//! The build: kernel (cached by config hash), static hull-agent, initramfs, manifest.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cpio::CpioWriter;
use crate::{elf, kconfig};

/// Debian's kernel source package the guest kernel is built from.
pub const KERNEL_SOURCE: &str = "/usr/src/linux-source-6.1.tar.xz";
pub const KERNEL_PACKAGE: &str = "linux-source-6.1";
const AGENT_TARGET: &str = "x86_64-unknown-linux-gnu";

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{what} is missing: {path:?}{hint}")]
    Missing { what: &'static str, path: PathBuf, hint: &'static str },
    #[error("`{cmd}` failed ({status}); its output is in {log:?}, ending with:\n{tail}")]
    Command { cmd: String, status: String, log: PathBuf, tail: String },
    #[error("Building the kernel needs about {} MiB free under {path:?}, but only {} MiB are free.", .need >> 20, .have >> 20)]
    NoSpace { path: PathBuf, need: u64, have: u64 },
    #[error("Cannot run `{cmd}`: {source}.")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("The built kernel config lacks options the fragment asks for: {}.", .0.join(", "))]
    Config(Vec<String>),
    #[error(transparent)]
    Elf(#[from] elf::ElfError),
    #[error(transparent)]
    Vmlinux(#[from] crate::vmlinux::VmlinuxError),
    #[error("{what} {path:?}: {source}.")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
}

pub struct Options {
    /// The workspace root (guest-image/ and agent/ are below it).
    pub workspace: PathBuf,
    /// Where everything goes (target/guest).
    pub out: PathBuf,
    /// Apply the kvm_pvm compatibility patches (harmless on normal KVM).
    pub pvm_patches: bool,
    pub jobs: usize,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub kernel_release: String,
    pub kernel_package_version: String,
    pub config_hash: String,
    pub pvm_patches: bool,
    pub agent_version: String,
    /// The bzImage.
    pub kernel: PathBuf,
    pub kernel_bytes: u64,
    /// The ELF vmlinux out of it, which pods boot (`vmlinux`).
    pub vmlinux: PathBuf,
    pub vmlinux_bytes: u64,
    pub initramfs: PathBuf,
    pub initramfs_bytes: u64,
    /// The same root as an erofs image, which pods boot from on virtio-pmem (`root.erofs`).
    pub image: PathBuf,
    pub image_bytes: u64,
    pub kernel_build_seconds: Option<f64>,
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> BuildError + 'a {
    move |source| BuildError::Io { what, path: path.to_path_buf(), source }
}

/// Runs a command, its output to `log`; fails naming the command.
fn run(cmd: &mut Command, log: &Path) -> Result<(), BuildError> {
    let text = format!("{cmd:?}");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io_err("Cannot open the build log", log))?;
    let err = file.try_clone().map_err(io_err("Cannot open the build log", log))?;
    let status = cmd
        .stdout(file)
        .stderr(err)
        .status()
        .map_err(|source| BuildError::Spawn { cmd: text.clone(), source })?;
    if status.success() {
        Ok(())
    } else {
        Err(BuildError::Command { cmd: text, status: status.to_string(), log: log.into(), tail: log_tail(log, 12) })
    }
}

/// The last `lines` lines of a build log, indented, so a failure in CI shows its cause
/// (the log itself stays on the machine that failed).
fn log_tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read(log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].iter().map(|l| format!("    {l}\n")).collect()
}

/// The unpacked source plus objects of the microVM config (measured: ~1.4 GB), with room.
const KERNEL_BUILD_BYTES: u64 = 2 << 30;

fn check_free_space(dir: &Path, need: u64) -> Result<(), BuildError> {
    // statvfs failing (odd filesystems) is not a reason to refuse; the build will say.
    if let Ok(st) = nix::sys::statvfs::statvfs(dir) {
        let have = (st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64);
        if have < need {
            return Err(BuildError::NoSpace { path: dir.to_path_buf(), need, have });
        }
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String, BuildError> {
    let text = format!("{cmd:?}");
    let out = cmd.output().map_err(|source| BuildError::Spawn { cmd: text, source })?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn patches(opts: &Options) -> Result<Vec<PathBuf>, BuildError> {
    if !opts.pvm_patches {
        return Ok(Vec::new());
    }
    let dir = opts.workspace.join("guest-image/patches");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(io_err("Cannot list the patches in", &dir))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "patch"))
        .collect();
    v.sort();
    Ok(v)
}

/// The kernel's cache key: source package version, config fragment, patches.
pub fn config_hash(package_version: &str, fragment: &[u8], patches: &[(String, Vec<u8>)]) -> String {
    let mut h = Sha256::new();
    h.update(package_version.as_bytes());
    h.update([0]);
    h.update(fragment);
    for (name, body) in patches {
        h.update([0]);
        h.update(name.as_bytes());
        h.update([0]);
        h.update(body);
    }
    h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// What the kernel build depends on, and its cache key.
pub struct KernelInputs {
    pub hash: String,
    pub package_version: String,
    pub fragment_path: PathBuf,
    pub fragment: Vec<u8>,
    pub patches: Vec<PathBuf>,
}

pub fn kernel_inputs(opts: &Options) -> Result<KernelInputs, BuildError> {
    let fragment_path = opts.workspace.join("guest-image/kernel/microvm.config");
    let fragment = std::fs::read(&fragment_path).map_err(io_err("Cannot read the config fragment", &fragment_path))?;
    if !Path::new(KERNEL_SOURCE).exists() {
        return Err(BuildError::Missing {
            what: "The kernel source",
            path: KERNEL_SOURCE.into(),
            hint: " (apt-get install linux-source-6.1)",
        });
    }
    let package_version = output(Command::new("dpkg-query").args(["-W", "-f=${Version}", KERNEL_PACKAGE]))?;
    let patches = patches(opts)?;
    let mut bodies = Vec::new();
    for p in &patches {
        let body = std::fs::read(p).map_err(io_err("Cannot read patch", p))?;
        bodies.push((p.file_name().unwrap_or_default().to_string_lossy().into_owned(), body));
    }
    let hash = config_hash(&package_version, &fragment, &bodies);
    Ok(KernelInputs { hash, package_version, fragment_path, fragment, patches })
}

pub fn build(opts: &Options) -> Result<Manifest, BuildError> {
    std::fs::create_dir_all(&opts.out).map_err(io_err("Cannot create", &opts.out))?;
    let KernelInputs { hash, package_version, fragment_path, fragment, patches: patch_files } = kernel_inputs(opts)?;
    let kdir = opts.out.join(format!("kernel-{hash}"));
    let bzimage = kdir.join("bzImage");
    let release_file = kdir.join("release");
    let mut kernel_build_seconds = None;
    if !bzimage.exists() || !release_file.exists() {
        let t = Instant::now();
        build_kernel(opts, &kdir, &fragment_path, &fragment, &patch_files)?;
        kernel_build_seconds = Some(t.elapsed().as_secs_f64());
    }
    let kernel_release = std::fs::read_to_string(&release_file).map_err(io_err("Cannot read", &release_file))?.trim().to_string();

    let agent = build_agent(opts)?;
    let agent_bytes = std::fs::read(&agent).map_err(io_err("Cannot read the agent", &agent))?;
    elf::check_static(&agent.to_string_lossy(), &agent_bytes)?;
    let initramfs = opts.out.join("initramfs.cpio");
    write_initramfs(&initramfs, &agent_bytes)?;
    let image = opts.out.join(ROOT_IMAGE);
    write_root_image(&opts.out, &image, &agent_bytes)?;

    let link = opts.out.join("bzImage");
    let _ = std::fs::remove_file(&link);
    std::fs::copy(&bzimage, &link).map_err(io_err("Cannot copy the kernel to", &link))?;
    let vmlinux = opts.out.join("vmlinux");
    let elf = crate::vmlinux::from_bzimage(&std::fs::read(&bzimage).map_err(io_err("Cannot read", &bzimage))?)?;
    let elf = crate::vmlinux::without_padding(&elf)?;
    std::fs::write(&vmlinux, elf).map_err(io_err("Cannot write", &vmlinux))?;
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let manifest = Manifest {
        kernel_release,
        kernel_package_version: package_version,
        config_hash: hash,
        pvm_patches: opts.pvm_patches,
        agent_version: env!("CARGO_PKG_VERSION").into(),
        kernel_bytes: size(&link),
        kernel: link,
        vmlinux_bytes: size(&vmlinux),
        vmlinux,
        initramfs_bytes: size(&initramfs),
        initramfs,
        image_bytes: size(&image),
        image,
        kernel_build_seconds,
    };
    let mpath = opts.out.join("manifest.json");
    let json = serde_json::to_string_pretty(&manifest).unwrap_or_default();
    std::fs::write(&mpath, json).map_err(io_err("Cannot write", &mpath))?;
    Ok(manifest)
}

fn build_kernel(opts: &Options, kdir: &Path, fragment_path: &Path, fragment: &[u8], patches: &[PathBuf]) -> Result<(), BuildError> {
    let src = kdir.join("src");
    let _ = std::fs::remove_dir_all(kdir);
    std::fs::create_dir_all(&src).map_err(io_err("Cannot create", &src))?;
    check_free_space(&src, KERNEL_BUILD_BYTES)?;
    let log = kdir.join("build.log");
    eprintln!("hull-guest-image: building the kernel in {} (log: {})", src.display(), log.display());
    run(Command::new("tar").args(["xf", KERNEL_SOURCE, "--strip-components=1", "-C"]).arg(&src), &log)?;
    for p in patches {
        run(Command::new("patch").args(["-p1", "--forward", "-i"]).arg(p).current_dir(&src), &log)?;
    }
    run(Command::new("make").arg("allnoconfig").current_dir(&src), &log)?;
    run(Command::new("scripts/kconfig/merge_config.sh").args(["-m", ".config"]).arg(fragment_path).current_dir(&src), &log)?;
    run(Command::new("make").arg("olddefconfig").current_dir(&src), &log)?;
    let config_path = src.join(".config");
    let built = std::fs::read_to_string(&config_path).map_err(io_err("Cannot read", &config_path))?;
    let missing = kconfig::missing(&String::from_utf8_lossy(fragment), &built);
    if !missing.is_empty() {
        return Err(BuildError::Config(missing));
    }
    run(Command::new("make").arg(format!("-j{}", opts.jobs)).arg("bzImage").current_dir(&src), &log)?;
    let release = output(Command::new("make").args(["-s", "kernelrelease"]).current_dir(&src))?;
    let image = src.join("arch/x86/boot/bzImage");
    std::fs::copy(&image, kdir.join("bzImage")).map_err(io_err("Cannot copy", &image))?;
    std::fs::copy(&config_path, kdir.join("config")).map_err(io_err("Cannot copy", &config_path))?;
    // The object tree is 1 GB; the image and its config are what is kept.
    let _ = std::fs::remove_dir_all(&src);
    std::fs::write(kdir.join("release"), release).map_err(io_err("Cannot write", kdir))?;
    Ok(())
}

/// Builds hull-agent as a static binary (gnu target with crt-static; libseccomp linked
/// statically) in its own target directory, so the workspace's builds are not disturbed.
fn build_agent(opts: &Options) -> Result<PathBuf, BuildError> {
    let target_dir = opts.out.join("agent-build");
    std::fs::create_dir_all(&target_dir).map_err(io_err("Cannot create", &target_dir))?;
    let log = opts.out.join("agent-build.log");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run(
        Command::new(cargo)
            .args(["build", "--profile", "guest", "--locked", "-p", "hull-agent", "--target", AGENT_TARGET, "--target-dir"])
            .arg(&target_dir)
            .current_dir(&opts.workspace)
            // Static (the root has no loader) and stripped. Not position-independent: a static-pie
            // relocates itself at every start, 18,000 relocations whose 320 KB of patched
            // pointers are private memory in every agent process, and the agent starts a process
            // of itself for each container and exec (measured under TCG: agent spawn to the
            // helper's main 78 → 29 ms, a container's create 398 → 283 ms). Address-space
            // randomisation of the agent is worth little here: the guest, agent included, is
            // untrusted by the host either way.
            .env("RUSTFLAGS", "-C target-feature=+crt-static -C relocation-model=static -C strip=symbols")
            .env("LIBSECCOMP_LINK_TYPE", "static")
            .env("LIBSECCOMP_LIB_PATH", "/usr/lib/x86_64-linux-gnu"),
        &log,
    )?;
    Ok(target_dir.join(AGENT_TARGET).join("guest/hull-agent"))
}

/// The guest's root: the agent as /init and the directories it mounts on. No shell or other
/// program: nothing but the agent runs outside a container, and every byte here is in guest
/// memory twice while the kernel unpacks it.
fn write_initramfs(path: &Path, agent: &[u8]) -> Result<(), BuildError> {
    let mut w = CpioWriter::new(Vec::with_capacity(agent.len() + 4096));
    let e = |r: std::io::Result<()>| r.map_err(io_err("Cannot write", path));
    for d in ["dev", "etc", "proc", "sys", "run", "tmp", "root"] {
        e(w.dir(d, 0o755))?;
    }
    e(w.char_dev("dev/console", 0o600, 5, 1))?;
    e(w.char_dev("dev/null", 0o666, 1, 3))?;
    e(w.file("init", 0o755, agent))?;
    e(w.file("etc/resolv.conf", 0o644, b""))?;
    let bytes = w.finish().map_err(io_err("Cannot write", path))?;
    if std::fs::read(path).ok().as_deref() != Some(&bytes[..]) {
        std::fs::write(path, &bytes).map_err(io_err("Cannot write", path))?;
    }
    Ok(())
}

/// The root image's name in the guest directory.
pub const ROOT_IMAGE: &str = "root.erofs";
/// virtio-pmem maps its backing in whole 2 MiB pages (the guest hot-plugs it as device memory
/// in subsections of that size), so the image is padded to a multiple.
const PMEM_ALIGN: u64 = 2 << 20;

/// The initramfs's root as an erofs image for a virtio-pmem device: pods map it read-only and
/// the guest reads it through DAX, so neither the archive nor its unpacked files take guest
/// memory, and every pod's VM reads the same host pages of it. Data is not inlined into
/// inodes (`noinline_data`): erofs maps only block-aligned file data through DAX, and the agent
/// is executed in place. Built reproducibly (fixed time, UUID, owner): a snapshot's record of
/// the image (its SHA-256) stays valid across rebuilds of the same agent.
fn write_root_image(out: &Path, image: &Path, agent: &[u8]) -> Result<(), BuildError> {
    use std::os::unix::fs::PermissionsExt;
    let staging = out.join("root-staging");
    let _ = std::fs::remove_dir_all(&staging);
    let mkdir = |d: &Path| std::fs::create_dir_all(d).and_then(|()| std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))).map_err(io_err("Cannot create", d));
    mkdir(&staging)?;
    // Mount points only: the kernel mounts devtmpfs on /dev (DEVTMPFS_MOUNT) before /init runs.
    for d in ["dev", "etc", "proc", "sys", "run", "tmp", "root"] {
        mkdir(&staging.join(d))?;
    }
    let file = |name: &str, mode: u32, bytes: &[u8]| {
        let p = staging.join(name);
        std::fs::write(&p, bytes).and_then(|()| std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))).map_err(io_err("Cannot write", &staging))
    };
    file("init", 0o755, agent)?;
    file("etc/resolv.conf", 0o644, b"")?;
    let tmp = out.join(format!("{ROOT_IMAGE}.new"));
    let log = out.join("root-image.log");
    let _ = std::fs::remove_file(&log);
    run(
        Command::new("mkfs.erofs")
            .args(["-Enoinline_data", "-T0", "-U", "00000000-0000-0000-0000-000000000001", "--all-root", "-x-1", "--quiet"])
            .arg(&tmp)
            .arg(&staging),
        &log,
    )
    .map_err(|e| match e {
        BuildError::Spawn { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            BuildError::Missing { what: "mkfs.erofs", path: "mkfs.erofs".into(), hint: " (apt-get install erofs-utils)" }
        }
        e => e,
    })?;
    let _ = std::fs::remove_dir_all(&staging);
    let mut bytes = std::fs::read(&tmp).map_err(io_err("Cannot read", &tmp))?;
    let padded = (bytes.len() as u64).div_ceil(PMEM_ALIGN) * PMEM_ALIGN;
    bytes.resize(padded as usize, 0);
    // Replaced only when it changed, and then by a rename, never rewritten in place: running
    // VMs map the file, and a guest whose root shrank or changed under it would fault or run
    // other code.
    if std::fs::read(image).ok().as_deref() == Some(&bytes[..]) {
        let _ = std::fs::remove_file(&tmp);
        return Ok(());
    }
    std::fs::write(&tmp, &bytes).map_err(io_err("Cannot write", &tmp))?;
    std::fs::rename(&tmp, image).map_err(io_err("Cannot replace", image))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_cache_key_changes_with_every_input() {
        let base = config_hash("6.1.1", b"CONFIG_A=y", &[("p".into(), b"x".to_vec())]);
        assert_eq!(base.len(), 16);
        assert_eq!(base, config_hash("6.1.1", b"CONFIG_A=y", &[("p".into(), b"x".to_vec())]));
        assert_ne!(base, config_hash("6.1.2", b"CONFIG_A=y", &[("p".into(), b"x".to_vec())]));
        assert_ne!(base, config_hash("6.1.1", b"CONFIG_A=n", &[("p".into(), b"x".to_vec())]));
        assert_ne!(base, config_hash("6.1.1", b"CONFIG_A=y", &[]));
        assert_ne!(base, config_hash("6.1.1", b"CONFIG_A=y", &[("p".into(), b"y".to_vec())]));
    }

    #[test]
    fn a_failed_step_shows_the_end_of_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("build.log");
        let err = run(Command::new("sh").args(["-c", "seq 1 40; echo 'tar: write error: No space left on device' >&2; exit 2"]), &log)
            .unwrap_err()
            .to_string();
        assert!(err.contains("exit status: 2"), "{err}");
        assert!(err.contains("No space left on device"), "{err}");
        assert!(err.contains("    40\n") && !err.contains("    28\n"), "only the last lines: {err}");
    }

    #[test]
    fn too_little_disk_space_is_refused_before_unpacking() {
        let dir = tempfile::tempdir().unwrap();
        check_free_space(dir.path(), 0).unwrap();
        let err = check_free_space(dir.path(), u64::MAX).unwrap_err().to_string();
        assert!(err.starts_with("Building the kernel needs about"), "{err}");
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
    }
}
