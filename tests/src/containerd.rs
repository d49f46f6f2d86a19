//! A private containerd for end-to-end tests: its own root, state, sockets and network
//! namespace, hull's shim on its PATH, and OCI images built here (there is no registry).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

pub const CONTAINERD: &str = "/usr/bin/containerd";
pub const CTR: &str = "/usr/bin/ctr";
pub const IMAGE: &str = "localhost/hull/busybox:test";
/// The same busybox, whose default command sleeps forever: CRI's sandbox (pause) image. hull
/// runs no process for it; runc pods need one that stays up.
pub const PAUSE_IMAGE: &str = "localhost/hull/pause:test";

/// Why the containerd suites cannot run here, or None.
pub fn missing() -> Option<String> {
    if let Some(why) = crate::missing_prerequisite() {
        return Some(why);
    }
    for (p, pkg) in [(CONTAINERD, "containerd"), (CTR, "containerd"), ("/usr/bin/qemu-system-x86_64", "qemu-system-x86")] {
        if !Path::new(p).exists() {
            return Some(format!("needs {p} (apt-get install {pkg})"));
        }
    }
    crate::missing_guest_image()
}

#[macro_export]
macro_rules! require_containerd {
    () => {
        if let Some(why) = $crate::containerd::missing() {
            if std::env::var_os("HULL_REQUIRE_ALL").is_some() {
                panic!("prerequisite missing under HULL_REQUIRE_ALL: {why}");
            }
            eprintln!("SKIP {}: {why}", module_path!());
            return;
        }
    };
}

pub struct Containerd {
    /// A namespace of its own (tests run in parallel): hull's per-pod state lives under
    /// /run/hull/shim/<namespace>/.
    pub namespace: String,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    child: Child,
    /// CRI's pod network namespaces present before this containerd started: the ones it adds
    /// are removed on drop when a failed test left pods behind.
    netns_before: Vec<String>,
    /// The CRI pods made through this containerd (`track_pod`): every containerd's CRI pods
    /// share the namespace k8s.io, so checks and clean-up look at these alone.
    pods: std::sync::Mutex<Vec<String>>,
}

/// The containerd namespace of CRI, shared by every containerd a test starts.
const CRI_NAMESPACE: &str = "k8s.io";

const NETNS_DIR: &str = "/var/run/netns";

fn cni_netns() -> Vec<String> {
    std::fs::read_dir(NETNS_DIR)
        .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|n| n.starts_with("cni-")).collect())
        .unwrap_or_default()
}

impl Containerd {
    /// Starts containerd (CRI off unless `cri_config` adds it) and waits for its socket.
    pub fn start(extra_config: &str) -> Result<Containerd> {
        Self::start_in(extra_config, None)
    }

    /// `namespace`: the one ctr uses (CRI's images live in "k8s.io"); default a unique one.
    /// `{dir}` in `extra_config` becomes containerd's directory.
    pub fn start_in(extra_config: &str, namespace: Option<&str>) -> Result<Containerd> {
        let dir = tempfile::Builder::new().prefix("hull-ctrd-").tempdir()?;
        let socket = dir.path().join("containerd.sock");
        let config = dir.path().join("config.toml");
        let extra_config = extra_config.replace("{dir}", &dir.path().to_string_lossy());
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n{extra_config}\n[grpc]\n  address = \"{sock}\"\n[plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{opt}\"\n",
                root = dir.path().join("root").display(),
                state = dir.path().join("state").display(),
                sock = socket.display(),
                opt = dir.path().join("opt").display(),
            ),
        )?;
        let bin_dir = crate::binary("containerd-shim-hull-v2").parent().map(Path::to_path_buf).context("target dir")?;
        let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
        let log = std::fs::File::create(dir.path().join("containerd.log"))?;
        // Its own network namespace: test bridges never touch the host's network.
        // Loopback up: CRI's streaming server listens on 127.0.0.1.
        let child = Command::new("unshare")
            .args(["--net", "sh", "-c", "ip link set lo up && exec \"$0\" --config \"$1\"", CONTAINERD])
            .arg(&config)
            .env("PATH", path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start containerd")?;
        static COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let namespace = match namespace {
            Some(n) => n.to_string(),
            None => format!("hulltest-{}-{}", std::process::id(), COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)),
        };
        let mut c = Containerd { namespace, dir, socket, child, netns_before: cni_netns(), pods: Default::default() };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !c.socket.exists() || !c.ctr(&["version"]).is_ok_and(|o| o.status.success()) {
            if Instant::now() > deadline {
                bail!("containerd did not serve within 20 s: {}", c.log());
            }
            if let Ok(Some(status)) = c.child.try_wait() {
                bail!("containerd exited with {status}: {}", c.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(c)
    }

    /// containerd's pid (its network namespace is the pods' world).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    pub fn ctr_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(CTR);
        c.arg("--address").arg(&self.socket).args(["--namespace", &self.namespace]).args(args).stdin(Stdio::null());
        c
    }

    pub fn ctr(&self, args: &[&str]) -> std::io::Result<Output> {
        self.ctr_cmd(args).output()
    }

    /// Builds busybox OCI images here and imports them as `IMAGE` and `PAUSE_IMAGE`.
    pub fn import_busybox(&self) -> Result<()> {
        for (name, cmd, dir) in [(IMAGE, &["sh"][..], "image"), (PAUSE_IMAGE, &["sleep", "2147483647"][..], "pause")] {
            let tar = self.dir.path().join(format!("{dir}-oci.tar"));
            oci_image_tar(&self.dir.path().join(dir), name, cmd, &tar)?;
            let out = self.ctr(&["images", "import", &tar.to_string_lossy()])?;
            if !out.status.success() {
                bail!("ctr images import: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        Ok(())
    }
}

impl Containerd {
    /// Processes (QEMU, device backends, hull-vmm) of this containerd's pods, as "PID
    /// COMMAND LINE": each `hull-vmm jail` (its command line names the pod's directory) and
    /// after it the process it jails (whose command line sees only the jail).
    /// A jailed process whose jail died (it should have died with it) is found by its cgroup,
    /// the pod's, and listed too.
    pub fn pod_processes(&self) -> Vec<String> {
        if self.namespace == CRI_NAMESPACE {
            let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner()).clone();
            return pods.iter().flat_map(|pod| self.processes_matching(&format!("/run/hull/shim/{}/{pod}/", self.namespace), &format!("/{pod}"))).collect();
        }
        self.processes_matching(&format!("/run/hull/shim/{}/", self.namespace), &format!("/{}/", self.namespace))
    }

    /// Records a CRI pod made through this containerd (see `pods`).
    pub fn track_pod(&self, id: &str) {
        self.pods.lock().unwrap_or_else(|p| p.into_inner()).push(id.into());
    }

    fn processes_matching(&self, pattern: &str, cgroup: &str) -> Vec<String> {
        let out = Command::new("pgrep").args(["-a", "-f", pattern]).output();
        let found: Vec<String> = out.map(|o| String::from_utf8_lossy(&o.stdout).lines().map(String::from).collect()).unwrap_or_default();
        let mut all = Vec::new();
        for line in found {
            let pid = line.split_whitespace().next().unwrap_or_default().to_string();
            all.push(line);
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
            for child in children.split_whitespace() {
                if let Ok(cmdline) = std::fs::read(format!("/proc/{child}/cmdline")) {
                    let words: Vec<String> = cmdline.split(|b| *b == 0).filter(|w| !w.is_empty()).map(|w| String::from_utf8_lossy(w).into_owned()).collect();
                    all.push(format!("{child} {}", words.join(" ")));
                }
            }
        }
        let listed: Vec<String> = all.iter().filter_map(|l| l.split_whitespace().next().map(String::from)).collect();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let pid = entry.file_name().to_string_lossy().into_owned();
            if !pid.bytes().all(|b| b.is_ascii_digit()) || listed.contains(&pid) {
                continue;
            }
            let in_pod = std::fs::read_to_string(entry.path().join("cgroup")).is_ok_and(|c| c.lines().any(|l| l.contains(cgroup)));
            let words: Vec<String> = std::fs::read(entry.path().join("cmdline")).unwrap_or_default().split(|b| *b == 0).filter(|w| !w.is_empty()).map(|w| String::from_utf8_lossy(w).into_owned()).collect();
            // Zombies have no command line; the shim lives in the pod's cgroup too.
            if in_pod && !words.is_empty() && !words[0].contains("containerd-shim-hull-v2") {
                all.push(format!("{pid} {} (outside any jail's watch)", words.join(" ")));
            }
        }
        all
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Tasks first, so that their VMs go with them.
        if let Ok(out) = self.ctr(&["tasks", "ls", "-q"]) {
            for id in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = self.ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
                std::thread::sleep(Duration::from_millis(200));
                let _ = self.ctr(&["tasks", "delete", "-f", id]);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A test that failed midway may leave a shim and its VM: end them too. Tests run side by
        // side, and CRI pods of every containerd share k8s.io: there, only this one's pods.
        let state = Path::new(hull_runtime::pod::state::STATE_ROOT).join(&self.namespace);
        let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let (shims, dirs): (Vec<String>, Vec<std::path::PathBuf>) = if self.namespace == CRI_NAMESPACE {
            pods.iter().map(|pod| (format!("containerd-shim-hull-v2 -namespace {} .*-id {pod}", self.namespace), state.join(pod))).unzip()
        } else {
            (vec![format!("containerd-shim-hull-v2 -namespace {} ", self.namespace)], vec![state.clone()])
        };
        let mut netns_ours: Vec<String> = Vec::new();
        for dir in &dirs {
            if let Ok(path) = std::fs::read_to_string(dir.join("netns")) {
                netns_ours.extend(Path::new(path.trim()).file_name().map(|n| n.to_string_lossy().into_owned()));
            }
        }
        for pattern in &shims {
            let _ = Command::new("pkill").args(["-9", "-f", pattern]).status();
        }
        for dir in &dirs {
            let _ = Command::new("pkill").args(["-9", "-f", &format!("{}/", dir.display())]).status();
        }
        std::thread::sleep(Duration::from_millis(100));
        for dir in &dirs {
            hull_runtime::pod::share::umount_tree(dir);
            let _ = std::fs::remove_dir_all(dir);
        }
        hull_runtime::pod::share::umount_tree(self.dir.path());
        let shared = self.namespace == CRI_NAMESPACE;
        for ns in cni_netns().into_iter().filter(|n| !self.netns_before.contains(n) && (!shared || netns_ours.contains(n))) {
            let path = Path::new(NETNS_DIR).join(ns);
            let _ = nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH);
            let _ = std::fs::remove_file(&path);
        }
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// An OCI image layout tarball with one layer, a busybox root filesystem, and `cmd` as the
/// default command.
pub fn oci_image_tar(work: &Path, name: &str, cmd: &[&str], out: &Path) -> Result<()> {
    let rootfs = work.join("rootfs");
    crate::busybox_rootfs(&rootfs)?;
    let layout = work.join("layout");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let layer_path = work.join("layer.tar");
    let st = Command::new("tar").arg("-C").arg(&rootfs).arg("-cf").arg(&layer_path).arg(".").status()?;
    if !st.success() {
        bail!("tar of the rootfs failed");
    }
    let layer = std::fs::read(&layer_path)?;
    let layer_digest = sha256_hex(&layer);
    std::fs::write(blobs.join(&layer_digest), &layer)?;
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": cmd},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_digest}")]}
    })
    .to_string();
    let config_digest = sha256_hex(config.as_bytes());
    std::fs::write(blobs.join(&config_digest), &config)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{config_digest}"), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": format!("sha256:{layer_digest}"), "size": layer.len()}]
    })
    .to_string();
    let manifest_digest = sha256_hex(manifest.as_bytes());
    std::fs::write(blobs.join(&manifest_digest), &manifest)?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": format!("sha256:{manifest_digest}"),
                       "size": manifest.len(), "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": name}}]
    });
    std::fs::write(layout.join("index.json"), index.to_string())?;
    std::fs::File::create(layout.join("oci-layout"))?.write_all(br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let st = Command::new("tar").arg("-C").arg(&layout).arg("-cf").arg(out).arg(".").status()?;
    if !st.success() {
        bail!("tar of the image layout failed");
    }
    Ok(())
}

/// The files a pod with `debug_console` kept when it ended (its guest console, its VMM's log),
/// read from the paths its shim's "kept" line names in `shim_log`, as (which, text) pairs.
pub fn kept_pod_logs(shim_log: &str) -> Vec<(&'static str, String)> {
    ["console", "vmm_log"]
        .into_iter()
        .filter_map(|file| {
            let path = shim_log.split(&format!("{file}=\"")).nth(1)?.split('"').next()?;
            Some((file, std::fs::read_to_string(path).map(|t| crate::strip_ansi(&t)).unwrap_or_default()))
        })
        .collect()
}
