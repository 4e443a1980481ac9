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
    let mut cmd = Command::new(program);
    cmd.env_clear()
        .env("HOME", &who.home)
        .env("USER", &who.user)
        .env("LOGNAME", &who.user)
        .env("SHELL", "/bin/sh")
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()),
        )
        .current_dir(&who.home)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
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
pub async fn run(channel: Channel<Msg>, handle: Handle, mut cmd: Command, label: String) {
    let id = channel.id();
    let (mut read, write) = channel.split();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let mut err = write.make_writer_ext(Some(1));
            let _ = err
                .write_all(format!("devsync serve: cannot start the command: {e}\n").as_bytes())
                .await;
            let _ = err.flush().await;
            let _ = write.exit_status(127).await;
            let _ = write.eof().await;
            let _ = write.close().await; // the client may be gone: nobody to tell
            return;
        }
    };
    let group = child.id();
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
                ChannelMsg::Signal { signal } => signal_group(group, &signal),
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
        s = child.wait() => Some(s.ok()),
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
            terminate(group, &mut child).await;
        }
    }
}

async fn report(
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

/// Ends `child` and its process group: SIGTERM, then SIGKILL after [`TERM_GRACE`].
async fn terminate(group: Option<u32>, child: &mut Child) {
    let kill = |sig: rustix::process::Signal| {
        if let Some(pgid) = group
            .and_then(|g| i32::try_from(g).ok())
            .and_then(rustix::process::Pid::from_raw)
        {
            let _ = rustix::process::kill_process_group(pgid, sig); // already gone: fine
        }
    };
    kill(rustix::process::Signal::TERM);
    if tokio::time::timeout(TERM_GRACE, child.wait())
        .await
        .is_err()
    {
        kill(rustix::process::Signal::KILL);
        let _ = child.wait().await; // SIGKILL cannot be refused
    }
}

/// Delivers a signal the client asked for to the command's group.
fn signal_group(group: Option<u32>, sig: &Sig) {
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
