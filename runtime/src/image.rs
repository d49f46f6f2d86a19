//! OCI image tarballs for `hull run --image`, without containerd: an OCI image layout
//! (`index.json` + `blobs/`, as `ctr images export` or `skopeo copy ... oci-archive:` write)
//! or `docker save` output (`manifest.json`). The layers are applied in order into a root
//! filesystem directory (gzip or plain tar; whiteouts remove what lower layers put there), and
//! the image's config gives the default command, environment and working directory.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{mkdirat, Mode};

use oci_spec::image::{Arch, ImageConfiguration, ImageIndex, ImageManifest, MediaType, Os};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("Cannot read the image {path:?}: {source}.")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{0:?} is neither an OCI image layout (index.json) nor `docker save` output (manifest.json).")]
    NotAnImage(PathBuf),
    #[error("The image's {what} is malformed: {reason}.")]
    Malformed { what: String, reason: String },
    #[error("The image names a blob it does not contain: {0}.")]
    MissingBlob(String),
    #[error("Cannot apply layer {layer}: {source}.")]
    Layer { layer: String, source: LayerError },
}

/// What the image's config says about running it.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
}

impl ImageConfig {
    /// The process arguments: the entrypoint followed by `args`, or by the image's Cmd when
    /// `args` is empty.
    pub fn command(&self, args: &[String]) -> Vec<String> {
        let mut c = self.entrypoint.clone();
        c.extend_from_slice(if args.is_empty() { &self.cmd } else { args });
        c
    }
}

fn malformed(what: impl Into<String>, reason: impl std::fmt::Display) -> ImageError {
    ImageError::Malformed { what: what.into(), reason: reason.to_string() }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<T, ImageError> {
    let text = std::fs::read(path).map_err(|_| ImageError::MissingBlob(what.into()))?;
    serde_json::from_slice(&text).map_err(|e| malformed(what, e))
}

/// A blob of an OCI layout by digest ("sha256:<hex>"), refusing digests that are not paths
/// inside blobs/.
fn blob_path(layout: &Path, digest: &str) -> Result<PathBuf, ImageError> {
    let (algo, hex) = digest.split_once(':').ok_or_else(|| malformed("digest", digest))?;
    if !algo.chars().all(|c| c.is_ascii_alphanumeric()) || hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(malformed("digest", digest));
    }
    Ok(layout.join("blobs").join(algo).join(hex))
}

/// The manifest of an OCI layout: the index's first linux/amd64 (or only) entry, through a
/// nested index if there is one.
fn oci_manifest(layout: &Path) -> Result<ImageManifest, ImageError> {
    let mut index: ImageIndex = read_json(&layout.join("index.json"), "index.json")?;
    for _ in 0..2 {
        let pick = index
            .manifests()
            .iter()
            .find(|m| m.platform().as_ref().is_none_or(|p| *p.os() == Os::Linux && *p.architecture() == Arch::Amd64))
            .ok_or_else(|| malformed("index", "no linux/amd64 manifest"))?;
        let digest = pick.digest().to_string();
        let path = blob_path(layout, &digest)?;
        // An OCI index, or Docker's manifest list (the same document under its own type).
        let nested = match pick.media_type() {
            MediaType::ImageIndex => true,
            MediaType::Other(t) => t == "application/vnd.docker.distribution.manifest.list.v2+json",
            _ => false,
        };
        if nested {
            index = read_json(&path, &digest)?;
            continue;
        }
        return read_json(&path, &digest);
    }
    Err(malformed("index", "indexes nested too deep"))
}

/// One image of `docker save`'s manifest.json.
#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerImage {
    config: String,
    #[serde(default)]
    layers: Vec<String>,
}

fn image_config(config: &ImageConfiguration) -> ImageConfig {
    let c = config.config().as_ref();
    let strings = |f: fn(&oci_spec::image::Config) -> &Option<Vec<String>>| c.and_then(|c| f(c).clone()).unwrap_or_default();
    ImageConfig {
        entrypoint: strings(oci_spec::image::Config::entrypoint),
        cmd: strings(oci_spec::image::Config::cmd),
        env: strings(oci_spec::image::Config::env),
        working_dir: c.and_then(|c| c.working_dir().clone()).unwrap_or_default(),
    }
}

/// Unpacks the image tarball `tar` into `work` (`work/image` holds the tarball's contents,
/// `work/rootfs` the root filesystem) and returns the rootfs and the image config.
pub fn unpack(tar: &Path, work: &Path) -> Result<(PathBuf, ImageConfig), ImageError> {
    let read_err = |source| ImageError::Read { path: tar.into(), source };
    let layout = work.join("image");
    let rootfs = work.join("rootfs");
    std::fs::create_dir_all(&layout).map_err(read_err)?;
    std::fs::create_dir_all(&rootfs).map_err(read_err)?;
    // Files and directories only: a symlink in the archive (`blobs/sha256/<digest>` ->
    // /etc/shadow) would make a host file the image's config or a layer.
    let mut archive = tar::Archive::new(BufReader::new(File::open(tar).map_err(read_err)?));
    for entry in archive.entries().map_err(read_err)? {
        let mut entry = entry.map_err(read_err)?;
        let kind = entry.header().entry_type();
        if !kind.is_file() && !kind.is_dir() {
            let path = entry.path().map_err(read_err)?.into_owned();
            return Err(malformed("archive", format!("{path:?} is a {kind:?}, not a file or directory")));
        }
        entry.unpack_in(&layout).map_err(read_err)?;
    }
    let (config, layers): (ImageConfiguration, Vec<(String, PathBuf)>) = if layout.join("index.json").exists() {
        let manifest = oci_manifest(&layout)?;
        let config_digest = manifest.config().digest().to_string();
        let config = read_json(&blob_path(&layout, &config_digest)?, &config_digest)?;
        let mut layers = Vec::new();
        for l in manifest.layers() {
            let digest = l.digest().to_string();
            layers.push((digest.clone(), blob_path(&layout, &digest)?));
        }
        (config, layers)
    } else if layout.join("manifest.json").exists() {
        let images: Vec<DockerImage> = read_json(&layout.join("manifest.json"), "manifest.json")?;
        let first = images.first().ok_or_else(|| malformed("manifest.json", "no image"))?;
        let inside = |p: &str| -> Result<PathBuf, ImageError> {
            let rel = Path::new(p);
            if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
                return Err(malformed("manifest.json", format!("path {p:?} leaves the archive")));
            }
            Ok(layout.join(rel))
        };
        let config = read_json(&inside(&first.config)?, &first.config)?;
        let layers = first.layers.iter().map(|l| Ok((l.clone(), inside(l)?))).collect::<Result<_, ImageError>>()?;
        (config, layers)
    } else {
        return Err(ImageError::NotAnImage(tar.into()));
    };
    for (name, path) in &layers {
        apply_layer(path, &rootfs).map_err(|source| ImageError::Layer { layer: name.clone(), source })?;
    }
    Ok((rootfs, image_config(&config)))
}

/// Why a layer cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("cannot read it: {0}")]
    Read(#[source] std::io::Error),
    #[error("the entry {0:?} leaves the root filesystem")]
    Escapes(PathBuf),
    #[error("the entry {entry:?} lies under {through:?}, which is not a directory in the image (a file, or a symlink to nothing in it)")]
    NotADirectory { entry: PathBuf, through: PathBuf },
    #[error("the hard link {entry:?} names {target:?}, which the layers below do not contain")]
    NoLinkTarget { entry: PathBuf, target: PathBuf },
    #[error("cannot unpack {entry:?}: {source}")]
    Unpack { entry: PathBuf, source: std::io::Error },
}

/// An entry's path as components below the root: a leading `/` or `./` is dropped (an
/// absolute entry still lands in the rootfs), `..` is refused by name.
fn below_root(entry: &Path) -> Result<PathBuf, LayerError> {
    let mut rel = PathBuf::new();
    for c in entry.components() {
        match c {
            Component::Normal(n) => rel.push(n),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => return Err(LayerError::Escapes(entry.into())),
        }
    }
    Ok(rel)
}

/// The root filesystem being built, open as a directory. Every directory an entry names is
/// resolved in it with RESOLVE_IN_ROOT: a symlink an earlier layer planted (`etc -> /etc`,
/// `x -> ../../..`) resolves inside the rootfs, as it will for the container, never on the
/// host. The result is a host path without symlinks, so path calls on it stay inside.
struct Root {
    dir: OwnedFd,
    real: PathBuf,
}

impl Root {
    fn open(path: &Path) -> std::io::Result<Root> {
        let real = path.canonicalize()?;
        Ok(Root { dir: File::open(&real)?.into(), real })
    }

    fn open_dir(&self, rel: &Path) -> nix::Result<OwnedFd> {
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        let path = if rel.as_os_str().is_empty() { Path::new(".") } else { rel };
        let fd = openat2(self.dir.as_raw_fd(), path, how)?;
        // SAFETY: openat2 just returned this descriptor and nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// The host path of directory `rel` (already `below_root`) of `entry`; missing levels are
    /// created 0755 when `create`, else None.
    fn dir(&self, entry: &Path, rel: &Path, create: bool) -> Result<Option<PathBuf>, LayerError> {
        let unpack = |source: nix::Error| LayerError::Unpack { entry: entry.into(), source: source.into() };
        let mut at = self.open_dir(Path::new("")).map_err(unpack)?;
        let mut prefix = PathBuf::new();
        for name in rel.iter() {
            prefix.push(name);
            let opened = match self.open_dir(&prefix) {
                Err(Errno::ENOENT) if create => match mkdirat(Some(at.as_raw_fd()), name, Mode::from_bits_truncate(0o755)) {
                    Ok(()) => self.open_dir(&prefix),
                    // A dangling symlink stands there.
                    Err(Errno::EEXIST) => Err(Errno::ENOTDIR),
                    Err(e) => Err(e),
                },
                Err(Errno::ENOENT) => return Ok(None),
                other => other,
            };
            at = match opened {
                Ok(fd) => fd,
                Err(Errno::ENOTDIR) => return Err(LayerError::NotADirectory { entry: entry.into(), through: prefix }),
                Err(e) => return Err(unpack(e)),
            };
        }
        let real = std::fs::read_link(format!("/proc/self/fd/{}", at.as_raw_fd())).map_err(|source| LayerError::Unpack { entry: entry.into(), source })?;
        // RESOLVE_IN_ROOT guarantees this; checked because everything after relies on it.
        if !real.starts_with(&self.real) {
            return Err(LayerError::Escapes(entry.into()));
        }
        Ok(Some(real))
    }
}

/// Applies one layer (plain or gzip tar) onto `rootfs`: `.wh.NAME` removes NAME from below,
/// `.wh..wh..opq` empties its directory of what lower layers put there. Nothing outside
/// `rootfs` is created, removed or linked, whatever the entries' paths or earlier symlinks.
pub fn apply_layer(path: &Path, rootfs: &Path) -> Result<(), LayerError> {
    let mut file = File::open(path).map_err(LayerError::Read)?;
    let mut magic = [0u8; 2];
    let gzip = file.read_exact(&mut magic).is_ok() && magic == [0x1f, 0x8b];
    file.seek(SeekFrom::Start(0)).map_err(LayerError::Read)?;
    let reader: Box<dyn Read> = if gzip { Box::new(flate2::read::GzDecoder::new(BufReader::new(file))) } else { Box::new(BufReader::new(file)) };
    let root = Root::open(rootfs).map_err(LayerError::Read)?;
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_overwrite(true);
    for entry in archive.entries().map_err(LayerError::Read)? {
        let mut entry = entry.map_err(LayerError::Read)?;
        let named = entry.path().map_err(LayerError::Read)?.into_owned();
        let rel = below_root(&named)?;
        let (Some(name), Some(parent)) = (rel.file_name(), rel.parent()) else {
            continue; // the root directory itself
        };
        let unpack = |source| LayerError::Unpack { entry: named.clone(), source };
        let name = name.to_owned();
        if name == ".wh..wh..opq" {
            if let Some(dir) = root.dir(&named, parent, false)? {
                for child in std::fs::read_dir(&dir).map_err(unpack)?.flatten() {
                    remove(&child.path());
                }
            }
            continue;
        }
        if let Some(hidden) = name.to_str().and_then(|n| n.strip_prefix(".wh.")) {
            if let Some(dir) = root.dir(&named, parent, false)? {
                remove(&dir.join(hidden));
            }
            continue;
        }
        let Some(dir) = root.dir(&named, parent, true)? else { continue };
        let target = dir.join(&name);
        // A lower layer's file (or symlink) may stand where this layer puts a directory, or
        // the reverse.
        if let Ok(meta) = std::fs::symlink_metadata(&target) {
            if meta.is_dir() != entry.header().entry_type().is_dir() {
                remove(&target);
            }
        }
        if entry.header().entry_type().is_hard_link() {
            // tar's own unpack would link whatever host path the entry names.
            let linked = entry.link_name().map_err(unpack)?.map(|l| l.into_owned()).unwrap_or_default();
            let linked_rel = below_root(&linked)?;
            let source = match (linked_rel.parent(), linked_rel.file_name()) {
                (Some(p), Some(n)) => root.dir(&named, p, false)?.map(|d| d.join(n)),
                _ => None,
            };
            let Some(source) = source.filter(|s| s.symlink_metadata().is_ok()) else {
                return Err(LayerError::NoLinkTarget { entry: named, target: linked });
            };
            remove(&target);
            std::fs::hard_link(&source, &target).map_err(unpack)?;
        } else {
            entry.unpack(&target).map_err(unpack)?;
        }
    }
    Ok(())
}

fn remove(p: &Path) {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            let _ = std::fs::remove_dir_all(p);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(p);
        }
        Err(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(dir: &Path, name: &str, files: &[(&str, &[u8])], gzip: bool) -> PathBuf {
        let path = dir.join(name);
        let out: Box<dyn std::io::Write> = if gzip {
            Box::new(flate2::write::GzEncoder::new(File::create(&path).unwrap(), flate2::Compression::fast()))
        } else {
            Box::new(File::create(&path).unwrap())
        };
        let mut b = tar::Builder::new(out);
        for (p, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            if p.ends_with('/') {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                h.set_mode(0o755);
            } else {
                h.set_size(data.len() as u64);
                h.set_mode(0o644);
            }
            h.set_cksum();
            b.append_data(&mut h, p, *data).unwrap();
        }
        b.into_inner().unwrap().flush().unwrap();
        path
    }

    use std::io::Write;

    #[test]
    fn layers_stack_with_whiteouts_and_opaque_dirs() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("rootfs");
        std::fs::create_dir(&root).unwrap();
        let l1 = layer(d.path(), "l1.tar", &[("etc/", b""), ("etc/a", b"1"), ("etc/b", b"2"), ("var/", b""), ("var/x", b"x"), ("bin/", b""), ("bin/tool", b"t")], false);
        let l2 = layer(d.path(), "l2.tgz", &[("etc/.wh.a", b""), ("etc/c", b"3"), ("var/.wh..wh..opq", b""), ("var/y", b"y"), ("bin/tool", b"new")], true);
        apply_layer(&l1, &root).unwrap();
        apply_layer(&l2, &root).unwrap();
        assert!(!root.join("etc/a").exists(), "whiteout removes a lower file");
        assert_eq!(std::fs::read(root.join("etc/b")).unwrap(), b"2");
        assert_eq!(std::fs::read(root.join("etc/c")).unwrap(), b"3");
        assert!(!root.join("var/x").exists() && root.join("var/y").exists(), "opaque dir hides the lower layer's content");
        assert_eq!(std::fs::read(root.join("bin/tool")).unwrap(), b"new");
        assert!(!root.join("etc/.wh.a").exists());
    }

    /// One tar entry written header by hand: tar::Builder refuses the absolute and climbing
    /// names a hostile image has.
    enum Raw {
        File(String, &'static [u8]),
        Dir(String),
        Symlink(String, String),
        HardLink(String, String),
    }

    fn raw_layer(path: &Path, entries: &[Raw]) -> PathBuf {
        let mut bytes = Vec::new();
        for e in entries {
            let (name, kind, link, data): (&str, tar::EntryType, &str, &[u8]) = match e {
                Raw::File(n, d) => (n, tar::EntryType::Regular, "", *d),
                Raw::Dir(n) => (n, tar::EntryType::Directory, "", b""),
                Raw::Symlink(n, l) => (n, tar::EntryType::Symlink, l, b""),
                Raw::HardLink(n, l) => (n, tar::EntryType::Link, l, b""),
            };
            let mut h = tar::Header::new_gnu();
            let gnu = h.as_gnu_mut().unwrap();
            gnu.name[..name.len()].copy_from_slice(name.as_bytes());
            gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
            h.set_entry_type(kind);
            h.set_size(data.len() as u64);
            h.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_cksum();
            bytes.extend_from_slice(h.as_bytes());
            bytes.extend_from_slice(data);
            bytes.resize(bytes.len().div_ceil(512) * 512, 0);
        }
        bytes.extend_from_slice(&[0u8; 1024]);
        std::fs::write(path, bytes).unwrap();
        path.into()
    }

    fn listing(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut l: Vec<_> = std::fs::read_dir(dir).unwrap().flatten().map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap_or_default())).collect();
        l.sort();
        l
    }

    /// A hostile image against the host: absolute entries, whiteouts and hard links through
    /// an absolute or climbing symlink an earlier layer planted, and `..`. Each entry lands
    /// inside the rootfs or its layer is refused by name; the host directory the symlinks
    /// point at is untouched.
    #[test]
    fn escaping_entries_stay_in_the_rootfs_or_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("rootfs");
        std::fs::create_dir(&root).unwrap();
        let host = d.path().join("host");
        std::fs::create_dir(&host).unwrap();
        std::fs::write(host.join("victim"), b"keep").unwrap();
        std::fs::write(host.join("shadow"), b"secret").unwrap();
        let before = listing(&host);
        let h = host.to_str().unwrap();
        let base = raw_layer(&d.path().join("base.tar"), &[Raw::Symlink("etc".into(), h.into()), Raw::Symlink("up".into(), "../../../..".into()), Raw::Symlink("dangling".into(), "/nonexistent".into()), Raw::Dir("lib/".into())]);
        apply_layer(&base, &root).unwrap();

        let abs = |n: &str| format!("{h}/{n}");
        let landed: &[(&str, Vec<Raw>)] = &[
            ("absolute whiteout", vec![Raw::File(abs(".wh.victim"), b"")]),
            ("whiteout through an absolute symlink", vec![Raw::File("etc/.wh.victim".into(), b"")]),
            ("opaque whiteout through an absolute symlink", vec![Raw::File("etc/.wh..wh..opq".into(), b"")]),
            ("whiteout through a climbing symlink", vec![Raw::File(format!("up{h}/.wh.shadow"), b"")]),
            ("absolute file", vec![Raw::File(abs("planted2"), b"x")]),
            // Now that `<host>` exists in the rootfs, `etc` resolves to it there.
            ("file through an absolute symlink", vec![Raw::File("etc/planted".into(), b"x")]),
            ("directory through a climbing symlink", vec![Raw::Dir(format!("up{h}/sub/"))]),
        ];
        for (what, entries) in landed {
            let l = raw_layer(&d.path().join("l.tar"), entries);
            apply_layer(&l, &root).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(listing(&host), before, "{what} reached the host");
        }
        let inside = root.join(h.trim_start_matches('/'));
        assert_eq!(std::fs::read(inside.join("planted")).unwrap(), b"x", "resolved in the rootfs");
        assert_eq!(std::fs::read(inside.join("planted2")).unwrap(), b"x", "resolved in the rootfs");

        let refused: &[(&str, Vec<Raw>, &str)] = &[
            ("climbing entry", vec![Raw::File("../escape".into(), b"x")], "leaves the root filesystem"),
            ("file under a symlink to nothing", vec![Raw::File("dangling/f".into(), b"x")], "not a directory"),
            ("hard link to a host file", vec![Raw::HardLink("stolen".into(), abs("shadow"))], "which the layers below do not contain"),
            ("hard link through a symlink", vec![Raw::HardLink("stolen".into(), "etc/shadow".into())], "which the layers below do not contain"),
            ("climbing hard link", vec![Raw::HardLink("stolen".into(), "../host/shadow".into())], "leaves the root filesystem"),
        ];
        for (what, entries, why) in refused {
            let l = raw_layer(&d.path().join("l.tar"), entries);
            let e = apply_layer(&l, &root).err().unwrap_or_else(|| panic!("{what} was applied"));
            assert!(e.to_string().contains(why), "{what}: {e}");
            assert_eq!(listing(&host), before, "{what} reached the host");
        }
        assert!(!d.path().join("escape").exists() && !root.join("stolen").exists());

        // A hard link inside the rootfs still works, through its symlinks resolved inside.
        let l = raw_layer(&d.path().join("l.tar"), &[Raw::File("lib/real".into(), b"r"), Raw::HardLink("lib/alias".into(), "lib/real".into())]);
        apply_layer(&l, &root).unwrap();
        assert_eq!(std::fs::read(root.join("lib/alias")).unwrap(), b"r");
    }

    #[test]
    fn links_in_the_image_archive_and_bad_digests_are_refused() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("secret"), b"{}").unwrap();
        let evil = raw_layer(&d.path().join("evil.tar"), &[Raw::Symlink("index.json".into(), d.path().join("secret").to_str().unwrap().into())]);
        let e = unpack(&evil, &d.path().join("work")).unwrap_err();
        assert!(matches!(e, ImageError::Malformed { .. }) && e.to_string().contains("index.json"), "{e}");
        assert!(blob_path(d.path(), "sha256:../../etc/passwd").is_err());
        assert!(blob_path(d.path(), "sha256:abc123").is_ok());
    }

    #[test]
    fn not_an_image_is_named() {
        let d = tempfile::tempdir().unwrap();
        let t = layer(d.path(), "plain.tar", &[("hello", b"hi")], false);
        let e = unpack(&t, &d.path().join("work")).unwrap_err();
        assert!(matches!(e, ImageError::NotAnImage(_)), "{e}");
    }

    #[test]
    fn command_from_entrypoint_and_cmd() {
        let c = ImageConfig { entrypoint: vec!["/bin/app".into()], cmd: vec!["--serve".into()], ..Default::default() };
        assert_eq!(c.command(&[]), ["/bin/app", "--serve"]);
        assert_eq!(c.command(&["--version".into()]), ["/bin/app", "--version"]);
    }
}
