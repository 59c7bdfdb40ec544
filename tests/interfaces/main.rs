//! The interfaces end to end: the kdfuse CLI (loss, feature-loss, demo, check), the C ABI (C programs
//! against include/kdfuse.h) and the library API, with bad input on each.

#[path = "../common/mod.rs"]
mod common;

mod c_abi;
mod c_abi_f64;
mod c_abi_feature;
mod cli;
mod cli_bad_input;
mod cli_demo;
mod cli_loss_family;
mod feature_cli;
mod library_bad_input;
