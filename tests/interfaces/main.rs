//! The library's interfaces end to end: the C ABI (C programs against
//! include/kdfuse.h) and the Rust API, with bad input on each. The command
//! line's tests are in cli/tests/.

#[path = "../common/mod.rs"]
mod common;

mod c_abi;
mod c_abi_f64;
mod c_abi_feature;
mod library_bad_input;
