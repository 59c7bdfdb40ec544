//! The `kdfuse` command line: `info`, `loss`, `linear-loss`, `check`, `bench`, …

mod cmd;

/// Counts heap bytes (for `kdfuse bench --linear`'s heap peak).
#[global_allocator]
static ALLOC: kdfuse_cli::alloc::CountingAlloc = kdfuse_cli::alloc::CountingAlloc;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    // Like other Unix tools, end quietly when the reader of stdout goes away
    // (`kdfuse bench | head`), instead of panicking on EPIPE.
    #[cfg(unix)]
    // SAFETY: restores the default disposition of one signal, before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let args = match cmd::Cli::try_parse() {
        Ok(a) => a,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                    ExitCode::from(2)
                } else {
                    ExitCode::SUCCESS
                };
            }
            // One line, no usage block: clap's first paragraph, joined.
            let msg = e.to_string();
            let para: Vec<&str> = msg
                .lines()
                .skip_while(|l| l.trim().is_empty())
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let line = if para.is_empty() {
                "invalid arguments".to_string()
            } else {
                para.join(" ")
            };
            eprintln!("kdfuse: {}", line.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    match cmd::run(args).and_then(|code| cmd::flush_stdout().map(|()| code)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kdfuse: {e}");
            ExitCode::from(2)
        }
    }
}
