//! hull's containerd shim v2 and CLI. Not built yet.
