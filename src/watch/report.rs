//! What a watch tells the user: a one-line live status on a terminal (connected or
//! reconnecting, the last change and its latency, totals), `-i` itemized lines per change, or
//! with `--json` one JSON object per line on stdout for tools:
//!
//! - `{"event":"ready", "files":…, "dirs":…, "watched_dirs":…, "initial":{…totals…}}` once
//!   the initial sync is done;
//! - `{"event":"synced", "generation":…, "paths":[…], "removed":[…], "renamed":[[from,to]…],
//!   "bytes":…, "latency_ms":…}` after each generation (`bytes`: file content sent);
//! - `{"event":"reconnecting", "error":…, "attempt":…, "retry_in_ms":…}`;
//! - `{"event":"connected"}` after a reconnect;
//! - `{"event":"halted", "reason":…}`;
//! - `{"event":"error", "path":…, "message":…}` and `{"event":"warning", …}`.

use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::json;

use crate::cli::output::{escape_name, escape_text, plural, thousands};
use crate::engine::RelPath;
use crate::proto::{Event, Stats};
use crate::session::Observer;

pub struct Report {
    json: bool,
    itemize: bool,
    quiet: bool,
    /// Draw the status line (stderr is a terminal).
    status: bool,
    line: Mutex<Line>,
    errors: std::sync::atomic::AtomicU64,
    /// Paths whose last error no later generation made good: the error's number (1, 2, … in
    /// the order reported). `""` for errors about no one path, which nothing makes good.
    failing: Mutex<std::collections::HashMap<String, u64>>,
}

#[derive(Default)]
struct Line {
    state: String,
    last: Option<String>,
    generations: u64,
    changes: u64,
    bytes: u64,
    drawn: bool,
}

/// One generation as the user hears of it.
pub struct Synced<'a> {
    pub generation: u64,
    pub upserted: &'a [RelPath],
    pub removed: &'a [RelPath],
    pub renamed: &'a [(RelPath, RelPath)],
    pub stats: &'a Stats,
    pub latency: Option<Duration>,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0 * 100.0).round() / 100.0
}

fn shown(p: &RelPath) -> String {
    escape_name(p.as_bytes())
}

fn lossy(p: &RelPath) -> String {
    String::from_utf8_lossy(p.as_bytes()).into_owned()
}

impl Report {
    pub fn new(json: bool, itemize: bool, quiet: bool, status: bool) -> Report {
        Report {
            json,
            itemize,
            quiet,
            status: status && !json && !quiet,
            line: Mutex::new(Line::default()),
            errors: Default::default(),
            failing: Default::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Line> {
        self.line.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn json_line(&self, v: serde_json::Value) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{v}"); // a closed stdout: keep syncing
        let _ = out.flush();
    }

    /// Prints `text` (stdout or stderr) above the status line.
    fn say(&self, text: &str, stderr: bool) {
        let mut l = self.lock();
        if l.drawn {
            eprint!("\r\x1b[2K");
            l.drawn = false;
        }
        if stderr {
            eprintln!("{text}");
        } else {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{text}");
            let _ = out.flush();
        }
        drop(l);
        self.draw();
    }

    fn draw(&self) {
        if !self.status {
            return;
        }
        let mut l = self.lock();
        let mut s = format!("devsync watch: {}", l.state);
        if let Some(last) = &l.last {
            s.push_str(&format!(" · last: {last}"));
        }
        if l.generations > 0 {
            s.push_str(&format!(
                " · {} synced, {} changes, {} sent",
                plural(l.generations, "batch"),
                thousands(l.changes),
                indicatif::HumanBytes(l.bytes)
            ));
        }
        eprint!("\r\x1b[2K{s}");
        let _ = std::io::stderr().flush();
        l.drawn = true;
    }

    /// Clears the status line (at exit).
    pub fn finish(&self) {
        let mut l = self.lock();
        if l.drawn {
            eprintln!();
            l.drawn = false;
        }
    }

    fn set_state(&self, state: String) {
        self.lock().state = state;
        self.draw();
    }

    pub fn notice(&self, msg: &str) {
        if !self.quiet && !self.json {
            self.say(&format!("devsync: {}", escape_text(msg)), true);
        }
    }

    pub fn connecting(&self, target: &str) {
        self.set_state(format!("connecting to {}", escape_text(target)));
    }

    pub fn ready(&self, files: u64, dirs: u64, watched: usize, initial: &Stats, took: Duration) {
        if self.json {
            self.json_line(json!({
                "event": "ready",
                "files": files,
                "dirs": dirs,
                "watched_dirs": watched,
                "initial": initial,
                "initial_ms": ms(took),
            }));
            return;
        }
        if !self.quiet {
            self.say(
                &format!(
                    "devsync: watching {} in {} ({} watched); initial sync: {} created, {} \
                     updated, {} deleted in {:.2} s",
                    plural(files, "file"),
                    plural(dirs, "directory"),
                    thousands(watched as u64),
                    thousands(initial.created),
                    thousands(initial.updated),
                    thousands(initial.deleted),
                    took.as_secs_f64()
                ),
                true,
            );
        }
        self.set_state("connected, in sync".into());
    }

    pub fn connected(&self) {
        if self.json {
            self.json_line(json!({"event": "connected"}));
        }
        self.set_state("connected, in sync".into());
    }

    pub fn syncing(&self, n: usize) {
        self.set_state(format!("sending {}", plural(n as u64, "change")));
    }

    pub fn synced(&self, s: &Synced<'_>) {
        let n = s.upserted.len() + s.removed.len() + s.renamed.len();
        if self.json {
            self.json_line(json!({
                "event": "synced",
                "generation": s.generation,
                "paths": s.upserted.iter().map(lossy).collect::<Vec<_>>(),
                "removed": s.removed.iter().map(lossy).collect::<Vec<_>>(),
                "renamed": s.renamed.iter().map(|(a, b)| [lossy(a), lossy(b)]).collect::<Vec<_>>(),
                "bytes": s.stats.literal_bytes,
                "latency_ms": s.latency.map(ms),
                "errors": s.stats.errors,
            }));
        } else if self.itemize {
            for (a, b) in s.renamed {
                self.say(&format!("renamed     {} -> {}", shown(a), shown(b)), false);
            }
        }
        let mut l = self.lock();
        l.generations += 1;
        l.changes += n as u64;
        l.bytes += s.stats.literal_bytes;
        let what = match (s.upserted.first(), s.removed.first(), s.renamed.first()) {
            _ if n > 1 => plural(n as u64, "change"),
            (Some(p), _, _) => shown(p),
            (_, Some(p), _) => format!("{} (removed)", shown(p)),
            (_, _, Some((_, b))) => format!("{} (renamed)", shown(b)),
            _ => "attributes".into(),
        };
        l.last = Some(match s.latency {
            Some(d) => format!("{what} in {:.0} ms", ms(d)),
            None => what,
        });
        l.state = "connected, in sync".into();
        drop(l);
        self.draw();
    }

    pub fn reconnecting(&self, error: &str, attempt: u32, wait: Duration) {
        if self.json {
            self.json_line(json!({
                "event": "reconnecting",
                "error": error,
                "attempt": attempt,
                "retry_in_ms": wait.as_millis() as u64,
            }));
            return;
        }
        if !self.quiet && attempt == 1 {
            self.say(
                &format!(
                    "devsync: connection lost: {}; reconnecting",
                    escape_text(error)
                ),
                true,
            );
        }
        self.set_state(format!(
            "reconnecting (attempt {attempt}, next in {:.1} s): {}",
            wait.as_secs_f64(),
            escape_text(error)
        ));
    }

    pub fn halted(&self, reason: &str) {
        if self.json {
            self.json_line(json!({"event": "halted", "reason": reason}));
        }
        self.set_state("halted".into());
    }

    pub fn warning(&self, path: &str, message: &str) {
        if self.json {
            self.json_line(json!({"event": "warning", "path": path, "message": message}));
        } else if !self.quiet {
            self.say(
                &format!("devsync: warning: {}", located(path, message)),
                true,
            );
        }
    }

    /// Errors reported so far.
    pub fn errors(&self) -> u64 {
        self.errors.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn failing(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, u64>> {
        self.failing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Paths (and one for all pathless errors) whose errors after the `at`-th no later
    /// generation made good.
    pub fn failing_since(&self, at: u64) -> u64 {
        self.failing().values().filter(|&&n| n > at).count() as u64
    }

    /// Forgets errors up to the `at`-th: no flush waiting, nor any asked from now on, counts
    /// them.
    pub fn forget_up_to(&self, at: u64) {
        self.failing().retain(|_, n| *n > at);
    }

    /// A generation that began when `at` errors had been reported synced `paths`: their
    /// errors from before it are made good (its own stand). Not a name that is not valid
    /// UTF-8: two such names can look the same here.
    pub fn made_good<'a>(&self, at: u64, paths: impl IntoIterator<Item = &'a RelPath>) {
        let mut failing = self.failing();
        if failing.is_empty() {
            return;
        }
        for p in paths {
            let key = p.to_string(); // never "": a RelPath is not empty
            if !key.contains(char::REPLACEMENT_CHARACTER)
                && failing.get(&key).is_some_and(|&n| n <= at)
            {
                failing.remove(&key);
            }
        }
    }

    pub fn error(&self, path: &str, message: &str) {
        {
            // Numbered under the lock, so that a path's latest error is the one kept; ""
            // (no one path, never made good) holds the latest of those.
            let mut failing = self.failing();
            let n = self
                .errors
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1;
            failing.insert(path.to_string(), n);
        }
        if self.json {
            self.json_line(json!({"event": "error", "path": path, "message": message}));
        } else {
            self.say(&format!("devsync: error: {}", located(path, message)), true);
        }
    }
}

fn located(path: &str, message: &str) -> String {
    if path.is_empty() {
        escape_text(message)
    } else {
        format!("{}: {}", escape_name(path.as_bytes()), escape_text(message))
    }
}

impl Observer for Report {
    fn event(&self, ev: Event) {
        match ev {
            Event::Change(c) => {
                if self.itemize && !self.json {
                    self.say(&format!("{} {}", c.flags(true), shown(&c.path)), false);
                }
            }
            Event::Warning { path, message } => self.warning(&path, &message),
            Event::Error { path, message } => self.error(&path, &message),
            Event::Planned { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_counts_against_a_flush_until_a_later_generation_sends_that_path() {
        let r = Report::new(false, false, true, false);
        let (a, b) = (RelPath::new("a").unwrap(), RelPath::new("b").unwrap());
        r.error("a", "changed while being sent");
        let flush_at = r.errors(); // a flush asked for now does not answer for `a`
        r.error("b", "changed while being sent");
        r.error("", "--delete was refused");
        assert_eq!(r.failing_since(0), 3);
        assert_eq!(r.failing_since(flush_at), 2);
        // A generation that began before `b` failed does not make it good...
        r.made_good(1, [&b]);
        assert_eq!(r.failing_since(flush_at), 2);
        // ...one that began after does; nothing makes the pathless error good.
        let started = r.errors();
        r.made_good(started, [&a, &b]);
        assert_eq!(r.failing_since(0), 1);
        // An error in that same generation stands.
        let started = r.errors();
        r.error("a", "reading: permission denied");
        r.made_good(started, [&a]);
        assert_eq!(r.failing_since(started), 1);
        // Names that are not UTF-8 are never made good: two of them can print the same.
        let odd = RelPath::new(b"x\xff".to_vec()).unwrap();
        r.error(&odd.to_string(), "reading: permission denied");
        r.made_good(r.errors(), [&odd]);
        assert_eq!(r.failing_since(started), 2);
        // What no flush can count any more is forgotten.
        r.forget_up_to(r.errors());
        assert_eq!(r.failing_since(0), 0);
    }
}
