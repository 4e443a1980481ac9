//! Timed milestones for performance work and debugging, through `tracing`: `-v` on the command
//! line or `DEVSYNC_TRACE=1` in the environment turns them on (a helper started by a client
//! that traces traces too, and its lines reach the client's stderr). Off, a milestone costs one
//! branch. Lines carry wall-clock time with microseconds, so the client's and the helper's
//! interleave meaningfully.

use std::sync::OnceLock;

static ON: OnceLock<bool> = OnceLock::new();

/// Turns tracing on (idempotent): stderr, debug level, wall-clock timestamps.
pub fn init(verbose: bool) {
    let on = *ON.get_or_init(|| verbose || std::env::var_os("DEVSYNC_TRACE").is_some());
    if on {
        // A second subscriber (tests running several clients in one process) is refused: fine.
        use std::io::IsTerminal;
        let _ = tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_max_level(tracing::Level::DEBUG)
            .with_target(false)
            .with_level(false)
            .with_ansi(std::io::stderr().is_terminal())
            .try_init();
    }
}

/// Whether tracing is on (evaluate the message only then).
pub fn enabled() -> bool {
    *ON.get_or_init(|| std::env::var_os("DEVSYNC_TRACE").is_some())
}

/// `trace!("role", "format", args…)`: a milestone of one end (`client`, `send`, `recv`, …).
#[macro_export]
macro_rules! trace {
    ($role:expr, $($arg:tt)*) => {
        if $crate::trace::enabled() {
            tracing::debug!("[{}] {}", $role, format_args!($($arg)*));
        }
    };
}
