//! `devsync ssh TARGET [-- COMMAND…]`: a shell on a terminal, or a command with its stdin,
//! stdout and stderr streamed and its exit status returned; `--config-only` prints an
//! OpenSSH `Host` block that reaches a devbox through `devsync proxy`.
//!
//! The terminal is put in raw mode only for an interactive session and restored on every way
//! out (the guard's `Drop`). devsync's own failures exit 255, as ssh's do, so a remote
//! command's 1 stays the command's. The session runs on a kept connection's channel when
//! there is one (`transport::shell`), and a fresh connection is left kept afterwards.

use std::io::{IsTerminal, Write};
use std::os::fd::AsFd;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Args;
use russh::Sig;
use tokio::signal::unix::{SignalKind, signal};

use super::RemoteArgs;
use crate::target::Target;
use crate::transport::keep;
use crate::transport::remote::{self, Notice, RemoteOptions};
use crate::transport::shell::{Event, Pty, Shell};

/// devsync's own failure (connection, authentication, a refused channel), as ssh's 255.
pub const SSH_FAILED: u8 = 255;

pub const SSH_HELP: &str = "\
Examples:
  devsync ssh dbx_abc                           a shell on the devbox
  devsync ssh dbx_abc:~/project -- make test    run a command there (exit status is its own)
  devsync ssh dbx_abc --config-only >> ~/.ssh/config
                                                then: ssh dbx_abc, scp, rsync -e ssh, VSCode

The COMMAND's words are joined with spaces and run by the remote shell, as ssh does. Exit
status: the command's (128+N if it was killed by signal N), 255 if devsync failed.";

#[derive(Args, Debug)]
pub struct SshArgs {
    /// The devbox or host: dbx_<id>, user@host, ssh://user@host:2222, or any push target (its
    /// path, if any, is the directory the shell or command starts in)
    #[arg(value_name = "TARGET")]
    target: String,
    /// Command to run instead of a shell (after --)
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
    /// Print an OpenSSH config `Host` block for the devbox on stdout (for ssh, scp, rsync -e
    /// ssh, VSCode Remote-SSH, JetBrains Gateway) and exit
    #[arg(long)]
    config_only: bool,
    /// Ask for a terminal even when running a command (as ssh -t)
    #[arg(short = 't', long = "tty", conflicts_with = "no_tty")]
    tty: bool,
    /// Never ask for a terminal (as ssh -T)
    #[arg(short = 'T', long = "no-tty")]
    no_tty: bool,
    /// Timed milestones on stderr (as DEVSYNC_TRACE=1 does)
    #[arg(short, long)]
    verbose: bool,
    #[command(flatten)]
    remote: RemoteArgs,
}

pub fn run(a: SshArgs) -> Result<u8, super::Failure> {
    crate::trace::init(a.verbose);
    let fail = |error| super::Failure {
        error,
        code: SSH_FAILED,
        json: false,
    };
    let target = host_target(&a.target).map_err(fail)?;
    let rt = super::runtime().map_err(|e| fail(e.into()))?;
    let r = if a.config_only {
        rt.block_on(super::ssh_config::print(&target, &a.remote))
    } else {
        rt.block_on(session(&a, &target))
    };
    // The stdin reader may still be blocked in read(2): do not wait for it.
    rt.shutdown_background();
    r.map_err(fail)
}

/// A target for a login: `dbx_x` or `user@host` alone mean "that machine, its home".
pub fn host_target(s: &str) -> anyhow::Result<Target> {
    let t = Target::parse(s)?;
    match t {
        Target::Local(_) if !s.contains('/') => Ok(Target::parse(&format!("{s}:"))?),
        Target::Local(_) => bail!(
            "{s:?} is a local path; give a devbox (dbx_<id>), a host (user@host) or a target \
             such as dbx_<id>:~/dir"
        ),
        t => Ok(t),
    }
}

/// `cd DIR && ` for a command to start in the target's directory (`~/x` stays relative to
/// the remote home).
fn cd_prefix(path: &str) -> String {
    if matches!(path, "" | "." | "~" | "~/") {
        return String::new();
    }
    let q = |p: &str| shell_escape::unix::escape(p.into()).into_owned();
    let dir = match path.strip_prefix("~/") {
        Some(rest) => format!("~/{}", q(rest)),
        None => q(path),
    };
    format!("cd {dir} && ")
}

/// Restores the terminal's settings when dropped.
struct RawMode {
    saved: rustix::termios::Termios,
}

impl RawMode {
    fn enter() -> std::io::Result<RawMode> {
        use rustix::termios::{OptionalActions, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        let saved = tcgetattr(stdin.as_fd())?;
        let mut raw = saved.clone();
        raw.make_raw();
        tcsetattr(stdin.as_fd(), OptionalActions::Now, &raw)?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        use rustix::termios::{OptionalActions, tcsetattr};
        // Nothing else to do if the terminal is gone.
        let _ = tcsetattr(std::io::stdin().as_fd(), OptionalActions::Now, &self.saved);
    }
}

/// The local terminal's size (80×24 when there is none).
fn window() -> (u32, u32, u32, u32) {
    let ws = rustix::termios::tcgetwinsize(std::io::stdout().as_fd())
        .or_else(|_| rustix::termios::tcgetwinsize(std::io::stdin().as_fd()));
    match ws {
        Ok(w) if w.ws_col > 0 && w.ws_row > 0 => (
            u32::from(w.ws_col),
            u32::from(w.ws_row),
            u32::from(w.ws_xpixel),
            u32::from(w.ws_ypixel),
        ),
        _ => (80, 24, 0, 0),
    }
}

/// The exit status a shell would show for a command killed by `sig`.
pub fn signal_status(sig: &Sig) -> u8 {
    let n = match sig {
        Sig::HUP => 1,
        Sig::INT => 2,
        Sig::QUIT => 3,
        Sig::ILL => 4,
        Sig::ABRT => 6,
        Sig::FPE => 8,
        Sig::KILL => 9,
        Sig::USR1 => 10,
        Sig::SEGV => 11,
        Sig::PIPE => 13,
        Sig::ALRM => 14,
        Sig::TERM => 15,
        Sig::Custom(name) => name.trim_start_matches("SIG").parse::<u8>().unwrap_or(127),
    };
    128u8.saturating_add(n)
}

/// The session's channel: through a kept connection if there is one, else on a connection
/// of our own (returned too, to close at the end).
async fn open(
    a: &SshArgs,
    target: &Target,
    opts: &RemoteOptions,
) -> anyhow::Result<(Shell, Option<crate::transport::ssh::Connection>, String)> {
    if let Some(ep) = keep::wanted(target, opts) {
        match keep::attach_shell(&ep, target, opts).await {
            Ok((shell, pid)) => {
                crate::trace!("ssh", "reusing the kept connection (keeper pid {pid})");
                let label = format!("{} (the kept connection of keeper pid {pid})", a.target);
                return Ok((shell, None, label));
            }
            Err(why) => crate::trace!("ssh", "not reusing a connection: {why}"),
        }
    }
    let notice: Notice = Arc::new(|m: String| {
        eprintln!("devsync: {}", super::output::escape_text(&m));
    });
    let (conn, _) = remote::connect(target, opts, &notice).await?;
    let channel = conn
        .session_channel()
        .await
        .with_context(|| format!("opening a session on {}", conn.label()))?;
    let label = conn.label().to_string();
    Ok((Shell::direct(channel), Some(conn), label))
}

async fn session(a: &SshArgs, target: &Target) -> anyhow::Result<u8> {
    let opts = a.remote.options();
    let (mut shell, conn, label) = open(a, target, &opts).await?;
    let close = || async {
        if let Some(c) = &conn {
            c.close().await;
        }
    };
    let interactive = a.command.is_empty();
    let stdin_tty = std::io::stdin().is_terminal();
    let want_tty = a.tty || (!a.no_tty && interactive && stdin_tty);
    let cd = cd_prefix(target.remote_path());
    if want_tty {
        let term = std::env::var("TERM")
            .ok()
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| "xterm".into());
        let (cols, rows, px, py) = window();
        shell
            .request_pty(&Pty {
                term,
                cols,
                rows,
                px,
                py,
            })
            .await?;
    }
    let line = a.command.join(" ");
    match (interactive, cd.is_empty()) {
        (true, true) => shell.request_shell().await?,
        // A shell that starts in a directory: the login shell, through the command path.
        (true, false) => {
            shell
                .exec(&format!("{cd}exec \"${{SHELL:-/bin/sh}}\" -l"))
                .await?
        }
        (false, _) => shell.exec(&format!("{cd}{line}")).await?,
    }
    crate::trace!("ssh", "session requested (terminal: {want_tty})");
    let raw = match want_tty && stdin_tty {
        true => Some(RawMode::enter().context("putting the terminal in raw mode")?),
        false => None,
    };
    let mut stdin = super::stdin_chunks();
    let mut stdin_open = true;
    let mut winch = signal(SignalKind::window_change())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut interrupts = 0u32;
    // A terminal request may be refused and the session go on without one; the first other
    // refusal is the shell's or command's.
    let mut replies = 0u32;
    let mut status: Option<u8> = None;
    let mut killed_by: Option<Sig> = None;
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    loop {
        tokio::select! {
            chunk = stdin.recv(), if stdin_open => match chunk {
                Some(b) => {
                    if shell.data(b.into()).await.is_err() {
                        stdin_open = false;
                    }
                }
                None => {
                    stdin_open = false;
                    let _ = shell.eof().await; // the channel may be closing already
                }
            },
            ev = shell.wait() => match ev {
                Event::Stdout(data) => {
                    out.write_all(&data)?;
                    out.flush()?;
                }
                Event::Stderr(data) => {
                    err.write_all(&data)?;
                    err.flush()?;
                }
                Event::Success => replies += 1,
                Event::Failure => {
                    replies += 1;
                    if want_tty && replies == 1 {
                        drop(raw);
                        return Err(anyhow::anyhow!(
                            "{label} refused a terminal; retry with -T (no terminal)"
                        ));
                    }
                    drop(raw);
                    bail!("{label} refused to start the {}",
                        if interactive { "shell" } else { "command" });
                }
                Event::ExitStatus(code) => status = Some(u8::try_from(code).unwrap_or(u8::MAX)),
                Event::ExitSignal(sig) => killed_by = Some(sig),
                Event::Close => break,
            },
            _ = winch.recv() => {
                let (c, r, px, py) = window();
                let _ = shell.window_change(c, r, px, py).await; // closing: no matter
            },
            _ = int.recv() => {
                interrupts += 1;
                if interrupts > 1 {
                    drop(raw);
                    eprintln!("devsync: interrupted twice; closing the session");
                    close().await;
                    return Ok(130);
                }
                let _ = shell.signal(Sig::INT).await;
            },
            // We are asked to end: pass it on, and end as a process ended by it does.
            _ = term.recv() => {
                let _ = shell.signal(Sig::TERM).await;
                drop(raw);
                close().await;
                return Ok(signal_status(&Sig::TERM));
            },
            _ = hup.recv() => {
                let _ = shell.signal(Sig::HUP).await;
                drop(raw);
                close().await;
                return Ok(signal_status(&Sig::HUP));
            },
        }
    }
    drop(raw);
    close().await;
    // A session on a connection of our own leaves it kept for the next one, as a push does.
    if let (Some(_), Some(ep)) = (&conn, keep::wanted(target, &opts)) {
        keep::spawn(&ep, opts.keep_args.clone(), opts.keep);
    }
    match (status, killed_by) {
        (Some(code), _) => Ok(code),
        (None, Some(sig)) => {
            if !want_tty {
                eprintln!("devsync: the remote command was killed by signal {sig:?}");
            }
            Ok(signal_status(&sig))
        }
        (None, None) => bail!(
            "the connection to {label} closed before the remote command's exit status arrived"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_targets_and_start_directories() {
        assert!(
            matches!(host_target("dbx_abc").unwrap(), Target::Devbox { id, path, .. } if id == "dbx_abc" && path == ".")
        );
        assert!(
            matches!(host_target("me@box").unwrap(), Target::Ssh { user: Some(u), host, .. } if u == "me" && host == "box")
        );
        assert!(
            matches!(host_target("dbx_a:~/p").unwrap(), Target::Devbox { path, .. } if path == "~/p")
        );
        assert!(host_target("./dir").is_err());
        assert_eq!(cd_prefix(""), "");
        assert_eq!(cd_prefix("."), "");
        assert_eq!(cd_prefix("~/a b"), "cd ~/'a b' && ");
        assert_eq!(cd_prefix("/srv/app"), "cd /srv/app && ");
        assert_eq!(signal_status(&Sig::KILL), 137);
        assert_eq!(signal_status(&Sig::Custom("SIG7".into())), 135);
    }
}
