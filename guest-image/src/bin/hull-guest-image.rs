//! `hull-guest-image build`: builds target/guest/{bzImage,vmlinux,initramfs.cpio,root.erofs,manifest.json}.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use hull_guest_image::build::{build, kernel_inputs, Options};

#[derive(Debug, Parser)]
#[command(name = "hull-guest-image", version, about = "Builds hull's guest kernel and initramfs")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    #[command(flatten)]
    args: Args,
}

#[derive(Debug, clap::Subcommand)]
enum Cmd {
    /// Build target/guest/{bzImage,vmlinux,initramfs.cpio,root.erofs,manifest.json}; the kernel only if its
    /// inputs changed.
    Build,
    /// Print the kernel's cache key (hash of source version, config fragment and patches).
    Hash,
}

#[derive(Debug, clap::Args)]
struct Args {
    /// Output directory (default: <workspace>/target/guest).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Leave out the kvm_pvm compatibility patches (also HULL_GUEST_PVM_PATCHES=0).
    #[arg(long)]
    no_pvm_patches: bool,
    /// Parallel make jobs (default: the number of CPUs).
    #[arg(long)]
    jobs: Option<usize>,
}

fn main() -> ExitCode {
    let Cli { cmd, args: cli } = Cli::parse();
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let workspace = workspace.canonicalize().unwrap_or(workspace);
    let pvm_env_off = std::env::var("HULL_GUEST_PVM_PATCHES").is_ok_and(|v| v == "0");
    let opts = Options {
        out: cli.out.unwrap_or_else(|| workspace.join("target/guest")),
        workspace,
        pvm_patches: !(cli.no_pvm_patches || pvm_env_off),
        jobs: cli.jobs.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)),
    };
    if let Cmd::Hash = cmd {
        return match kernel_inputs(&opts) {
            Ok(k) => {
                println!("{}", k.hash);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("hull-guest-image: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match build(&opts) {
        Ok(m) => {
            println!("{}", serde_json::to_string_pretty(&m).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hull-guest-image: {e}");
            ExitCode::FAILURE
        }
    }
}
