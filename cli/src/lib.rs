//! The apps around the kdfuse library, shared by the `kdfuse` command and
//! its tests: the counting allocator of the binary ([`alloc`]), the benchmarks with their roofline ([`bench`]), the digits
//! dataset ([`digits`]), the distillation experiment on it ([`demo`]) and the
//! teacher cache, a top-k teacher stored as safetensors shards ([`teacher_cache`]).
//! The command line itself is the binary's `cmd` module.

pub mod alloc;
pub mod bench;
pub mod demo;
pub mod digits;
pub mod teacher_cache;
