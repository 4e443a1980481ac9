//! `devsync helper`: serve one session on stdin/stdout.

use super::{Failure, exit};
use crate::session::helper::serve;

pub fn run() -> Result<u8, Failure> {
    super::raise_fd_limit();
    let rt = super::runtime()?;
    rt.block_on(serve(tokio::io::stdin(), tokio::io::stdout()))?;
    Ok(exit::OK)
}
