//! What the user sees: itemized changes on stdout, warnings and errors on stderr, an indicatif
//! progress bar, and the closing summary (text or JSON).

use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};

pub use crate::escape::{escape_name, escape_text};
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
    progress: Mutex<Progress>,
    errors: Mutex<Vec<String>>,
    changes: Mutex<Vec<String>>,
}

/// What the progress display knows.
#[derive(Default)]
struct Progress {
    files_planned: u64,
    bytes_planned: u64,
    files_done: u64,
    /// The receiver has planned the whole list: the totals are final, the bar is a bar.
    total_known: bool,
}

/// While the list is still being compared: no total yet, so no bar and no ETA.
const SCANNING: &str = "{spinner} {msg} {binary_bytes_per_sec:>12}";
/// Once the total is known.
const BAR: &str = "{bar:24} {percent:>3}% {bytes:>10}/{total_bytes:<10} {msg} {binary_bytes_per_sec:>12} eta {eta:>4}";

impl Reporter {
    pub fn new(sending: bool, itemize: bool, quiet: bool, json: bool, progress: bool) -> Reporter {
        let bar = progress.then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(10));
            bar.set_style(
                ProgressStyle::with_template(SCANNING)
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.set_message("comparing…");
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Reporter {
            sending,
            itemize,
            quiet,
            json,
            bar,
            progress: Mutex::new(Progress::default()),
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
        let Some(b) = &self.bar else { return };
        let p = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        if p.total_known {
            b.set_message(format!(
                "{}/{} files",
                thousands(p.files_done),
                thousands(p.files_planned)
            ));
        } else {
            b.set_message(format!(
                "comparing… {} to transfer so far ({})",
                plural(p.files_planned, "file"),
                HumanBytes(p.bytes_planned)
            ));
        }
    }

    /// The receiver planned everything: from here on a bar with a real total.
    fn total_known(&self, files: u64, bytes: u64) {
        {
            let mut p = self.progress.lock().unwrap_or_else(|p| p.into_inner());
            p.total_known = true;
            p.files_planned = files;
            p.bytes_planned = bytes;
        }
        if let Some(b) = &self.bar {
            b.set_length(bytes.max(b.position()));
            if let Ok(style) = ProgressStyle::with_template(BAR) {
                b.set_style(style.progress_chars("=> "));
            }
        }
        self.update_msg();
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
            Event::Planned { files, bytes } => self.total_known(files, bytes),
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
        {
            let mut p = self.progress.lock().unwrap_or_else(|p| p.into_inner());
            if p.total_known {
                return; // the receiver's total already counts it
            }
            p.files_planned += 1;
            p.bytes_planned += bytes;
        }
        self.update_msg();
    }

    fn progressed(&self, bytes: u64) {
        if let Some(b) = &self.bar {
            b.inc(bytes);
            // A file re-read because it changed while being sent counts twice: stay ≤ 100%.
            if let Some(len) = b.length()
                && b.position() > len
            {
                b.set_position(len);
            }
        }
    }

    fn file_done(&self) {
        self.progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .files_done += 1;
        self.update_msg();
    }
}

/// Total size over bytes on the wire, like rsync's "speedup"; `None` where it would mean
/// nothing (nothing transferred, or too little for a ratio to say anything).
pub fn speedup(o: &Outcome) -> Option<f64> {
    let s = &o.stats;
    let wire = o.bytes_sent + o.bytes_received;
    let moved = s.literal_bytes + s.matched_bytes;
    (moved > 0 && s.total_size >= 64 << 10 && wire > 0).then(|| s.total_size as f64 / wire as f64)
}

/// Bytes before compression over bytes on the wire, both ways; `None` if nothing was
/// compressed.
pub fn compression(o: &Outcome) -> Option<f64> {
    let wire = o.bytes_sent + o.bytes_received;
    let raw = o.raw_sent + o.raw_received;
    (raw > wire && wire > 0).then(|| raw as f64 / wire as f64)
}

/// `12.3 MiB on the wire`, with what it was before compression if it was compressed.
fn on_the_wire(o: &Outcome) -> String {
    let wire = HumanBytes(o.bytes_sent + o.bytes_received);
    match compression(o) {
        Some(x) => format!(
            "{wire} on the wire ({} before compression, {x:.1}×)",
            HumanBytes(o.raw_sent + o.raw_received)
        ),
        None => format!("{wire} on the wire"),
    }
}

/// `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `1 file`, `2 files`, `40,001 entries`.
pub fn plural(n: u64, one: &str) -> String {
    let many = match one.strip_suffix('y') {
        Some(stem) => format!("{stem}ies"),
        None => format!("{one}s"),
    };
    format!("{} {}", thousands(n), if n == 1 { one } else { &many })
}

/// The one line that sums up a sync: what changed, what it cost, how long it took.
pub fn summary_line(o: &Outcome, elapsed: Duration, dry_run: bool) -> String {
    let s = &o.stats;
    let entries = s.files + s.dirs + s.symlinks;
    let changed = s.created + s.updated + s.metadata_only;
    let wire = on_the_wire(o);
    let secs = elapsed.as_secs_f64();
    let prefix = if dry_run { "(dry run) would have " } else { "" };
    if changed == 0 && s.deleted == 0 {
        return format!(
            "{}up to date: {} checked, {wire}, {secs:.2}s",
            if dry_run { "(dry run) " } else { "" },
            plural(entries, "entry")
        );
    }
    let parts: Vec<String> = [
        (s.created, "new"),
        (s.updated, "updated"),
        (s.metadata_only, "attributes only"),
    ]
    .iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, what)| format!("{} {what}", thousands(*n)))
    .collect();
    let mut line = format!(
        "{prefix}changed {} of {}",
        thousands(changed),
        plural(entries, "entry")
    );
    if !parts.is_empty() {
        line.push_str(&format!(" ({})", parts.join(", ")));
    }
    if s.deleted > 0 {
        line.push_str(&format!(", deleted {}", thousands(s.deleted)));
    }
    line.push_str(&format!("; {wire}, {secs:.2}s"));
    line
}

/// What `-v` adds under the summary line.
pub fn summary_detail(o: &Outcome) -> Vec<String> {
    let s = &o.stats;
    let mut lines = vec![
        format!(
            "source: {}, {}, {}; {}",
            plural(s.files, "file"),
            plural(s.dirs, "directory"),
            plural(s.symlinks, "symlink"),
            HumanBytes(s.total_size)
        ),
        format!(
            "content: {} sent literally, {} taken from the receiver's own copies",
            HumanBytes(s.literal_bytes),
            HumanBytes(s.matched_bytes)
        ),
        format!(
            "wire: {} sent, {} received",
            HumanBytes(o.bytes_sent),
            HumanBytes(o.bytes_received)
        ),
    ];
    if let Some(x) = compression(o) {
        lines.push(format!(
            "before compression: {} sent, {} received ({x:.1}×)",
            HumanBytes(o.raw_sent),
            HumanBytes(o.raw_received)
        ));
    }
    if let Some(x) = speedup(o) {
        lines.push(format!(
            "speedup: {x:.1}× (source size over bytes on the wire)"
        ));
    }
    if s.verify_retries > 0 {
        lines.push(format!(
            "re-sent whole after a failed verification: {}",
            plural(s.verify_retries, "file")
        ));
    }
    if s.restarts > 0 {
        lines.push(format!(
            "started over because they changed while being sent: {}",
            thousands(s.restarts)
        ));
    }
    if s.errors + s.warnings > 0 {
        lines.push(format!(
            "{}, {}",
            plural(s.errors, "error"),
            plural(s.warnings, "warning")
        ));
    }
    lines
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
        "bytes_sent_uncompressed": o.raw_sent,
        "bytes_received_uncompressed": o.raw_received,
        "compression_ratio": compression(o),
        "restarts": s.restarts,
        "speedup": speedup(o),
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

    fn outcome(f: impl FnOnce(&mut crate::proto::Stats)) -> Outcome {
        let mut stats = crate::proto::Stats {
            files: 40_000,
            dirs: 2_000,
            symlinks: 1,
            total_size: 707 << 20,
            ..Default::default()
        };
        f(&mut stats);
        Outcome {
            stats,
            bytes_sent: 984_000,
            bytes_received: 1_200,
            raw_sent: 984_000,
            raw_received: 1_200,
            memo: None,
        }
    }

    #[test]
    fn summaries_are_short_and_true() {
        let t = Duration::from_millis(134);
        let quiet = outcome(|_| {});
        assert_eq!(
            summary_line(&quiet, t, false),
            "up to date: 42,001 entries checked, 962.11 KiB on the wire, 0.13s"
        );
        assert_eq!(speedup(&quiet), None, "nothing moved: no ratio");
        let one = outcome(|s| {
            s.files = 1;
            s.dirs = 0;
            s.symlinks = 0;
            s.total_size = 1;
            s.created = 1;
            s.literal_bytes = 1;
        });
        assert_eq!(
            summary_line(&one, t, false),
            "changed 1 of 1 entry (1 new); 962.11 KiB on the wire, 0.13s"
        );
        assert_eq!(
            speedup(&one),
            None,
            "too small for a ratio to mean anything"
        );
        let some = outcome(|s| {
            s.created = 3;
            s.updated = 1_500;
            s.deleted = 2;
            s.literal_bytes = 900_000;
            s.matched_bytes = 20 << 20;
        });
        let line = summary_line(&some, t, true);
        assert_eq!(
            line,
            "(dry run) would have changed 1,503 of 42,001 entries (3 new, 1,500 updated), \
             deleted 2; 962.11 KiB on the wire, 0.13s"
        );
        assert!(line.len() < 120, "{}", line.len());
        assert!(speedup(&some).is_some());
        let detail = summary_detail(&some).join("\n");
        assert!(
            detail.contains("40,000 files, 2,000 directories, 1 symlink"),
            "{detail}"
        );
        assert!(detail.contains("speedup: "), "{detail}");
    }

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
