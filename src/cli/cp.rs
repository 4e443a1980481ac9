//! `devsync cp SRC... DST`: scp-like copies in every direction (local and remote, and between
//! two remotes through this client), each a session of the sync engine restricted to the
//! named files: a delta against an existing destination file, BLAKE3 verification, atomic
//! replace, mode and mtime kept. Sources are grouped by directory; each group is one session.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;

use super::output::Reporter;
use super::{OutputArgs, RemoteArgs, exit};
use crate::engine::RelPath;
use crate::engine::filter::FilterOptions;
use crate::proto::{CopySpec, Role, SyncOptions};
use crate::session::client::{self, Job, Outcome};
use crate::session::relay;
use crate::session::sender::AheadPolicy;
use crate::target::Target;
use crate::transport::remote::{self, Notice};
use crate::transport::ssh;

pub const CP_HELP: &str = "\
Examples:
  devsync cp build.log dbx_abc:/tmp/            a file into a directory on a devbox
  devsync cp dbx_abc:~/out/report.html .        and back
  devsync cp -r assets box:/srv/app/            a directory (only what differs travels)
  devsync cp dbx_a:~/data.db dbx_b:~/           devbox to devbox, through this machine

A file copied onto an existing file sends only the difference. Modes and modification
times are kept; files are verified (BLAKE3) and replaced atomically, so a failed copy leaves
the old file as it was. A destination that is an existing directory receives the sources by
name; otherwise the one source takes the destination's name. A ':' before any '/' makes a
path remote: write ./a:b for a local file named a:b. Symbolic links are copied as links.
Exit status: 0 ok, 1 error, 23 some files failed.";

#[derive(Args, Debug)]
pub struct CpArgs {
    /// Files (directories with -r) to copy, then where to copy them (targets as for push)
    #[arg(value_name = "PATH", num_args = 2.., required = true)]
    paths: Vec<String>,
    /// Copy directories and everything in them
    #[arg(short = 'r', long)]
    recursive: bool,
    /// Compare file contents (BLAKE3) instead of size and modification time
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
    output: OutputArgs,
    #[command(flatten)]
    remote: RemoteArgs,
}

pub fn run(a: CpArgs) -> Result<u8, super::Failure> {
    super::raise_fd_limit();
    crate::trace::init(a.output.verbose);
    run_inner(&a).map_err(|error| super::Failure {
        error,
        code: exit::FATAL,
        json: a.output.json,
    })
}

/// One session's worth of sources: a directory on one side and names in it.
#[derive(Debug)]
struct Group {
    dir: String,
    names: Vec<RelPath>,
}

/// Where a path is: this machine, or a remote (its target without the path, as a key).
fn side(t: &Target) -> Option<String> {
    match t {
        Target::Local(_) => None,
        Target::Devbox { id, user, .. } => Some(format!("{}@{id}", user.as_deref().unwrap_or(""))),
        Target::Ssh {
            user, host, port, ..
        } => Some(format!("{}@{host}:{port:?}", user.as_deref().unwrap_or(""))),
    }
}

fn path_of(t: &Target) -> String {
    match t {
        Target::Local(p) => p.display().to_string(),
        Target::Devbox { path, .. } | Target::Ssh { path, .. } => path.clone(),
    }
}

fn with_path(t: &Target, path: String) -> Target {
    match t.clone() {
        Target::Local(_) => Target::Local(PathBuf::from(path)),
        Target::Devbox { id, user, .. } => Target::Devbox { id, user, path },
        Target::Ssh {
            user, host, port, ..
        } => Target::Ssh {
            user,
            host,
            port,
            path,
        },
    }
}

/// `dir/name` of a source as written: its directory and its name (never `.`, `..` or `/`).
fn split_source(written: &str, path: &str) -> anyhow::Result<(String, RelPath)> {
    let trimmed = path.trim_end_matches('/');
    let (dir, name) = match trimmed.rsplit_once('/') {
        Some(("", name)) => ("/".to_string(), name),
        Some((dir, name)) => (dir.to_string(), name),
        None => (".".to_string(), trimmed),
    };
    if matches!(name, "" | "." | ".." | "~") {
        bail!("{written}: name a file or directory to copy (not {path:?})");
    }
    let name =
        RelPath::new(name.as_bytes().to_vec()).map_err(|e| anyhow::anyhow!("{written}: {e}"))?;
    Ok((dir, name))
}

/// A local source must exist, and be a directory only with `-r`: said before connecting.
fn check_local_source(p: &Path, recursive: bool) -> anyhow::Result<()> {
    let md = std::fs::symlink_metadata(p).with_context(|| format!("{}", p.display()))?;
    if md.is_dir() && !recursive {
        bail!("{} is a directory (copy directories with -r)", p.display());
    }
    Ok(())
}

fn run_inner(a: &CpArgs) -> anyhow::Result<u8> {
    let started = Instant::now();
    let (dst_written, srcs_written) = a
        .paths
        .split_last()
        .context("give at least one source and a destination")?;
    let dst = Target::parse(dst_written)?;
    let mut srcs = Vec::new();
    for s in srcs_written {
        srcs.push((s.as_str(), Target::parse(s)?));
    }
    let src_side = side(&srcs[0].1);
    if let Some((w, _)) = srcs.iter().find(|(_, t)| side(t) != src_side) {
        bail!(
            "{w}: every source must be on the same machine as {} (copy from each in its own command)",
            srcs_written[0]
        );
    }
    // Sources grouped by directory, in the order given.
    let mut groups: Vec<Group> = Vec::new();
    for (w, t) in &srcs {
        if let Target::Local(p) = t {
            check_local_source(p, a.recursive)?;
        }
        let (dir, name) = split_source(w, &path_of(t))?;
        match groups.iter_mut().find(|g| g.dir == dir) {
            Some(g) if g.names.contains(&name) => {}
            Some(g) => g.names.push(name),
            None => groups.push(Group {
                dir,
                names: vec![name],
            }),
        }
    }
    let several = srcs.len() > 1;
    let mut dst_root = path_of(&dst);
    // Several sources need a directory to go into: a trailing '/' makes the receiver insist.
    if several && !dst_root.ends_with('/') {
        dst_root.push('/');
    }
    let reporter = a.output.reporter(src_side.is_none());
    let ropts = a.remote.options();
    let rt = super::runtime()?;
    let mut total: Option<Outcome> = None;
    for g in &groups {
        let opts = SyncOptions {
            checksum: a.checksum,
            fsync: a.fsync,
            inplace: a.inplace,
            // A copy takes what it is given: no ignore files, no VCS exclusion.
            filters: FilterOptions {
                gitignore: false,
                exclude_vcs: false,
                excludes: Vec::new(),
            },
            copy: Some(CopySpec {
                names: g.names.clone(),
                recursive: a.recursive,
            }),
            compress: a.remote.compress(if matches!(dst, Target::Local(_)) {
                &srcs[0].1
            } else {
                &dst
            }),
            ..SyncOptions::default()
        };
        let src = with_path(&srcs[0].1, g.dir.clone());
        let o = rt.block_on(one(&src, &dst, &dst_root, opts, &ropts, reporter.clone()));
        reporter.finish_bar();
        let o = o?;
        total = Some(match total {
            None => o,
            Some(mut t) => {
                t.stats.add(&o.stats);
                t.bytes_sent += o.bytes_sent;
                t.bytes_received += o.bytes_received;
                t.raw_sent += o.raw_sent;
                t.raw_received += o.raw_received;
                t
            }
        });
    }
    let outcome = total.context("nothing to copy")?;
    let code = OutputArgs::exit_code(&outcome, &reporter);
    a.output
        .summary(&outcome, started.elapsed(), &reporter, code, false);
    Ok(code)
}

/// One group's session: `src` names the sources' directory, `dst_root` the destination.
async fn one(
    src: &Target,
    dst: &Target,
    dst_root: &str,
    opts: SyncOptions,
    ropts: &remote::RemoteOptions,
    reporter: Arc<Reporter>,
) -> anyhow::Result<Outcome> {
    match (src, dst) {
        // From here (to a local directory through a local helper, or to a remote).
        (Target::Local(dir), _) => {
            let job = Job {
                role: Role::Sender,
                local_root: dir.clone(),
                remote_root: Vec::new(),
                opts,
                obs: reporter.clone(),
                memo: None,              // run_remote looks it up
                ahead: AheadPolicy::Off, // run_remote decides
            };
            super::sync::run_remote(with_path(dst, dst_root.to_string()), job, ropts, reporter)
                .await
        }
        // To here: this process receives.
        (_, Target::Local(_)) => {
            let local_root =
                std::path::absolute(dst_root).with_context(|| format!("resolving {dst_root}"))?;
            let job = Job {
                role: Role::Receiver,
                local_root,
                remote_root: Vec::new(),
                opts,
                obs: reporter.clone(),
                memo: None,              // run_remote looks it up
                ahead: AheadPolicy::Off, // run_remote decides
            };
            super::sync::run_remote(src.clone(), job, ropts, reporter).await
        }
        // Remote to remote: two helpers, frames passed between them.
        _ => {
            let notice: Notice = {
                let r = reporter.clone();
                Arc::new(move |m: String| r.notice(&m))
            };
            let dst = with_path(dst, dst_root.to_string());
            // Each Hello goes with the exec that starts its helper (a round trip less).
            let (from_root, to_root) = (
                src.remote_path().as_bytes().to_vec(),
                dst.remote_path().as_bytes().to_vec(),
            );
            let hello_from = client::hello_bytes(Role::Receiver, &from_root, &opts);
            let hello_to = client::hello_bytes(Role::Sender, &to_root, &opts);
            let (early_from, early_to) = (|| hello_from.clone(), || hello_to.clone());
            let (from, to) = tokio::try_join!(
                remote::open(src, ropts, notice.clone(), &early_from),
                remote::open(&dst, ropts, notice, &early_to),
            )?;
            let (mut st_from, mut st_to) = (from.helper.status.clone(), to.helper.status.clone());
            let result = relay::copy(
                relay::End {
                    reader: from.helper.reader,
                    writer: from.helper.writer,
                    root: from_root,
                    hello_sent: true,
                },
                relay::End {
                    reader: to.helper.reader,
                    writer: to.helper.writer,
                    root: to_root,
                    hello_sent: true,
                },
                &opts,
                reporter,
            )
            .await;
            let result = match result {
                Ok(o) => Ok(o),
                Err(e) => {
                    let limit = Duration::from_secs(2);
                    let said: Vec<String> = [
                        ssh::wait_exit(&mut st_from, limit).await.stderr_text(),
                        ssh::wait_exit(&mut st_to, limit).await.stderr_text(),
                    ]
                    .into_iter()
                    .filter(|s| !s.is_empty() && !s.contains(&e.to_string()))
                    .collect();
                    match said.is_empty() {
                        true => Err(e.into()),
                        false => Err(anyhow::anyhow!(
                            "{e}\nremote helper said: {}",
                            said.join("; ")
                        )),
                    }
                }
            };
            from.conn.close().await;
            to.conn.close().await;
            result
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_split_into_directory_and_name() {
        let n = |s: &str| RelPath::new(s.as_bytes().to_vec()).unwrap();
        assert_eq!(split_source("a", "a").unwrap(), (".".into(), n("a")));
        assert_eq!(
            split_source("x", "/tmp/a/").unwrap(),
            ("/tmp".into(), n("a"))
        );
        assert_eq!(split_source("x", "/a").unwrap(), ("/".into(), n("a")));
        assert_eq!(split_source("x", "~/d/f").unwrap(), ("~/d".into(), n("f")));
        for bad in [".", "..", "/", "~", "a/.."] {
            assert!(split_source(bad, bad).is_err(), "{bad}");
        }
    }
}
