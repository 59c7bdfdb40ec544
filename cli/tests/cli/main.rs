//! The `kdfuse` command end to end (loss, feature-loss, check, demo, bench
//! and info, with bad input on each), and the demo's experiment through the
//! library API of this crate.

#[path = "../../../tests/common/mod.rs"]
mod common;
#[path = "../common/run.rs"]
mod run;

mod bench_topk;
mod cli;
mod cli_bad_input;
mod cli_demo;
mod cli_loss_family;
mod demo;
mod feature_cli;
mod kernel_choice;
mod linear_loss;
mod nan;
mod teacher_cache;
