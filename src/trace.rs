//! Opt-in phase timing for performance work: `DEVSYNC_TRACE=1` prints milestones with elapsed
//! milliseconds to stderr (the helper's go to the client's stderr). Off, it costs one branch.

use std::sync::OnceLock;
use std::time::Instant;

fn start() -> Option<Instant> {
    static START: OnceLock<Option<Instant>> = OnceLock::new();
    *START.get_or_init(|| std::env::var_os("DEVSYNC_TRACE").map(|_| Instant::now()))
}

/// Whether tracing is on (evaluate the message only then).
pub fn enabled() -> bool {
    start().is_some()
}

/// Prints wall-clock seconds (mod 1000) so lines from the client and the helper interleave
/// meaningfully.
pub fn event(role: &str, what: std::fmt::Arguments<'_>) {
    if start().is_some() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        eprintln!("[{:8.3} {role}] {what}", now % 1000.0);
    }
}

/// `trace!("role", "format", args…)`
#[macro_export]
macro_rules! trace {
    ($role:expr, $($arg:tt)*) => {
        if $crate::trace::enabled() {
            $crate::trace::event($role, format_args!($($arg)*));
        }
    };
}
