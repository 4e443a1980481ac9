//! Sessions on a terminal for the built-in SSH server: a `pty-req` gives the channel a pseudo
//! terminal, and the shell (or an `exec` command) then runs on it as the leader of a session
//! of its own, with the terminal as its controlling tty; `window-change` resizes it and
//! signals go to its process group, as with OpenSSH.
//!
//! Like [`process`](super::process), a command lives as long as its channel, and its exit
//! status (or signal) is reported once its output went out. This module does not decide who
//! may run what; the SSH handler does.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use russh::server::{Handle, Msg};
use russh::{Channel, ChannelMsg};
use rustix::termios::Winsize;
use tokio::process::Command;
use tokio::sync::mpsc;

use super::log;
use super::process::{self, Identity};

/// What a client asked for in `pty-req`.
#[derive(Debug, Clone)]
pub struct PtyRequest {
    pub term: String,
    pub cols: u32,
    pub rows: u32,
    pub pix_width: u32,
    pub pix_height: u32,
}

impl PtyRequest {
    fn winsize(&self) -> Winsize {
        winsize(self.cols, self.rows, self.pix_width, self.pix_height)
    }
}

fn winsize(cols: u32, rows: u32, px: u32, py: u32) -> Winsize {
    let clamp = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
    Winsize {
        ws_row: clamp(rows),
        ws_col: clamp(cols),
        ws_xpixel: clamp(px),
        ws_ypixel: clamp(py),
    }
}

/// How long output still in the terminal is read after the command exited (a background
/// process that keeps the terminal open does not hold the session forever).
const DRAIN: Duration = Duration::from_millis(500);

/// The user's login shell from `/etc/passwd` (`/bin/sh` if none is named).
pub fn login_shell(user: &str) -> std::path::PathBuf {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.first() == Some(&user))
        .and_then(|f| f.get(6).map(|s| s.trim().to_string()))
        .filter(|s| !s.is_empty() && std::path::Path::new(s).is_file())
        .unwrap_or_else(|| "/bin/sh".into())
        .into()
}

/// A new pseudo terminal: (master, slave), the slave owned by `ids` when given.
fn open_pty(req: &PtyRequest, ids: Option<(u32, u32)>) -> std::io::Result<(OwnedFd, OwnedFd)> {
    use rustix::fs::{Mode, OFlags};
    use rustix::pty::OpenptFlags;
    let master =
        rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    rustix::pty::grantpt(&master)?;
    rustix::pty::unlockpt(&master)?;
    let name = rustix::pty::ptsname(&master, Vec::new())?;
    let slave = rustix::fs::open(
        name.as_c_str(),
        OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    if let Some((uid, gid)) = ids {
        // Its user's own terminal, as login(1) leaves it.
        rustix::fs::fchown(
            &slave,
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
        )?;
        rustix::fs::fchmod(&slave, Mode::from_raw_mode(0o620))?;
    }
    rustix::termios::tcsetwinsize(&master, req.winsize())?;
    Ok((master, slave))
}

/// A command on the terminal: `shell` as a login shell, or `sh -c command`.
pub fn command(who: &Identity, command: Option<&str>, term: &str) -> Command {
    let mut cmd = match command {
        None => {
            let shell = login_shell(&who.user);
            let name = shell
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "sh".into());
            let mut c = process::base_command(&shell, who);
            c.arg0(format!("-{name}"));
            c.env("SHELL", &shell);
            c
        }
        Some(line) => {
            let mut c = process::base_command(std::path::Path::new("/bin/sh"), who);
            c.arg("-c").arg(line);
            c
        }
    };
    cmd.env("TERM", term);
    cmd
}

/// Runs `cmd` on a new terminal attached to `channel` until it exits or the channel goes away.
pub async fn run(
    channel: Channel<Msg>,
    handle: Handle,
    mut cmd: Command,
    req: PtyRequest,
    who: Identity,
    label: String,
) {
    let id = channel.id();
    let uid = who
        .ids
        .map_or_else(|| rustix::process::geteuid().as_raw(), |(u, _)| u);
    let (mut read, write) = channel.split();
    let fail = |e: std::io::Error| {
        let write = &write;
        async move {
            let mut err = write.make_writer_ext(Some(1));
            let _ = tokio::io::AsyncWriteExt::write_all(
                &mut err,
                format!("devsync serve: cannot start the command on a terminal: {e}\r\n")
                    .as_bytes(),
            )
            .await;
            let _ = write.exit_status(127).await;
            let _ = write.eof().await;
            let _ = write.close().await; // the client may be gone: nobody to tell
        }
    };
    let (master, slave) = match open_pty(&req, who.ids) {
        Ok(p) => p,
        Err(e) => return fail(e).await,
    };
    let stdio = |fd: &OwnedFd| fd.try_clone().map(Stdio::from);
    let (i, o, e) = match (stdio(&slave), stdio(&slave), stdio(&slave)) {
        (Ok(i), Ok(o), Ok(e)) => (i, o, e),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return fail(e).await,
    };
    cmd.stdin(i).stdout(o).stderr(e);
    // SAFETY: setsid and ioctl are async-signal-safe; nothing is allocated.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::setsid()?;
            rustix::process::ioctl_tiocsctty(std::io::stdin().as_fd())?;
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return fail(e).await,
    };
    drop(cmd); // the command's copies of the terminal's other end
    drop(slave);
    // The session's leader: its id is the process group's.
    let group = child.id();
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(16);
    let (in_tx, in_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let (reader, writer) = match (master.try_clone(), master.try_clone()) {
        (Ok(r), Ok(w)) => (std::fs::File::from(r), std::fs::File::from(w)),
        (Err(e), _) | (_, Err(e)) => return fail(e).await,
    };
    // Blocking reads and writes of the terminal on threads of their own: a terminal's master
    // cannot be registered with the reactor portably, and these are interactive rates.
    let stop = Arc::new(AtomicBool::new(false));
    let stop_out = stop.clone();
    std::thread::spawn(move || pump_out(reader, out_tx, stop_out));
    std::thread::spawn(move || pump_in(writer, in_rx));
    let mut out = write.make_writer();
    let mut exited = None;
    let mut drain_until: Option<tokio::time::Instant> = None;
    let mut channel_gone = false;
    let mut output_done = false;
    loop {
        let drain = async {
            match drain_until {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            chunk = out_rx.recv(), if !output_done => match chunk {
                Some(b) => {
                    if tokio::io::AsyncWriteExt::write_all(&mut out, &b).await.is_err() {
                        channel_gone = true;
                        break;
                    }
                }
                None => {
                    output_done = true;
                    if exited.is_some() {
                        break;
                    }
                }
            },
            msg = read.wait(), if !channel_gone => match msg {
                Some(ChannelMsg::Data { data }) => {
                    let _ = in_tx.send(data.to_vec()); // the terminal is gone: output ends too
                }
                Some(ChannelMsg::WindowChange { col_width, row_height, pix_width, pix_height }) => {
                    let _ = rustix::termios::tcsetwinsize(
                        &master,
                        winsize(col_width, row_height, pix_width, pix_height),
                    ); // a terminal that is gone has no size
                }
                Some(ChannelMsg::Signal { signal }) if exited.is_none() => {
                    process::signal_group(group, &signal)
                }
                Some(ChannelMsg::Close) | None => {
                    channel_gone = true;
                    break;
                }
                _ => {}
            },
            status = child.wait(), if exited.is_none() => {
                exited = Some(status.ok());
                if output_done {
                    break;
                }
                drain_until = Some(tokio::time::Instant::now() + DRAIN);
            },
            () = drain => break,
        }
    }
    drop(in_tx);
    match (channel_gone, exited) {
        (false, Some(status)) => process::report(&handle, &write, id, status).await,
        _ => {
            log(&format!(
                "{label}: channel closed; stopping its terminal session"
            ));
            process::terminate(group, uid, &mut child).await;
        }
    }
    // Whatever still holds the terminal gets a hangup when its master closes.
    stop.store(true, Ordering::Release);
    drop(out_rx);
    drop(master);
}

/// Terminal output to the channel, until the terminal is closed (EIO once no process has it
/// open), the channel side stops taking it, or the session is over (`stop`: then this
/// thread's copy of the master must close too, so what still holds the terminal gets its
/// hangup).
fn pump_out(mut master: std::fs::File, tx: mpsc::Sender<Vec<u8>>, stop: Arc<AtomicBool>) {
    use rustix::event::{PollFd, PollFlags, Timespec};
    let mut buf = vec![0u8; 16 << 10];
    loop {
        if stop.load(Ordering::Acquire) {
            return;
        }
        let mut fds = [PollFd::new(&master, PollFlags::IN)];
        let tick = Timespec {
            tv_sec: 0,
            tv_nsec: 100_000_000,
        };
        match rustix::event::poll(&mut fds, Some(&tick)) {
            Ok(0) | Err(rustix::io::Errno::INTR) => continue,
            Ok(_) => {}
            Err(_) => return,
        }
        match master.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if tx
                    .blocking_send(buf.get(..n).unwrap_or_default().to_vec())
                    .is_err()
                {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return, // EIO: every process on the terminal has closed it
        }
    }
}

/// Channel input to the terminal, until the channel side is done.
fn pump_in(mut master: std::fs::File, rx: std::sync::mpsc::Receiver<Vec<u8>>) {
    for data in rx {
        if master.write_all(&data).is_err() {
            return;
        }
    }
}
