//! The processes a devbox session runs: `exec` commands (`sh -c`) and the `sftp` subsystem (a
//! `devsync sftp-server` child), each as the devbox's own user when the endpoint isolates
//! devboxes, with a clean environment (nothing of the endpoint's own, such as its API token),
//! in the devbox's home and in a process group of its own.
//!
//! A process lives as long as its channel: when the channel closes or the connection drops,
//! its stdio is closed and its group is sent SIGTERM, then SIGKILL, so a helper whose client
//! vanished never stays blocked writing to a pipe nobody reads. Its exit status (or the signal
//! that ended it) is reported to the client once all of its output went out.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use russh::server::{Handle, Msg};
use russh::{Channel, ChannelMsg, Sig};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

use super::log;

/// Who a devbox's processes run as, and where.
#[derive(Debug, Clone)]
pub struct Identity {
    /// `(uid, gid)` to switch to; `None`: the endpoint's own user.
    pub ids: Option<(u32, u32)>,
    pub user: String,
    pub home: PathBuf,
}

impl Identity {
    /// The uid the command's processes have: only processes of that uid are ever signalled.
    pub fn uid(&self) -> u32 {
        self.ids
            .map_or_else(|| rustix::process::geteuid().as_raw(), |(u, _)| u)
    }
}

/// Tells the client its command could not be started (`why` on stderr, exit status 127, as
/// a shell says it), and closes the channel.
pub(super) async fn not_started(write: &russh::ChannelWriteHalf<Msg>, why: &str) {
    let mut err = write.make_writer_ext(Some(1));
    let _ = err
        .write_all(format!("devsync serve: {why}").as_bytes())
        .await;
    let _ = err.flush().await;
    let _ = write.exit_status(127).await;
    let _ = write.eof().await;
    let _ = write.close().await; // the client may be gone: nobody to tell
}

/// How long a process whose channel went away gets between SIGTERM and SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(2);

/// Variables a session inherits from the endpoint's environment (debugging and test knobs);
/// everything else is set afresh.
const PASSED_ON: &[&str] = &[
    "DEVSYNC_TRACE",
    "DEVSYNC_PEER_TIMEOUT_MS",
    "DEVSYNC_NO_TMPFILE",
    "LANG",
    "LC_ALL",
    "TZ",
];

/// A command for `who`: environment, working directory, user and process group set.
pub fn command(program: &std::path::Path, who: &Identity) -> Command {
    let mut cmd = base_command(program, who);
    cmd.process_group(0);
    cmd
}

/// [`command`] without the process group (a command on a terminal makes its own session).
pub fn base_command(program: &std::path::Path, who: &Identity) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_clear()
        .env("HOME", &who.home)
        .env("USER", &who.user)
        .env("LOGNAME", &who.user)
        .env("SHELL", super::pty::login_shell(&who.user))
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()),
        )
        .current_dir(&who.home)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for var in PASSED_ON {
        if let Some(v) = std::env::var_os(var) {
            cmd.env(var, v);
        }
    }
    if let Some((uid, gid)) = who.ids {
        // std drops supplementary groups (setgroups(0)) before switching uid.
        cmd.uid(uid).gid(gid);
    }
    cmd
}

/// Runs `cmd` with `channel` as its stdio until it exits or the channel goes away.
pub async fn run(
    channel: Channel<Msg>,
    handle: Handle,
    mut cmd: Command,
    who: Identity,
    label: String,
) {
    let id = channel.id();
    let uid = who.uid();
    let (mut read, write) = channel.split();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return not_started(&write, &format!("cannot start the command: {e}\n")).await,
    };
    let group = child.id();
    // Set once the command's leader is reaped: its pid (the group's id) may then be reused,
    // so nothing is sent to "the group" any more, only to processes still seen in it.
    let reaped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reaped_in = reaped.clone();
    let (Some(stdin), Some(mut stdout), Some(mut stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return;
    };
    // Client → stdin. Ends when the channel closes or the connection is gone.
    let (gone_tx, mut gone) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        // Dropping our end is what gives the command EOF (shutting a pipe down does not).
        let mut stdin = Some(stdin);
        while let Some(msg) = read.wait().await {
            match msg {
                ChannelMsg::Data { data } => {
                    if let Some(s) = &mut stdin
                        && (s.write_all(&data).await.is_err() || s.flush().await.is_err())
                    {
                        stdin = None;
                    }
                }
                ChannelMsg::Eof => stdin = None,
                ChannelMsg::Signal { signal }
                    if !reaped_in.load(std::sync::atomic::Ordering::Acquire) =>
                {
                    signal_group(group, &signal)
                }
                ChannelMsg::Close => break,
                _ => {}
            }
        }
        drop(stdin);
        let _ = gone_tx.send(()); // nobody waits once the command is over
    });
    // Output goes out as soon as it is read (no buffering on our side), in pieces of up to
    // 64 KiB: a helper's bulk data leaves in big SSH packets, an interactive prompt at once.
    let mut out = write.make_writer();
    let mut err = write.make_writer_ext(Some(1));
    let copy_out = tokio::spawn(async move {
        let mut r = BufReader::with_capacity(64 << 10, &mut stdout);
        tokio::io::copy_buf(&mut r, &mut out).await
    });
    let copy_err = tokio::spawn(async move {
        let mut r = BufReader::with_capacity(16 << 10, &mut stderr);
        tokio::io::copy_buf(&mut r, &mut err).await
    });
    let (abort_out, abort_err) = (copy_out.abort_handle(), copy_err.abort_handle());
    let status = tokio::select! {
        s = child.wait() => {
            reaped.store(true, std::sync::atomic::Ordering::Release);
            Some(s.ok())
        }
        _ = &mut gone => None,
    };
    let status = match status {
        // Exited: let its output drain (a background child may still hold the pipes open).
        Some(status) => tokio::select! {
            _ = async { let _ = copy_out.await; let _ = copy_err.await; } => Some(status),
            _ = &mut gone => None,
        },
        None => None,
    };
    match status {
        Some(status) => report(&handle, &write, id, status).await,
        None => {
            log(&format!("{label}: channel closed; stopping its command"));
            // Our ends of its pipes go first: a command blocked writing gets EPIPE at once.
            abort_out.abort();
            abort_err.abort();
            terminate(group, uid, &mut child).await;
            reaped.store(true, std::sync::atomic::Ordering::Release);
        }
    }
}

pub(super) async fn report(
    handle: &Handle,
    write: &russh::ChannelWriteHalf<Msg>,
    id: russh::ChannelId,
    status: Option<std::process::ExitStatus>,
) {
    use std::os::unix::process::ExitStatusExt;
    // The client may already be gone; there is no one to tell.
    match status.and_then(|s| s.signal().map(|sig| (sig, s.core_dumped()))) {
        Some((sig, core)) => {
            let _ = handle
                .exit_signal_request(id, sig_of(sig), core, String::new(), "en".into())
                .await;
        }
        None => {
            let code = status.and_then(|s| s.code()).unwrap_or(255);
            let _ = write.exit_status(code as u32).await;
        }
    }
    let _ = write.eof().await;
    let _ = write.close().await;
}

/// Ends `child` and everything left in its process group: SIGTERM, then, after
/// [`TERM_GRACE`], SIGKILL to whatever is still there (its leader may be gone, its children
/// not, and some ignore TERM).
pub(super) async fn terminate(group: Option<u32>, uid: u32, child: &mut Child) {
    use rustix::process::Signal;
    signal_members(group, uid, Signal::TERM);
    let _ = tokio::time::timeout(TERM_GRACE, child.wait()).await; // exited or not: KILL next
    signal_members(group, uid, Signal::KILL);
    let _ = child.wait().await; // SIGKILL cannot be refused
}

/// Sends `sig` to each process in group `group` that runs as `uid`, found by name in /proc
/// (never to "the group" by id: a group whose members are all gone may have had its id
/// reused by someone else's process).
fn signal_members(group: Option<u32>, uid: u32, sig: rustix::process::Signal) {
    signal_matching(group, 2, uid, sig)
}

/// [`signal_members`] for a session (a terminal's shell made one): its jobs are process
/// groups of their own.
pub(super) fn signal_session(session: Option<u32>, uid: u32, sig: rustix::process::Signal) {
    signal_matching(session, 3, uid, sig)
}

/// Sends `sig` to each process of `uid` whose `/proc/<pid>/stat` field `field` (counted after
/// the command name: 2 the process group, 3 the session) is `id`.
fn signal_matching(id: Option<u32>, field: usize, uid: u32, sig: rustix::process::Signal) {
    use std::os::unix::fs::MetadataExt;
    let Some(group) = id else { return };
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in procs.filter_map(Result::ok) {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let owned = std::fs::metadata(e.path()).is_ok_and(|m| m.uid() == uid);
        let in_group = std::fs::read_to_string(e.path().join("stat"))
            .ok()
            .and_then(|st| {
                // `pid (comm) state ppid pgrp …`; comm may hold spaces and parentheses.
                st.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(field)?.parse::<u32>().ok())
            })
            == Some(group);
        if owned
            && in_group
            && let Some(p) = rustix::process::Pid::from_raw(pid)
        {
            let _ = rustix::process::kill_process(p, sig); // it may have just exited
        }
    }
}

/// Delivers a signal the client asked for to the command's group.
pub(super) fn signal_group(group: Option<u32>, sig: &Sig) {
    use rustix::process::Signal;
    let s = match sig {
        Sig::HUP => Signal::HUP,
        Sig::INT => Signal::INT,
        Sig::QUIT => Signal::QUIT,
        Sig::KILL => Signal::KILL,
        Sig::TERM => Signal::TERM,
        Sig::USR1 => Signal::USR1,
        Sig::ALRM => Signal::ALARM,
        Sig::PIPE => Signal::PIPE,
        _ => return,
    };
    if let Some(pgid) = group
        .and_then(|g| i32::try_from(g).ok())
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process_group(pgid, s); // already gone: fine
    }
}

fn sig_of(n: i32) -> Sig {
    match n {
        1 => Sig::HUP,
        2 => Sig::INT,
        3 => Sig::QUIT,
        4 => Sig::ILL,
        6 => Sig::ABRT,
        8 => Sig::FPE,
        9 => Sig::KILL,
        10 => Sig::USR1,
        11 => Sig::SEGV,
        13 => Sig::PIPE,
        14 => Sig::ALRM,
        15 => Sig::TERM,
        other => Sig::Custom(format!("SIG{other}")),
    }
}
