//! The `keywarden` binary: the sidecar (`keywarden serve`) and its CLI.
#![forbid(unsafe_code)]

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
