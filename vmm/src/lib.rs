//! hull's KVM microVM monitor (issue: hull-vmm). Not built yet.
