//! `devsync push` and `devsync pull`: resolve both sides, start the helper, run the session,
//! report.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::output::Reporter;
use super::{SyncArgs, exit};
use crate::engine::scan::check_root;
use crate::proto::{LinkMemo, Role, SyncOptions};
use crate::session::client::{self, Job, Outcome, Ran};
use crate::session::sender::AheadPolicy;
use crate::target::{Target, links, pushed};
use crate::transport::keep;
use crate::transport::local::{self, LocalHelper};
use crate::transport::remote::{self, Notice, RemoteOptions};
use crate::transport::ssh;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Push,
    Pull,
}

pub fn run(a: SyncArgs, dir: Direction) -> Result<u8, super::Failure> {
    super::raise_fd_limit();
    crate::trace::init(a.output.verbose);
    run_inner(&a, dir).map_err(|error| super::Failure {
        error,
        code: exit::FATAL,
        json: a.output.json,
    })
}

fn run_inner(a: &SyncArgs, dir: Direction) -> anyhow::Result<u8> {
    let started = Instant::now();
    let src = Target::parse(&a.src)?;
    let dst = Target::parse(&a.dst)?;
    let (local, remote, role) = match dir {
        Direction::Push => (src, dst, Role::Sender),
        Direction::Pull => (dst, src, Role::Receiver),
    };
    let Target::Local(local_root) = local else {
        bail!(
            "{} must be a local directory: one side of a sync is this machine",
            if dir == Direction::Push {
                "push SRC"
            } else {
                "pull DEST"
            }
        );
    };
    check_local_root(&local_root, dir)?;
    let opts = SyncOptions {
        delete: a.delete,
        force_delete: a.force_delete,
        dry_run: a.dry_run,
        checksum: a.checksum,
        fsync: a.fsync,
        inplace: a.inplace,
        filters: a.filters.options(),
        copy: None,
        compress: a.remote.compress(&remote),
    };
    // Bad patterns are a usage error: report them before connecting anywhere.
    if let Err(e) = opts.filters.walker(Path::new(".")) {
        bail!("{e}");
    }
    let reporter = a.output.reporter(role == Role::Sender);
    let job = Job {
        role,
        local_root,
        remote_root: Vec::new(),
        opts,
        obs: reporter.clone(),
        memo: None,              // run_remote looks it up
        ahead: AheadPolicy::Off, // run_remote decides
    };
    let ropts = a.remote.options();
    let rt = super::runtime()?;
    let outcome = rt.block_on(run_remote(remote, job, &ropts, reporter.clone()));
    reporter.finish_bar();
    let outcome = outcome?;
    let elapsed = started.elapsed();
    let code = super::OutputArgs::exit_code(&outcome, &reporter);
    a.output
        .summary(&outcome, elapsed, &reporter, code, a.dry_run);
    Ok(code)
}

fn check_local_root(root: &Path, dir: Direction) -> anyhow::Result<()> {
    match dir {
        Direction::Push => check_root(root).context("source"),
        // A missing destination is created by the receiver once the session has started,
        // so a pull that fails to connect leaves nothing behind.
        Direction::Pull => match std::fs::metadata(root) {
            Ok(md) if !md.is_dir() => bail!("destination {} is not a directory", root.display()),
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("destination {}", root.display())),
        },
    }
}

pub(super) async fn run_remote(
    remote: Target,
    mut job: Job,
    ropts: &RemoteOptions,
    reporter: Arc<Reporter>,
) -> anyhow::Result<Outcome> {
    match remote {
        Target::Local(path) => {
            let abs: PathBuf = std::path::absolute(&path)
                .with_context(|| format!("resolving {}", path.display()))?;
            job.remote_root = abs.into_os_string().into_encoded_bytes();
            let helper = LocalHelper::spawn().context("starting the helper")?;
            let (stdout, stdin, (mut child, stderr)) = helper.into_parts();
            let result = client::run(stdout, stdin, job).await;
            if result.is_ok() {
                // Every file is in place once the session ends; the helper's exit (which may
                // include the kernel freeing a big replaced file) is not worth waiting for.
                return Ok(result?);
            }
            let _ = child.start_kill(); // it may already have exited
            let (status, err) = local::finish(child, stderr).await;
            match result {
                Ok(o) => Ok(o),
                // The helper's own report of an error we already have adds nothing.
                Err(e) if err.is_empty() || err.contains(&e.to_string()) => Err(e.into()),
                Err(e) => Err(anyhow::anyhow!("{e}\nhelper (exit {status:?}): {err}")),
            }
        }
        target => {
            let rep = reporter.clone();
            let notice: Notice = Arc::new(move |m: String| reporter.notice(&m));
            job.remote_root = target.remote_path().as_bytes().to_vec();
            // What earlier pushes to this host left behind (pushes only: on a pull the helper
            // sends, and it keeps no records).
            let host = keep::endpoint(&target).filter(|_| job.role == Role::Sender);
            // Big files are hashed while we connect, but not those unchanged since the last
            // completed push of these trees began (the helper most likely has them).
            let pushed = host
                .as_deref()
                .filter(|_| !job.opts.dry_run)
                .map(|ep| pushed::key(ep, &job.local_root, &job.remote_root, &job.opts));
            job.ahead = match pushed.as_deref().map(pushed::load) {
                None => AheadPolicy::Off,
                Some(None) => AheadPolicy::All,
                Some(Some(t)) => AheadPolicy::ChangedSince(t),
            };
            let began = crate::engine::Mtime::now();
            // Scan while connecting: the handshakes and the walk overlap.
            let mut prepared = client::prepare(&job)?;
            // Our compressor starts where the last big push to this host settled. (Only a
            // push's: on a pull the helper's writer carries the data.)
            let link = host.filter(|_| job.opts.compress == crate::proto::Compress::Auto);
            job.memo = link
                .as_deref()
                .and_then(links::load)
                .map(|(level, raw_bps)| LinkMemo { level, raw_bps });
            if let Some(m) = job.memo {
                crate::trace!(
                    "compress",
                    "starting at level {} (remembered for this host; raw delivered {:.1} MB/s)",
                    m.level,
                    m.raw_bps as f64 / 1e6
                );
            }
            let remember = |o: &Outcome| {
                if let (Some(l), Some(m)) = (&link, o.memo) {
                    links::save(l, (m.level, m.raw_bps));
                }
                // Only a push that brought everything over says the helper has what did not
                // change since.
                let complete = super::OutputArgs::exit_code(o, &rep) == super::exit::OK;
                if let Some(k) = pushed.as_ref().filter(|_| complete) {
                    pushed::save(k, began);
                }
            };
            let endpoint = keep::wanted(&target, ropts);
            if let Some(ep) = &endpoint {
                match keep::attach(ep, &target, ropts).await {
                    Ok((helper, pid)) => {
                        crate::trace!("client", "reusing the kept connection (keeper pid {pid})");
                        let ran = client::run_or_hand_back(
                            helper.reader,
                            helper.writer,
                            job.clone(),
                            prepared,
                            false,
                        )
                        .await;
                        match ran {
                            Ran::Done(result) => {
                                let o = result?;
                                remember(&o);
                                return Ok(o);
                            }
                            // The keeper lost its helper and found no other: nothing was done,
                            // so the sync starts again on a connection of its own, with the
                            // scan it already has.
                            Ran::Unanswered(p) => {
                                crate::trace!(
                                    "client",
                                    "the kept helper ended before answering; connecting afresh"
                                );
                                prepared = p;
                            }
                        }
                    }
                    Err(why) => crate::trace!("client", "not reusing a connection: {why}"),
                }
            }
            // The Hello, and a small tree's list, go with the command that starts the helper (saves
            // two round trips).
            let hello = client::hello_bytes(job.role, &job.remote_root, &job.opts);
            let remote = remote::open(&target, ropts, notice, &prepared.early(hello)).await?;
            let mut status = remote.helper.status.clone();
            let result = client::run_ready(
                remote.helper.reader,
                remote.helper.writer,
                job,
                prepared,
                true,
            )
            .await;
            match result {
                Ok(o) => {
                    remember(&o);
                    remote.conn.close().await;
                    if let Some(ep) = &endpoint {
                        keep::spawn(ep, ropts.keep_args.clone(), ropts.keep);
                    }
                    Ok(o)
                }
                Err(e) => {
                    let st = ssh::wait_exit(&mut status, Duration::from_secs(2)).await;
                    let err = st.stderr_text();
                    remote.conn.close().await;
                    if err.is_empty() || err.contains(&e.to_string()) {
                        Err(e.into())
                    } else {
                        Err(anyhow::anyhow!("{e}\nremote helper said: {err}"))
                    }
                }
            }
        }
    }
}
