//! The interfaces end to end: the kdfuse CLI (loss, feature-loss, demo, check) and the C ABI (a C program against include/kdfuse.h).

#[path = "../common/mod.rs"]
mod common;

mod c_abi;
mod cli;
mod cli_demo;
mod cli_loss_family;
mod feature_cli;
