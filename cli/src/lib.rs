//! The apps around the kdfuse library, shared by the `kdfuse` command and
//! its tests: the benchmarks with their roofline ([`bench`]), the digits
//! dataset ([`digits`]) and the distillation experiment on it ([`demo`]).
//! The command line itself is the binary's `cmd` module.

pub mod bench;
pub mod demo;
pub mod digits;
