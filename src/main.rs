//! The `devsync` binary: the CLI, the remote helper and the embedded endpoint in one.

fn main() -> std::process::ExitCode {
    devsync::cli::run()
}
