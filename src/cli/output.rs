//! What the user sees: itemized changes on stdout, warnings and errors on stderr, an indicatif
//! progress bar, and the closing summary (text or JSON).

use std::io::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::proto::Event;
use crate::session::Observer;
use crate::session::client::Outcome;

pub struct Reporter {
    /// Push: items are sent (`<`); pull: received (`>`).
    sending: bool,
    itemize: bool,
    quiet: bool,
    json: bool,
    bar: Option<ProgressBar>,
    files_planned: AtomicU64,
    files_done: AtomicU64,
    errors: Mutex<Vec<String>>,
    changes: Mutex<Vec<String>>,
}

impl Reporter {
    pub fn new(sending: bool, itemize: bool, quiet: bool, json: bool, progress: bool) -> Reporter {
        let bar = progress.then(|| {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr_with_hz(10));
            let style = ProgressStyle::with_template(
                "{spinner} {bytes:>10}/{total_bytes:<10} {binary_bytes_per_sec:>12} eta {eta:>4} {wide_msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Reporter {
            sending,
            itemize,
            quiet,
            json,
            bar,
            files_planned: AtomicU64::new(0),
            files_done: AtomicU64::new(0),
            errors: Mutex::new(Vec::new()),
            changes: Mutex::new(Vec::new()),
        }
    }

    fn out(&self, line: &str, to_stderr: bool) {
        let print = || {
            if to_stderr {
                eprintln!("{line}");
            } else {
                let _ = writeln!(std::io::stdout().lock(), "{line}"); // closed stdout: keep syncing
            }
        };
        match &self.bar {
            Some(b) => b.suspend(print),
            None => print(),
        }
    }

    fn update_msg(&self) {
        if let Some(b) = &self.bar {
            b.set_message(format!(
                "{}/{} files",
                self.files_done.load(Ordering::Relaxed),
                self.files_planned.load(Ordering::Relaxed)
            ));
        }
    }

    /// A progress notice (connecting, installing the helper…): stderr, unless quiet (also
    /// with --json, whose output is stdout).
    pub fn notice(&self, msg: &str) {
        if !self.quiet {
            self.out(&format!("devsync: {msg}"), true);
        }
    }

    pub fn finish_bar(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }

    pub fn errors(&self) -> Vec<String> {
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn changes(&self) -> Vec<String> {
        self.changes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

fn located(path: &str, message: &str) -> String {
    if path.is_empty() {
        message.to_string()
    } else {
        format!("{path}: {message}")
    }
}

impl Observer for Reporter {
    fn event(&self, ev: Event) {
        match ev {
            Event::Change(c) => {
                if self.itemize {
                    let line = c.itemize(self.sending);
                    if self.json {
                        self.changes
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(line);
                    } else {
                        self.out(&line, false);
                    }
                }
            }
            Event::Warning { path, message } => {
                if !self.quiet {
                    self.out(
                        &format!("devsync: warning: {}", located(&path, &message)),
                        true,
                    );
                }
            }
            Event::Error { path, message } => {
                let text = located(&path, &message);
                self.out(&format!("devsync: error: {text}"), true);
                self.errors
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(text);
            }
        }
    }

    fn planned(&self, bytes: u64) {
        self.files_planned.fetch_add(1, Ordering::Relaxed);
        if let Some(b) = &self.bar {
            b.inc_length(bytes);
        }
        self.update_msg();
    }

    fn progressed(&self, bytes: u64) {
        if let Some(b) = &self.bar {
            b.inc(bytes);
        }
    }

    fn file_done(&self) {
        self.files_done.fetch_add(1, Ordering::Relaxed);
        self.update_msg();
    }
}

/// Total size over bytes on the wire, like rsync's "speedup".
pub fn speedup(total_size: u64, wire: u64) -> f64 {
    total_size as f64 / wire.max(1) as f64
}

/// One human-readable line summing up a sync.
pub fn summary_line(o: &Outcome, elapsed: Duration, dry_run: bool) -> String {
    let s = &o.stats;
    let wire = o.bytes_sent + o.bytes_received;
    let changed = s.created + s.updated + s.metadata_only;
    format!(
        "{}{} files, {} dirs, {} links checked; {} changed ({} new, {} updated, {} attrs only), {} deleted | \
         literal {}, matched {} | wire {} sent, {} received | speedup {:.1}x | {:.2}s",
        if dry_run { "(dry run) " } else { "" },
        s.files,
        s.dirs,
        s.symlinks,
        changed,
        s.created,
        s.updated,
        s.metadata_only,
        s.deleted,
        HumanBytes(s.literal_bytes),
        HumanBytes(s.matched_bytes),
        HumanBytes(o.bytes_sent),
        HumanBytes(o.bytes_received),
        speedup(s.total_size, wire),
        elapsed.as_secs_f64()
    )
}

/// The `--json` summary.
pub fn summary_json(
    o: &Outcome,
    elapsed: Duration,
    r: &Reporter,
    exit_code: u8,
) -> serde_json::Value {
    let s = &o.stats;
    serde_json::json!({
        "exit_code": exit_code,
        "files": s.files,
        "dirs": s.dirs,
        "symlinks": s.symlinks,
        "total_size": s.total_size,
        "created": s.created,
        "updated": s.updated,
        "metadata_only": s.metadata_only,
        "deleted": s.deleted,
        "literal_bytes": s.literal_bytes,
        "matched_bytes": s.matched_bytes,
        "verify_retries": s.verify_retries,
        "bytes_sent": o.bytes_sent,
        "bytes_received": o.bytes_received,
        "speedup": speedup(s.total_size, o.bytes_sent + o.bytes_received),
        "elapsed_seconds": elapsed.as_secs_f64(),
        "errors": r.errors(),
        "warnings": s.warnings,
        "delete_refused": s.delete_refused,
        "changes": r.changes(),
    })
}
