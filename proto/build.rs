//! Generates the ttrpc server and client code for the agent API from `protos/`.
//! ttrpc-codegen parses the .proto files in pure Rust, so no `protoc` is needed.
use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() {
    if std::env::var_os("CARGO_FEATURE_API").is_none() {
        return;
    }
    let out_dir = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    let protos = ["protos/health.proto", "protos/agent.proto", "protos/runtimeoptions.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Codegen::new()
        .out_dir(&out_dir)
        .inputs(protos)
        .include("protos")
        .rust_protobuf()
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .run()
        .expect("generating the agent API from protos/ failed");

    // The generated files start with inner attributes (`#![allow(...)]`), which `include!`
    // cannot take; lib.rs puts the equivalent outer attributes on each module instead.
    for name in ["agent", "agent_ttrpc", "health", "health_ttrpc", "runtimeoptions"] {
        let path = std::path::Path::new(&out_dir).join(format!("{name}.rs"));
        let text = std::fs::read_to_string(&path).expect("generated file is readable");
        let kept: Vec<&str> = text.lines().filter(|l| { let t = l.trim_start(); !(t.starts_with("#![") || t.starts_with("//!")) }).collect();
        std::fs::write(&path, kept.join("\n")).expect("generated file is writable");
    }
}
