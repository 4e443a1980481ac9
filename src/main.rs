//! The `devsync` binary: the CLI, the remote helper and the embedded endpoint in one. Parses
//! and runs through `cli::run`, prints a failure once, maps it to the exit status.

fn main() -> std::process::ExitCode {
    let code = match devsync::cli::run() {
        Ok(code) => code,
        Err(f) if devsync::cli::is_broken_pipe(&f.error) => 0,
        Err(f) => {
            devsync::cli::print_failure(&f);
            f.code
        }
    };
    std::process::ExitCode::from(code)
}
