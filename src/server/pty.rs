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

/// After the command exited, output still coming is read until it pauses this long (a
/// background process that keeps the terminal open does not hold the session forever).
const DRAIN: Duration = Duration::from_millis(500);

/// How long the processes of a terminal that was hung up get to end before being killed.
const HANGUP_GRACE: Duration = Duration::from_millis(500);

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
    let uid = who.uid();
    let (mut read, write) = channel.split();
    let fail = |e: std::io::Error| {
        let write = &write;
        async move {
            let why = format!("cannot start the command on a terminal: {e}\r\n");
            process::not_started(write, &why).await
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
    // The session's leader: its id is the process group's and the session's.
    let group = child.id();
    // Non-blocking (shared by every copy of the master): the pumps poll with a timeout, so
    // they notice the end of the session even if the terminal never becomes ready again.
    if let Err(e) = rustix::fs::fcntl_setfl(&master, rustix::fs::OFlags::NONBLOCK) {
        return fail(e.into()).await;
    }
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(16);
    // Bounded: input waits in the SSH channel (and its window) while the terminal is full.
    let (in_tx, in_rx) = mpsc::channel::<Vec<u8>>(16);
    let (reader, writer) = match (master.try_clone(), master.try_clone()) {
        (Ok(r), Ok(w)) => (std::fs::File::from(r), std::fs::File::from(w)),
        (Err(e), _) | (_, Err(e)) => return fail(e).await,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let (stop_out, stop_in) = (stop.clone(), stop.clone());
    // Blocking reads and writes of the terminal on threads of their own: these are
    // interactive rates, and a terminal's master is not a socket.
    std::thread::spawn(move || pump_out(reader, out_tx, stop_out));
    std::thread::spawn(move || pump_in(writer, in_rx, stop_in));
    let mut out = write.make_writer();
    let mut exited = None;
    // After the command exits, output still arriving is read until it pauses this long.
    let mut drain_until: Option<tokio::time::Instant> = None;
    let mut channel_gone = false;
    let mut output_done = false;
    let mut pending: Option<Vec<u8>> = None;
    loop {
        let drain = async {
            match drain_until {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            chunk = out_rx.recv(), if !output_done => match chunk {
                Some(b) => {
                    if tokio::io::AsyncWriteExt::write_all(&mut out, &b).await.is_err() {
                        channel_gone = true;
                        break;
                    }
                    if exited.is_some() {
                        drain_until = Some(tokio::time::Instant::now() + DRAIN);
                    }
                }
                None => {
                    output_done = true;
                    if exited.is_some() {
                        break;
                    }
                }
            },
            permit = in_tx.reserve(), if pending.is_some() => match permit {
                Ok(p) => p.send(pending.take().unwrap_or_default()),
                Err(_) => pending = None, // the terminal is gone: its output ends too
            },
            msg = read.wait(), if !channel_gone && pending.is_none() => match msg {
                Some(ChannelMsg::Data { data }) => pending = Some(data.to_vec()),
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
    // The terminal closes: every copy of the master goes (the pumps see `stop` within their
    // poll interval), and what still holds the terminal gets a hangup, as from OpenSSH.
    stop.store(true, Ordering::Release);
    drop((in_tx, out_rx, master));
    match (channel_gone, exited) {
        (false, Some(status)) => process::report(&handle, &write, id, status).await,
        (_, exited) => {
            log(&format!("{label}: channel closed; hanging up its terminal"));
            if exited.is_none() {
                // The hangup first (a shell passes it on to its jobs), then TERM and KILL.
                let _ = tokio::time::timeout(HANGUP_GRACE, child.wait()).await;
                process::terminate(group, uid, &mut child).await;
            }
        }
    }
    // The kernel hangs up only the terminal's foreground group; background jobs of the
    // session (`make &`) get theirs too, as an interactive shell gives them on exit. What
    // ignores it on purpose (`nohup`) stays, as it would with OpenSSH.
    tokio::time::sleep(HANGUP_GRACE).await;
    process::signal_session(group, uid, rustix::process::Signal::HUP);
}

/// Terminal output to the channel, until the terminal is closed (EIO once no process has it
/// open), the channel side stops taking it, or the session is over (`stop`: then this
/// thread's copy of the master must close too, so what still holds the terminal gets its
/// hangup).
fn pump_out(mut master: std::fs::File, tx: mpsc::Sender<Vec<u8>>, stop: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 16 << 10];
    while wait_ready(&master, rustix::event::PollFlags::IN, &stop) {
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
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                ) => {}
            Err(_) => return, // EIO: every process on the terminal has closed it
        }
    }
}

/// Channel input to the terminal, until the channel side is done or the session is over.
fn pump_in(mut master: std::fs::File, mut rx: mpsc::Receiver<Vec<u8>>, stop: Arc<AtomicBool>) {
    while let Some(data) = rx.blocking_recv() {
        let mut rest = data.as_slice();
        while !rest.is_empty() {
            if !wait_ready(&master, rustix::event::PollFlags::OUT, &stop) {
                return;
            }
            match master.write(rest) {
                Ok(n) => rest = rest.get(n..).unwrap_or_default(),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                    ) => {}
                Err(_) => return,
            }
        }
    }
}

/// Waits until `fd` is ready for `what`; `false` once the session is over (or on an error).
fn wait_ready(fd: &std::fs::File, what: rustix::event::PollFlags, stop: &AtomicBool) -> bool {
    use rustix::event::{PollFd, Timespec};
    let tick = Timespec {
        tv_sec: 0,
        tv_nsec: 100_000_000,
    };
    loop {
        if stop.load(Ordering::Acquire) {
            return false;
        }
        let mut fds = [PollFd::new(fd, what)];
        match rustix::event::poll(&mut fds, Some(&tick)) {
            Ok(0) | Err(rustix::io::Errno::INTR) => continue,
            // Readable, writable, or hung up (the read or write says which).
            Ok(_) => return true,
            Err(_) => return false,
        }
    }
}
