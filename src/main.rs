//! The `keywarden` binary: the sidecar (`keywarden serve`) and its CLI.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    keywarden::cli::main()
}
