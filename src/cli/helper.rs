//! `devsync helper`: serve one session on stdin/stdout.

use super::exit;
use crate::session::helper::serve;

pub fn run() -> u8 {
    super::raise_fd_limit();
    let rt = match super::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("devsync helper: {e}");
            return exit::FATAL;
        }
    };
    let r = rt.block_on(serve(tokio::io::stdin(), tokio::io::stdout()));
    match r {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("devsync helper: {e}");
            exit::FATAL
        }
    }
}
