//! What a guest of one CPU architecture needs from the VMM before its first instruction.

pub mod x86_64;
