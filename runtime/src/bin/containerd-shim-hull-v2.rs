//! containerd-shim-hull-v2: containerd's shim v2 for `runtime_type = "io.containerd.hull.v2"`.

fn main() -> std::process::ExitCode {
    hull_runtime::shim::main()
}
