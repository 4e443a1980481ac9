//! Warm connection reuse. After a sync to a remote, a small background process (`devsync
//! __keep`, the "keeper") holds the TLS + SSH connection open with a helper already started
//! and greeted, on a Unix socket in the state directory (one per target and user). The next
//! push, pull, cp or watch to that target asks the socket for it and starts its session at
//! once: no API call, no TLS or SSH handshake, no login shell. `devsync ssh` asks for a
//! channel of its own on the connection instead (`shell`). The keeper relays bytes between the
//! socket and the helper, keeps two spare helpers started ahead of the sessions, and exits after
//! an idle time (`--keep-connection`, default 300 s; 0: no keeper).
//!
//! Invisible when it works, harmless when it does not: a client uses a keeper only if the
//! socket and its directory are its own (owner and mode checked; the keeper checks the peer's
//! uid too), and the keeper answers within a deadline for the same build, target, options and
//! credentials; anything else is a trace line and a fresh connection. Must not: run a session
//! itself (it only relays), or outlive its connection.

use std::ffi::OsString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use super::TransportError;
use super::bootstrap::{self, Started, build_id};
use super::remote::{self, RemoteOptions};
use super::ssh::ExecStatus;
use crate::proto::handshake::HELPER_MAGIC;
use crate::proto::{FrameReader, PROTOCOL_VERSION};
use crate::target::Target;
use crate::target::credentials;

const REQUEST: &str = "DEVSYNC-KEEP 1";
/// Asks for a shell or command channel instead of a helper (`devsync ssh`).
const SHELL_REQUEST: &str = "DEVSYNC-KEEP-SHELL 1";
/// How long a client waits for the socket to accept, and for the keeper's answer (it may be
/// waiting for its spare helper's login shell).
const CONNECT: Duration = Duration::from_millis(300);
const ANSWER: Duration = Duration::from_secs(5);

/// The files of one target's keeper.
pub struct Place {
    pub socket: PathBuf,
    pub lock: PathBuf,
    pub pid: PathBuf,
    pub log: PathBuf,
}

/// The endpoint whose kept connection a run to `target` may use and leave behind: `None` for
/// local paths or with `--keep-connection 0`.
pub fn wanted(target: &Target, opts: &RemoteOptions) -> Option<String> {
    endpoint(target).filter(|_| !opts.keep.is_zero())
}

/// The host part of `target` as a target string of its own (its path is the remote home): what
/// a keeper is for. `None` for local paths.
pub fn endpoint(target: &Target) -> Option<String> {
    match target {
        Target::Local(_) => None,
        Target::Devbox { id, user, .. } => Some(match user {
            Some(u) => format!("{u}@{id}:"),
            None => format!("{id}:"),
        }),
        Target::Ssh {
            user, host, port, ..
        } => {
            let user = user.as_ref().map(|u| format!("{u}@")).unwrap_or_default();
            Some(match port {
                Some(p) => format!("ssh://{user}{host}:{p}/"),
                None => format!("ssh://{user}{host}/"),
            })
        }
    }
}

fn dir() -> Result<PathBuf, TransportError> {
    credentials::state_dir()
        .map(|d| d.join("kept"))
        .map_err(|e| TransportError::Config(e.to_string()))
}

/// Makes the keepers' directory, private to this user.
fn make_dir() -> Result<PathBuf, TransportError> {
    let d = dir()?;
    std::fs::create_dir_all(&d).map_err(|e| TransportError::Config(e.to_string()))?;
    let _ = std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700));
    Ok(d)
}

pub fn place(endpoint: &str) -> Result<Place, TransportError> {
    let d = dir()?;
    let key = credentials::endpoint_key(endpoint);
    Ok(Place {
        socket: d.join(format!("{key}.sock")),
        lock: d.join(format!("{key}.lock")),
        pid: d.join(format!("{key}.pid")),
        log: d.join(format!("{key}.log")),
    })
}

/// What must be the same for a kept connection to stand in for a fresh one: this build, the
/// endpoint, the options that shape the connection, and the credentials and host keys it was
/// made with (a key fetched again or a host key pinned anew retires the keeper).
pub fn fingerprint(endpoint: &str, target: &Target, opts: &RemoteOptions) -> String {
    let mut h = blake3::Hasher::new();
    for part in [
        build_id().to_string(),
        endpoint.to_string(),
        format!("{:?}", opts.tls),
        format!("{:?}", opts.identities),
        format!("{}", opts.strict_host_keys),
        opts.bootstrap.remote_dir.clone(),
        format!("{:?}", opts.bootstrap.helper_binary),
    ] {
        h.update(part.as_bytes());
        h.update(b"\0");
    }
    if let Target::Devbox { .. } = target {
        for var in ["RUNLOOP_BASE_URL", "RUNLOOP_SSH_GATEWAY", "RUNLOOP_API_KEY"] {
            h.update(std::env::var_os(var).unwrap_or_default().as_encoded_bytes());
            h.update(b"\0");
        }
    }
    let files: Vec<PathBuf> = match target {
        Target::Devbox { id, .. } => [credentials::key_path(id), credentials::pin_file()]
            .into_iter()
            .filter_map(Result::ok)
            .collect(),
        _ => dirs::home_dir()
            .map(|h| vec![h.join(".ssh/known_hosts")])
            .unwrap_or_default(),
    };
    for f in files {
        h.update(&std::fs::read(&f).unwrap_or_default());
        h.update(b"\0");
    }
    h.finalize().to_hex()[..32].to_string()
}

/// Whether `p` is ours alone: owned by this user, with no access for anyone else.
fn private(p: &Path, want_dir: bool) -> Result<(), String> {
    let md = std::fs::symlink_metadata(p).map_err(|e| format!("{}: {e}", p.display()))?;
    let uid = rustix::process::geteuid().as_raw();
    if md.uid() != uid {
        return Err(format!(
            "{} belongs to uid {}, not to us ({uid})",
            p.display(),
            md.uid()
        ));
    }
    if md.permissions().mode() & 0o077 != 0 {
        return Err(format!("{} is open to other users", p.display()));
    }
    if want_dir != md.is_dir() {
        return Err(format!("{} is not what a keeper leaves", p.display()));
    }
    Ok(())
}

/// Client side: a shell or command session (`devsync ssh`) on the kept connection for
/// `endpoint`, on a channel the keeper opens for it. `Err` says why not.
pub async fn attach_shell(
    endpoint: &str,
    target: &Target,
    opts: &RemoteOptions,
) -> Result<(super::shell::Shell, u32), String> {
    let (r, w, pid) = ask(endpoint, target, opts, SHELL_REQUEST).await?;
    Ok((super::shell::Shell::kept(r, w), pid))
}

/// Connects to `endpoint`'s keeper, checks it is ours, asks for `what` with this build and
/// fingerprint, and reads its answer: the socket's halves and the keeper's pid.
async fn ask(
    endpoint: &str,
    target: &Target,
    opts: &RemoteOptions,
    what: &str,
) -> Result<(BufReader<OwnedReadHalf>, OwnedWriteHalf, u32), String> {
    let place = place(endpoint).map_err(|e| e.to_string())?;
    if !place.socket.exists() {
        return Err("no kept connection".into());
    }
    private(&dir().map_err(|e| e.to_string())?, true)?;
    private(&place.socket, false)?;
    let stream = tokio::time::timeout(CONNECT, UnixStream::connect(&place.socket))
        .await
        .map_err(|_| "the keeper does not accept".to_string())?
        .map_err(|e| format!("the keeper is gone ({e})"))?;
    let (r, mut w) = stream.into_split();
    // Only now that there is a keeper to ask are the credential files read.
    let ask = format!(
        "{what} {} {}\n",
        build_id(),
        fingerprint(endpoint, target, opts)
    );
    w.write_all(ask.as_bytes())
        .await
        .map_err(|e| format!("the keeper is gone ({e})"))?;
    let mut r = BufReader::new(r);
    let mut line = String::new();
    let answered = tokio::time::timeout(ANSWER, r.read_line(&mut line)).await;
    let line = match answered {
        Err(_) => {
            return Err(format!(
                "the keeper did not answer in {} s",
                ANSWER.as_secs()
            ));
        }
        Ok(Err(e)) => return Err(format!("the keeper is gone ({e})")),
        Ok(Ok(_)) => line.trim_end().to_string(),
    };
    let pid = match line.strip_prefix("OK ") {
        Some(p) => p.parse::<u32>().unwrap_or(0),
        None if line.is_empty() => return Err("the keeper hung up".into()),
        None => return Err(line.strip_prefix("ERR ").unwrap_or(&line).to_string()),
    };
    Ok((r, w, pid))
}

/// Client side: the kept helper for `endpoint` (of `target`, reached with `opts`), if a
/// keeper has one for us. `Err` says why not (worth a trace line; the caller connects
/// afresh).
pub async fn attach(
    endpoint: &str,
    target: &Target,
    opts: &RemoteOptions,
) -> Result<(Started, u32), String> {
    let (r, w, pid) = ask(endpoint, target, opts, REQUEST).await?;
    // The greeting the keeper read from its helper, replayed: checked as a fresh one is.
    let boxed: Box<dyn tokio::io::AsyncRead + Send + Unpin> = Box::new(r);
    let mut reader = FrameReader::new(boxed);
    tokio::time::timeout(ANSWER, crate::proto::handshake::await_helper(&mut reader))
        .await
        .map_err(|_| "the kept helper did not greet".to_string())?
        .map_err(|e| e.to_string())?;
    // No stderr or exit status travels through the keeper: the status is "gone" from the start.
    let (_, status) = watch::channel(ExecStatus {
        closed: true,
        ..ExecStatus::default()
    });
    Ok((
        Started {
            reader,
            writer: Box::new(w),
            status,
            uploaded: false,
        },
        pid,
    ))
}

/// Starts a keeper for `endpoint` in the background, detached (after a fresh connection
/// worked); `args` are the remote options as command-line flags. Best effort.
pub fn spawn(endpoint: &str, args: Vec<OsString>, idle: Duration) {
    let Ok(place) = place(endpoint) else {
        return;
    };
    let _ = make_dir(); // best effort: the keeper makes it again, or says why not
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let log = std::fs::File::create(&place.log).ok();
    let mut c = std::process::Command::new(exe);
    c.arg("__keep")
        .arg("--idle")
        .arg(idle.as_secs().to_string())
        .args(args)
        .arg(endpoint)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .env_remove("DEVSYNC_TRACE");
    match log {
        Some(f) => c.stderr(f),
        None => c.stderr(std::process::Stdio::null()),
    };
    // SAFETY: setsid is async-signal-safe; nothing else runs between fork and exec. Its own
    // session: the user's Ctrl-C or a closed terminal does not reach it.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut c, || {
            let _ = rustix::process::setsid();
            Ok(())
        });
    }
    match c.spawn() {
        Ok(child) => crate::trace!(
            "client",
            "keeping the connection (keeper pid {})",
            child.id()
        ),
        Err(e) => crate::trace!("client", "could not start a keeper: {e}"),
    }
}

/// What the keeper does between clients.
struct Keeper {
    conn: super::ssh::Connection,
    opts: RemoteOptions,
    fingerprint: String,
}

/// The keeper process: connect, start a spare helper, serve the socket until idle for `idle`
/// or the connection dies.
pub async fn keeper(
    endpoint: &str,
    target: &Target,
    opts: RemoteOptions,
    idle: Duration,
) -> Result<(), TransportError> {
    let place = place(endpoint)?;
    make_dir()?;
    // One keeper per endpoint: the lock is held for its life.
    let lock =
        std::fs::File::create(&place.lock).map_err(|e| TransportError::Config(e.to_string()))?;
    if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        eprintln!("another keeper holds {}", place.lock.display());
        return Ok(());
    }
    let fingerprint = fingerprint(endpoint, target, &opts);
    let notice: remote::Notice = Arc::new(|m: String| eprintln!("{m}"));
    let (conn, _) = remote::connect(target, &opts, &notice).await?;
    let keeper = Arc::new(Keeper {
        conn,
        opts,
        fingerprint,
    });
    let _ = std::fs::remove_file(&place.socket); // a dead keeper's (we hold the lock)
    let listener =
        UnixListener::bind(&place.socket).map_err(|e| TransportError::Config(e.to_string()))?;
    let _ = std::fs::set_permissions(&place.socket, std::fs::Permissions::from_mode(0o600));
    let _ = std::fs::write(&place.pid, std::process::id().to_string());
    eprintln!("keeping {endpoint} on {}", place.socket.display());
    let k = keeper.clone();
    let spare = Spare::new(k.clone());
    let served = serve(listener, idle, move |stream| {
        let (k, spare) = (k.clone(), spare.clone());
        async move { session(&k, &spare, stream).await }
    });
    // It does not outlive its connection.
    let watched = async {
        while !keeper.conn.is_closed() {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    };
    let r = tokio::select! {
        r = served => format!("{r:?}"),
        () = watched => "the connection closed".to_string(),
    };
    eprintln!("keeper done: {r:?}");
    // Only our own files, and only while we still hold the lock.
    let _ = std::fs::remove_file(&place.socket);
    let _ = std::fs::remove_file(&place.pid);
    keeper.conn.close().await;
    Ok(())
}

/// How the serving loop ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    Idle,
    /// A session said the keeper should go (its connection failed, another build asked).
    Retired,
}

/// Accepts clients one after another, each handled by `handle` (which returns whether the
/// keeper may go on), until nothing happened for `idle` while no session ran. Once a session
/// retires the keeper, no one else is accepted, but the sessions still running (a shell in
/// another terminal) are let finish first.
pub async fn serve<F, Fut>(listener: UnixListener, idle: Duration, handle: F) -> Ended
where
    F: Fn(UnixStream) -> Fut,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    let mut running = tokio::task::JoinSet::new();
    let mut deadline = tokio::time::Instant::now() + idle;
    let mut listener = Some(listener);
    loop {
        tokio::select! {
            accepted = async { listener.as_ref()?.accept().await.ok() }, if listener.is_some() => {
                if let Some((stream, _)) = accepted {
                    running.spawn(handle(stream));
                }
            }
            Some(done) = running.join_next() => {
                if !done.unwrap_or(false) {
                    // Closed: a client now finds no one there and connects afresh.
                    listener = None;
                }
                if running.is_empty() {
                    if listener.is_none() {
                        return Ended::Retired;
                    }
                    deadline = tokio::time::Instant::now() + idle;
                }
            }
            () = tokio::time::sleep_until(deadline), if running.is_empty() => return Ended::Idle,
        }
    }
}

/// A helper being started.
type Starting = tokio::task::JoinHandle<Result<Started, String>>;

/// Helpers started ahead of the clients that will want them. Starting one takes two round
/// trips (channel open, then exec and greeting) plus the login shell, longer than a kept
/// no-change session (one round trip), so with a single spare a session that follows another
/// at once (`push && pull`, an agent's loop) would wait for it; two keep one ready.
const SPARES: usize = 2;

/// The next helpers, started ahead of the clients that will want them, oldest first.
#[derive(Clone)]
struct Spare {
    k: Arc<Keeper>,
    next: Arc<tokio::sync::Mutex<std::collections::VecDeque<Starting>>>,
}

impl Spare {
    fn new(k: Arc<Keeper>) -> Spare {
        let ahead = (0..SPARES).map(|_| Spare::start(k.clone())).collect();
        Spare {
            k,
            next: Arc::new(tokio::sync::Mutex::new(ahead)),
        }
    }

    fn start(k: Arc<Keeper>) -> Starting {
        tokio::spawn(async move {
            let quiet: Arc<dyn Fn(String) + Send + Sync> = Arc::new(|m: String| eprintln!("{m}"));
            bootstrap::start(&k.conn, &k.opts.bootstrap, quiet, &Vec::new)
                .await
                .map_err(|e| e.to_string())
        })
    }

    /// The oldest spare helper (waiting for it if it is still starting), with another one
    /// started in its place. Spares that died while they waited (a helper gives up on a
    /// client that never speaks after the keepalive limit, 2 min, shorter than a keeper's
    /// idle time, and both spares started together) are replaced, and the first of the
    /// replacements is waited for: one more try than there are spares.
    async fn take(&self) -> Result<Started, String> {
        if self.k.conn.is_closed() {
            return Err("the kept connection has closed".into());
        }
        let mut g = self.next.lock().await;
        for _ in 0..=SPARES {
            let ready = match g.pop_front() {
                Some(h) => h.await.map_err(|e| e.to_string()).and_then(|r| r),
                None => Err("no helper".into()),
            };
            g.push_back(Spare::start(self.k.clone()));
            match ready {
                Ok(h) if !gone(&h) => return Ok(h),
                // One that died while it started (killed, or its login shell failed) is
                // no different from one that died waiting, as long as the connection is up.
                Ok(_) | Err(_) if !self.k.conn.is_closed() => continue,
                Ok(_) => return Err("the kept connection has closed".into()),
                Err(e) => return Err(e),
            }
        }
        Err("the kept helpers keep exiting".into())
    }
}

/// Whether a started helper has exited (or its channel closed) since.
fn gone(h: &Started) -> bool {
    let s = h.status.borrow();
    s.closed || s.code.is_some() || s.signal.is_some()
}

/// One client: check who it is and what it wants, then hand it the spare helper and relay,
/// or (`devsync ssh`) open a channel for it and relay that. Returns whether the keeper may go
/// on.
async fn session(k: &Keeper, spare: &Spare, stream: UnixStream) -> bool {
    let uid = rustix::process::geteuid().as_raw();
    if stream.peer_cred().map(|c| c.uid()).ok() != Some(uid) {
        return true; // not ours to serve; the socket's mode should have kept it out
    }
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut line = String::new();
    if tokio::time::timeout(ANSWER, r.read_line(&mut line))
        .await
        .is_err()
    {
        return true;
    }
    let mut it = line.trim_end().rsplitn(3, ' ');
    let (fp, build, head) = (it.next(), it.next(), it.next());
    let shell = head == Some(SHELL_REQUEST);
    // Another build first, whatever it asks (a request we do not know is likely a newer
    // build's): that build keeps its own connection once this keeper is gone.
    let ours = head.is_some_and(|h| h.starts_with("DEVSYNC-KEEP"));
    if ours && build != Some(build_id()) {
        let msg = format!("ERR the kept connection is from devsync {}\n", build_id());
        let _ = w.write_all(msg.as_bytes()).await;
        return false;
    }
    if head != Some(REQUEST) && !shell {
        let _ = w.write_all(b"ERR not a devsync keeper request\n").await;
        return true;
    }
    if fp != Some(k.fingerprint.as_str()) {
        let _ = w
            .write_all(b"ERR credentials or options changed since the connection was made\n")
            .await;
        return false;
    }
    if shell {
        // A channel of its own (the spare helper stays for the next sync).
        return match k.conn.session_channel().await {
            Ok(channel) => {
                let ok = format!("OK {}\n", std::process::id());
                if w.write_all(ok.as_bytes()).await.is_ok() {
                    super::shell::relay(channel, r, w).await;
                } else {
                    let _ = channel.close().await; // the client gave up waiting
                }
                true
            }
            Err(e) => {
                let _ = w
                    .write_all(format!("ERR opening a channel: {e}\n").as_bytes())
                    .await;
                // A server's channel limit is no reason to go; a closed connection is.
                !k.conn.is_closed()
            }
        };
    }
    let helper = match spare.take().await {
        Ok(h) => h,
        Err(e) => {
            let _ = w.write_all(format!("ERR {e}\n").as_bytes()).await;
            return false; // the connection is likely gone
        }
    };
    let mut hello = format!("OK {}\n", std::process::id()).into_bytes();
    hello.extend_from_slice(HELPER_MAGIC);
    hello.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    if w.write_all(&hello).await.is_err() {
        return true;
    }
    relay(spare, helper, r, w).await;
    true
}

/// Most of a client's opening kept for replay. Before the helper's answer a client sends only
/// its Hello and the early part of its list (well under this).
const REPLAY: usize = 1 << 20;

/// Relays one client to `helper`. A spare can die moments before it is handed out, its exit
/// not yet heard of over the connection (killed; both spares timing out together): it then
/// ends before it says anything, and what the client sent so far goes to the next spare, so
/// the client never sees the dead one. Once the helper has answered, bytes just flow.
async fn relay(
    spare: &Spare,
    mut helper: Started,
    mut r: BufReader<OwnedReadHalf>,
    mut w: OwnedWriteHalf,
) {
    let mut said = Vec::new();
    let mut overflowed = false;
    let mut client_done = false;
    let mut buf = vec![0u8; 64 << 10];
    for _ in 0..=SPARES {
        let answered = loop {
            tokio::select! {
                n = r.read(&mut buf), if !client_done => match n {
                    Ok(0) | Err(_) => {
                        client_done = true;
                        let _ = helper.writer.shutdown().await;
                    }
                    Ok(n) => {
                        let got = buf.get(..n).unwrap_or_default();
                        if said.len() + n <= REPLAY {
                            said.extend_from_slice(got);
                        } else {
                            overflowed = true;
                        }
                        // A failed write shows as the helper's end, below.
                        let _ = helper.writer.write_all(got).await;
                    }
                },
                ended = async { helper.reader.raw().fill_buf().await.map_or(true, |b| b.is_empty()) } => {
                    break !ended;
                }
            }
        };
        // (A client that left already gets no new helper: it would act on an abandoned
        // run's opening.)
        if answered || overflowed || client_done {
            break;
        }
        eprintln!("the spare helper ended before answering; trying the next");
        helper = match spare.take().await {
            Ok(h) => h,
            Err(_) => break, // the client sees the end and connects afresh
        };
        let _ = helper.writer.write_all(&said).await;
    }
    let Started {
        mut reader,
        mut writer,
        ..
    } = helper;
    let up = async {
        if !client_done {
            let _ = tokio::io::copy_buf(&mut r, &mut writer).await;
            let _ = writer.shutdown().await;
        }
    };
    let down = async {
        let _ = tokio::io::copy_buf(reader.raw(), &mut w).await;
        let _ = w.shutdown().await;
    };
    tokio::join!(up, down);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_keeper_exits_after_its_idle_time_counted_from_the_last_session() {
        let td = tempfile::tempdir().unwrap();
        let sock = td.path().join("k.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let t0 = tokio::time::Instant::now();
        let idle = Duration::from_secs(300);
        let client = {
            let sock = sock.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(200)).await;
                let mut s = UnixStream::connect(&sock).await.unwrap();
                s.write_all(b"x").await.unwrap();
            })
        };
        let ended = serve(listener, idle, |s| async move {
            // A session of 10 s, holding its stream.
            let _held = s;
            tokio::time::sleep(Duration::from_secs(10)).await;
            true
        })
        .await;
        client.await.unwrap();
        assert_eq!(ended, Ended::Idle);
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_secs(510) && took < Duration::from_secs(520),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_that_retires_the_keeper_ends_it() {
        let td = tempfile::tempdir().unwrap();
        let sock = td.path().join("k.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let s2 = sock.clone();
        tokio::spawn(async move { UnixStream::connect(&s2).await.unwrap() });
        let ended = serve(listener, Duration::from_secs(300), |_s| async { false }).await;
        assert_eq!(ended, Ended::Retired);
    }

    /// A retiring keeper lets a session that is still running (a shell) finish, and takes
    /// no one new meanwhile.
    #[tokio::test(start_paused = true)]
    async fn a_retired_keeper_lets_running_sessions_finish() {
        let td = tempfile::tempdir().unwrap();
        let sock = td.path().join("k.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let (s2, s3) = (sock.clone(), sock.clone());
        let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f = finished.clone();
        let order = Arc::new(std::sync::atomic::AtomicU32::new(0));
        tokio::spawn(async move {
            let _long = UnixStream::connect(&s2).await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
            let _retiring = UnixStream::connect(&s3).await.unwrap();
            tokio::time::sleep(Duration::from_secs(3600)).await;
        });
        let ended = serve(listener, Duration::from_secs(300), move |_s| {
            let (f, n) = (
                f.clone(),
                order.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
            );
            async move {
                if n == 0 {
                    // The long session: an hour of shell.
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    f.store(true, std::sync::atomic::Ordering::SeqCst);
                    true
                } else {
                    false
                }
            }
        })
        .await;
        assert_eq!(ended, Ended::Retired);
        assert!(
            finished.load(std::sync::atomic::Ordering::SeqCst),
            "cut short"
        );
    }

    #[test]
    fn endpoints_drop_the_path_and_keep_who_and_where() {
        let t = |s: &str| endpoint(&Target::parse(s).unwrap());
        assert_eq!(t("dbx_a:/x"), Some("dbx_a:".into()));
        assert_eq!(t("bob@dbx_a:y"), Some("bob@dbx_a:".into()));
        assert_eq!(t("u@host:2222:/p"), Some("ssh://u@host:2222/".into()));
        assert_eq!(t("./local"), None);
        // Every endpoint parses back to the same endpoint.
        for s in ["dbx_a:/x", "bob@dbx_a:y", "u@host:2222:/p", "host:p"] {
            let e = t(s).unwrap();
            assert_eq!(
                endpoint(&Target::parse(&e).unwrap()),
                Some(e.clone()),
                "{s}"
            );
        }
    }
}
