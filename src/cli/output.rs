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
            self.out(&format!("devsync: {}", escape_text(msg)), true);
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
        escape_text(message)
    } else {
        format!("{}: {}", escape_name(path.as_bytes()), escape_text(message))
    }
}

/// A file name as it may be shown on a terminal: bytes a terminal would act on (C0 controls,
/// DEL, the C1 range) and bytes that are not UTF-8 are written `\#ooo` (octal, as rsync
/// does), and a backslash before `#` is escaped too, so no name can move the cursor, change
/// colours or forge a line. `--json` output is never escaped.
pub fn escape_name(bytes: &[u8]) -> String {
    escape(bytes, false)
}

/// Free text from wherever (remote messages, remote stderr): escaped like names, except that
/// tabs stay and newlines are kept but indented, so a line of it cannot pass for one of ours.
pub fn escape_text(s: &str) -> String {
    escape(s.as_bytes(), true)
}

fn escape(bytes: &[u8], text: bool) -> String {
    let mut out = String::with_capacity(bytes.len());
    let octal = |out: &mut String, b: u8| out.push_str(&format!("\\#{b:03o}"));
    for chunk in bytes.utf8_chunks() {
        let mut chars = chunk.valid().chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\n' if text => out.push_str("\n    "),
                '\t' if text => out.push('\t'),
                '\\' if chars.peek() == Some(&'#') => out.push_str("\\#134"),
                c if c.is_control() => {
                    let mut buf = [0u8; 4];
                    for b in c.encode_utf8(&mut buf).bytes() {
                        octal(&mut out, b);
                    }
                }
                c => out.push(c),
            }
        }
        for &b in chunk.invalid() {
            octal(&mut out, b);
        }
    }
    out
}

impl Observer for Reporter {
    fn event(&self, ev: Event) {
        match ev {
            Event::Change(c) => {
                if self.itemize {
                    if self.json {
                        self.changes
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(c.itemize(self.sending));
                    } else {
                        let line = format!(
                            "{} {}",
                            c.flags(self.sending),
                            escape_name(c.path.as_bytes())
                        );
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
                self.out(
                    &format!("devsync: error: {}", located(&path, &message)),
                    true,
                );
                // JSON keeps the exact text.
                let exact = if path.is_empty() {
                    message
                } else {
                    format!("{path}: {message}")
                };
                self.errors
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(exact);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cannot_reach_the_terminal() {
        assert_eq!(escape_name(b"plain name.rs"), "plain name.rs");
        assert_eq!(escape_name("ünï 🚀".as_bytes()), "ünï 🚀");
        assert_eq!(escape_name(b"a\x1b[31mred"), "a\\#033[31mred");
        assert_eq!(escape_name(b"two\nlines"), "two\\#012lines");
        assert_eq!(escape_name(b"del\x7f"), "del\\#177");
        // C1 controls (CSI as one code point) and bytes that are not UTF-8.
        assert_eq!(escape_name("x\u{9b}2J".as_bytes()), "x\\#302\\#2332J");
        assert_eq!(escape_name(b"bad\xff\xfe"), "bad\\#377\\#376");
        // An escape-looking sequence in a real name stays unambiguous.
        assert_eq!(escape_name(b"a\\#033"), "a\\#134#033");
        assert_eq!(escape_name(b"back\\slash"), "back\\slash");
        // Free text keeps its lines, indented, but not its escapes.
        assert_eq!(
            escape_text("one\ndevsync: forged\x1b[2J"),
            "one\n    devsync: forged\\#033[2J"
        );
    }
}
