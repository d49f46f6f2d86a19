//! hull-agent against runc on this host, in one run on the same busybox rootfs:
//! - lifecycle: create + start + wait + remove of `/bin/true`, agent vs `runc run` (which also
//!   creates, starts, waits and deletes), as a ratio of medians;
//! - stdout: 1 GiB through the agent's stdout stream vs through runc's inherited pipe, MB/s.
//!
//! Run with `scripts/bench` (it builds the release binaries first). Needs root and runc.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hull_proto::stdio::StreamKind;
use hull_tests::*;
use tokio::io::AsyncReadExt;

const ROUNDS: usize = 30;
const GIB_ARGS: usize = 16; // 16 x 64 MiB

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn runc_bundle(dir: &std::path::Path, rootfs: &std::path::Path, args: &[&str]) -> std::path::PathBuf {
    let bundle = dir.join(format!("bundle-{}", args.len()));
    std::fs::create_dir_all(&bundle).expect("bundle dir");
    let spec = default_spec(args, &rootfs.to_string_lossy());
    std::fs::write(bundle.join("config.json"), spec.to_string()).expect("config.json");
    bundle
}

fn runc_run(root: &std::path::Path, bundle: &std::path::Path, id: &str, stdout: Stdio) -> std::process::Child {
    Command::new("runc")
        .arg("--root")
        .arg(root)
        .args(["run", "--bundle"])
        .arg(bundle)
        .arg(id)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::inherit())
        .spawn()
        .expect("runc runs")
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    if let Some(why) = missing_prerequisite() {
        eprintln!("SKIP agent bench: {why}");
        return;
    }
    if Command::new("runc").arg("--version").output().is_err() {
        eprintln!("SKIP agent bench: needs runc (apt-get install runc)");
        return;
    }
    let agent = TestAgent::start().await.expect("agent starts");
    let work = tempfile::tempdir().expect("tempdir");
    let runc_root = work.path().join("runc");

    // Lifecycle of /bin/true.
    let mut hull = Vec::new();
    let mut runc = Vec::new();
    let true_bundle = runc_bundle(work.path(), &agent.rootfs, &["/bin/true"]);
    for i in 0..ROUNDS {
        let id = format!("bench-true-{i}");
        let t = Instant::now();
        agent.create(&id, &agent.spec(&["/bin/true"]), stdio(false, false, false)).await.expect("create");
        agent.start(&id).await.expect("start");
        assert_eq!(agent.wait(&id, "").await.expect("wait").exit_status, 0);
        agent.remove(&id).await.expect("remove");
        hull.push(t.elapsed());

        let t = Instant::now();
        let status = runc_run(&runc_root, &true_bundle, &format!("runc-true-{i}"), Stdio::null()).wait().expect("runc");
        assert!(status.success());
        runc.push(t.elapsed());
    }
    let (h, r) = (median(hull), median(runc));
    println!("lifecycle /bin/true, median of {ROUNDS}: hull-agent {:.1} ms, runc run {:.1} ms, ratio hull/runc {:.2}", ms(h), ms(r), h.as_secs_f64() / r.as_secs_f64());

    // 1 GiB of stdout.
    std::fs::write(agent.rootfs.join("data"), vec![0x5au8; 64 << 20]).expect("data");
    // dd with 1 MiB blocks: busybox cat moves 64 KiB at a time and would measure itself.
    let script = format!("for i in $(seq {GIB_ARGS}); do dd if=/data bs=1M 2>/dev/null; done");
    let args = ["sh", "-c", script.as_str()];
    let id = "bench-gib";
    agent.create(id, &agent.spec(&args), stdio(false, true, false)).await.expect("create");
    let mut out = agent.attach(id, "", StreamKind::Stdout).await.expect("attach");
    let mut buf = vec![0u8; 1 << 20];
    let t = Instant::now();
    agent.start(id).await.expect("start");
    let mut total = 0usize;
    loop {
        let n = out.read(&mut buf).await.expect("read");
        if n == 0 {
            break;
        }
        total += n;
    }
    let hull_secs = t.elapsed().as_secs_f64();
    agent.wait(id, "").await.expect("wait");
    agent.remove(id).await.expect("remove");
    assert_eq!(total, GIB_ARGS << 26);

    let gib_bundle = runc_bundle(work.path(), &agent.rootfs, &args);
    let t = Instant::now();
    let mut child = runc_run(&runc_root, &gib_bundle, "runc-gib", Stdio::piped());
    let mut pipe = child.stdout.take().expect("stdout pipe");
    let mut runc_total = 0usize;
    loop {
        let n = pipe.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        runc_total += n;
    }
    child.wait().expect("runc");
    let runc_secs = t.elapsed().as_secs_f64();
    assert_eq!(runc_total, total);
    let mb = total as f64 / 1e6;
    println!(
        "stdout 1 GiB: hull-agent stream {:.0} MB/s, runc inherited pipe {:.0} MB/s, ratio hull/runc {:.2}",
        mb / hull_secs,
        mb / runc_secs,
        runc_secs / hull_secs
    );
}
