//! `devsync watch` (keep a remote tree in sync as files change) and `devsync flush` (wait
//! until a watch has sent every change made so far).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;

use super::{FilterArgs, RemoteArgs, exit};
use crate::engine::scan::check_root;
use crate::proto::SyncOptions;
use crate::target::Target;
use crate::watch::report::Report;
use crate::watch::{self, End};

#[derive(Args, Debug, Clone)]
pub struct WatchArgs {
    /// The local directory to watch
    #[arg(value_name = "SRC")]
    src: String,
    /// Where to keep a mirror of it (a target, see below). Created if missing
    #[arg(value_name = "DEST")]
    dst: String,
    /// In the initial sync, delete destination entries that SRC does not have (changes made
    /// while watching, deletions included, always propagate)
    #[arg(long)]
    delete: bool,
    /// With --delete: skip the guard against emptying or mostly-emptying the destination
    #[arg(long, requires = "delete")]
    force_delete: bool,
    /// Print one line per change, rsync --itemize-changes style
    #[arg(short = 'i', long = "itemize", visible_alias = "itemize-changes")]
    itemize: bool,
    /// In the initial sync, compare file contents (BLAKE3) instead of size and mtime
    #[arg(short = 'c', long)]
    checksum: bool,
    /// Flush every written file to disk before it replaces the old one
    #[arg(long)]
    fsync: bool,
    /// Update changed files with an old copy of over 8 MiB by writing the changed ranges into
    /// that file, after the new content is verified, instead of replacing it: costs the change,
    /// not the file, where the filesystem has no reflinks. Not atomic: while it writes, readers
    /// see old and new mixed, and other hard links to the file change too (as rsync --inplace)
    #[arg(long)]
    inplace: bool,
    #[command(flatten)]
    filters: FilterArgs,
    /// One JSON object per line on stdout (ready, synced, reconnecting, halted, error)
    #[arg(long)]
    json: bool,
    /// Print only errors
    #[arg(short, long)]
    quiet: bool,
    /// Timed milestones of both ends on stderr (as DEVSYNC_TRACE=1 does)
    #[arg(short, long)]
    verbose: bool,
    /// Milliseconds without a new event that end a batch of changes
    #[arg(long, value_name = "MS", default_value_t = 3)]
    coalesce_ms: u64,
    #[command(flatten)]
    remote: RemoteArgs,
}

pub const WATCH_HELP: &str = "\
Examples:
  devsync watch . dbx_abc:~/project             keep a devbox's copy in sync while you work
  devsync watch --json src box:/srv/app         one JSON line per event, for tools
  devsync flush .                               (another shell) wait until all is on the remote

While watching, every change (deletions and renames included) is sent within milliseconds;
a renamed directory is renamed on the remote. The watch halts, deleting nothing, if the
local root is deleted, replaced or emptied. It reconnects by itself when the link drops.
Exit status: 0 after Ctrl-C, 1 error, 26 halted.";

pub fn run(a: WatchArgs) -> Result<u8, super::Failure> {
    super::raise_fd_limit();
    crate::trace::init(a.verbose);
    let json = a.json;
    run_inner(a).map_err(|error| super::Failure {
        error,
        code: exit::FATAL,
        json,
    })?
}

fn run_inner(a: WatchArgs) -> anyhow::Result<Result<u8, super::Failure>> {
    let Target::Local(local_root) = Target::parse(&a.src)? else {
        bail!("watch SRC must be a local directory: it is the tree being watched");
    };
    check_root(&local_root).context("source")?;
    let target = Target::parse(&a.dst)?;
    if let Target::Local(dst) = &target {
        refuse_nested(&local_root, dst)?;
    }
    let opts = SyncOptions {
        delete: a.delete,
        force_delete: a.force_delete,
        dry_run: false,
        checksum: a.checksum,
        fsync: a.fsync,
        inplace: a.inplace,
        filters: a.filters.options(),
        copy: None,
        compress: a.remote.compress(&target),
    };
    if let Err(e) = opts.filters.walker(Path::new(".")) {
        bail!("{e}");
    }
    let report = Arc::new(Report::new(
        a.json,
        a.itemize,
        a.quiet,
        std::io::stderr().is_terminal(),
    ));
    let cfg = watch::Config {
        local_root,
        target,
        target_text: a.dst.clone(),
        opts,
        ropts: a.remote.options(),
        quiet: Duration::from_millis(a.coalesce_ms.clamp(1, 1000)),
        max_wait: Duration::from_millis((a.coalesce_ms * 10).clamp(20, 2000)),
    };
    let rt = super::runtime()?;
    let end = rt.block_on(watch::run(cfg, report.clone()));
    report.finish();
    match end? {
        End::Interrupted => Ok(Ok(exit::OK)),
        // Said already (as a JSON event too): the failure is the text and the status.
        End::Halted(reason) => Ok(Err(super::Failure {
            error: anyhow::anyhow!("watch halted: {reason}"),
            code: exit::HALTED,
            json: false,
        })),
    }
}

/// A local destination inside the watched tree (or around it) would sync its own writes.
fn refuse_nested(src: &Path, dst: &Path) -> anyhow::Result<()> {
    let canon = |p: &Path| -> PathBuf {
        // The destination may not exist yet: resolve its deepest existing ancestor.
        let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        let mut base = abs.clone();
        let mut rest = Vec::new();
        while !base.exists() {
            match (base.file_name().map(|n| n.to_os_string()), base.parent()) {
                (Some(n), Some(parent)) => {
                    rest.push(n);
                    base = parent.to_path_buf();
                }
                _ => break,
            }
        }
        let mut out = std::fs::canonicalize(&base).unwrap_or(base);
        for n in rest.into_iter().rev() {
            out.push(n);
        }
        out
    };
    let (s, d) = (canon(src), canon(dst));
    if d.starts_with(&s) || s.starts_with(&d) {
        bail!(
            "the destination {} and the watched directory {} contain one another: every change \
             would trigger itself. Choose a destination outside it",
            d.display(),
            s.display()
        );
    }
    Ok(())
}

#[derive(Args, Debug, Clone)]
pub struct FlushArgs {
    /// The directory a `devsync watch` is watching
    #[arg(value_name = "DIR", default_value = ".")]
    dir: PathBuf,
    /// Seconds to wait before giving up
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    timeout: u64,
    /// Print the answer as JSON
    #[arg(long)]
    json: bool,
}

pub fn flush(a: FlushArgs) -> Result<u8, super::Failure> {
    let json = a.json;
    let fail = |error| super::Failure {
        error,
        code: exit::FATAL,
        json,
    };
    let rt = super::runtime().map_err(|e| fail(e.into()))?;
    let timeout = Duration::from_secs(a.timeout.max(1));
    let generation = rt
        .block_on(watch::flush::request(&a.dir, timeout))
        .map_err(fail)?;
    if json {
        println!(
            "{}",
            serde_json::json!({"ok": true, "generation": generation})
        );
    }
    Ok(exit::OK)
}
