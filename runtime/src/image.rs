//! OCI image tarballs for `hull run --image`, without containerd: an OCI image layout
//! (`index.json` + `blobs/`, as `ctr images export` or `skopeo copy ... oci-archive:` write)
//! or `docker save` output (`manifest.json`). The layers are applied in order into a root
//! filesystem directory (gzip or plain tar; whiteouts remove what lower layers put there), and
//! the image's config gives the default command, environment and working directory.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

use serde_json::Value;

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
    #[error("Cannot apply layer {layer}: {reason}.")]
    Layer { layer: String, reason: String },
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

fn read_json(path: &Path, what: &str) -> Result<Value, ImageError> {
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

fn digest_of(v: &Value, what: &str) -> Result<String, ImageError> {
    v.get("digest").and_then(Value::as_str).map(str::to_string).ok_or_else(|| malformed(what, "no digest"))
}

/// The manifest of an OCI layout: the index's first linux/amd64 (or only) entry, through a
/// nested index if there is one.
fn oci_manifest(layout: &Path) -> Result<Value, ImageError> {
    let mut index = read_json(&layout.join("index.json"), "index.json")?;
    for _ in 0..2 {
        let manifests = index.get("manifests").and_then(Value::as_array).ok_or_else(|| malformed("index", "no manifests"))?;
        let pick = manifests
            .iter()
            .find(|m| m.pointer("/platform/os").and_then(Value::as_str).is_none_or(|os| os == "linux") && m.pointer("/platform/architecture").and_then(Value::as_str).is_none_or(|a| a == "amd64"))
            .ok_or_else(|| malformed("index", "no linux/amd64 manifest"))?;
        let digest = digest_of(pick, "index entry")?;
        let doc = read_json(&blob_path(layout, &digest)?, &digest)?;
        if doc.get("manifests").is_some() {
            index = doc;
            continue;
        }
        return Ok(doc);
    }
    Err(malformed("index", "indexes nested too deep"))
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array).map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect()).unwrap_or_default()
}

fn image_config(config: &Value) -> ImageConfig {
    let c = config.get("config");
    ImageConfig {
        entrypoint: strings(c.and_then(|c| c.get("Entrypoint"))),
        cmd: strings(c.and_then(|c| c.get("Cmd"))),
        env: strings(c.and_then(|c| c.get("Env"))),
        working_dir: c.and_then(|c| c.get("WorkingDir")).and_then(Value::as_str).unwrap_or("").to_string(),
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
    tar::Archive::new(BufReader::new(File::open(tar).map_err(read_err)?)).unpack(&layout).map_err(read_err)?;
    let (config, layers): (Value, Vec<(String, PathBuf)>) = if layout.join("index.json").exists() {
        let manifest = oci_manifest(&layout)?;
        let config_digest = manifest.get("config").map(|c| digest_of(c, "manifest config")).transpose()?.ok_or_else(|| malformed("manifest", "no config"))?;
        let config = read_json(&blob_path(&layout, &config_digest)?, &config_digest)?;
        let mut layers = Vec::new();
        for l in manifest.get("layers").and_then(Value::as_array).ok_or_else(|| malformed("manifest", "no layers"))? {
            let digest = digest_of(l, "layer")?;
            layers.push((digest.clone(), blob_path(&layout, &digest)?));
        }
        (config, layers)
    } else if layout.join("manifest.json").exists() {
        let manifest = read_json(&layout.join("manifest.json"), "manifest.json")?;
        let first = manifest.get(0).ok_or_else(|| malformed("manifest.json", "no image"))?;
        let inside = |p: &str| -> Result<PathBuf, ImageError> {
            let rel = Path::new(p);
            if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
                return Err(malformed("manifest.json", format!("path {p:?} leaves the archive")));
            }
            Ok(layout.join(rel))
        };
        let config_path = first.get("Config").and_then(Value::as_str).ok_or_else(|| malformed("manifest.json", "no Config"))?;
        let config = read_json(&inside(config_path)?, config_path)?;
        let layers = strings(first.get("Layers")).iter().map(|l| Ok((l.clone(), inside(l)?))).collect::<Result<_, ImageError>>()?;
        (config, layers)
    } else {
        return Err(ImageError::NotAnImage(tar.into()));
    };
    for (name, path) in &layers {
        apply_layer(path, &rootfs).map_err(|reason| ImageError::Layer { layer: name.clone(), reason })?;
    }
    Ok((rootfs, image_config(&config)))
}

/// Applies one layer (plain or gzip tar) onto `rootfs`: `.wh.NAME` removes NAME from below,
/// `.wh..wh..opq` empties its directory of what lower layers put there.
pub fn apply_layer(path: &Path, rootfs: &Path) -> Result<(), String> {
    let mut file = File::open(path).map_err(|e| format!("{path:?}: {e}"))?;
    let mut magic = [0u8; 2];
    let gzip = file.read_exact(&mut magic).is_ok() && magic == [0x1f, 0x8b];
    file.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    let reader: Box<dyn Read> = if gzip { Box::new(flate2::read::GzDecoder::new(BufReader::new(file))) } else { Box::new(BufReader::new(file)) };
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_overwrite(true);
    for entry in archive.entries().map_err(|e| e.to_string())? {
        let mut entry = entry.map_err(|e| e.to_string())?;
        let rel = entry.path().map_err(|e| e.to_string())?.into_owned();
        if rel.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(format!("the entry {rel:?} leaves the root filesystem"));
        }
        let name = rel.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let parent = rootfs.join(rel.parent().unwrap_or(Path::new("")));
        if name == ".wh..wh..opq" {
            for child in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
                remove(&child.path());
            }
        } else if let Some(hidden) = name.strip_prefix(".wh.") {
            remove(&parent.join(hidden));
        } else {
            // A lower layer's file may stand where this layer puts a directory, or the reverse.
            let target = rootfs.join(&rel);
            if let Ok(meta) = std::fs::symlink_metadata(&target) {
                if meta.is_dir() != entry.header().entry_type().is_dir() {
                    remove(&target);
                }
            }
            entry.unpack_in(rootfs).map_err(|e| match std::error::Error::source(&e) {
                Some(cause) => format!("{rel:?}: {e}: {cause}"),
                None => format!("{rel:?}: {e}"),
            })?;
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

    #[test]
    fn escaping_entries_and_bad_digests_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("rootfs");
        std::fs::create_dir(&root).unwrap();
        // tar::Builder refuses to write "..", so write the header by hand.
        let path = d.path().join("evil.tar");
        let mut h = tar::Header::new_gnu();
        h.as_gnu_mut().unwrap().name[..9].copy_from_slice(b"../escape");
        h.set_size(1);
        h.set_mode(0o644);
        h.set_cksum();
        let mut bytes = h.as_bytes().to_vec();
        bytes.extend_from_slice(b"x");
        bytes.resize(512 * 2, 0);
        bytes.extend_from_slice(&[0u8; 1024]);
        std::fs::write(&path, bytes).unwrap();
        let e = apply_layer(&path, &root).unwrap_err();
        assert!(e.contains("leaves the root filesystem"), "{e}");
        assert!(!d.path().join("escape").exists());
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
