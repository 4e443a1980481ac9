//! The built-in SSH server of `devsync serve`: public-key authentication against the devbox's
//! own key only (failures are logged), `exec` (runs `sh -c` with the channel as
//! stdin/stdout/stderr and reports the exit status), `shell` (the user's login shell), the
//! `sftp` subsystem, all run by [`process`] in the devbox's home as the devbox's user, and
//! `pty-req`: then the shell or command runs on a terminal ([`pty`]), resized by
//! `window-change`. Signals from the client go to the command's process group.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use russh::server::{self, Auth, Msg, Session};
use russh::{Channel, ChannelId, MethodKind, MethodSet, Preferred, cipher};
use tokio::io::{AsyncRead, AsyncWrite};

use super::log;
use super::process::{self, Identity};
use super::pty::{self, PtyRequest};
use super::state::Devbox;

/// Server settings: the same throughput tuning as the client side.
pub fn config(host_key: russh::keys::PrivateKey, auth_rejection: Duration) -> Arc<server::Config> {
    const CIPHERS: &[cipher::Name] = &[
        cipher::AES_256_GCM,
        cipher::AES_128_GCM,
        cipher::CHACHA20_POLY1305,
        cipher::AES_256_CTR,
    ];
    Arc::new(server::Config {
        preferred: Preferred {
            cipher: Cow::Borrowed(CIPHERS),
            ..Preferred::DEFAULT
        },
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        auth_rejection_time: auth_rejection,
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![host_key],
        window_size: 32 << 20,
        maximum_packet_size: 65535,
        channel_buffer_size: 512,
        // As the hosted gateway does: a connection silent for 15 minutes is dropped (clients'
        // keepalives, ours every 30 s, keep a live one open).
        inactivity_timeout: Some(Duration::from_secs(15 * 60)),
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 4,
        nodelay: true,
        ..Default::default()
    })
}

/// What a connection's sessions run with.
#[derive(Clone)]
pub struct Runner {
    pub who: Identity,
    /// The devsync binary (for the `sftp` subsystem, `devsync sftp-server`).
    pub exe: PathBuf,
}

/// Serves one SSH connection for `devbox` over `stream` until it closes, or until
/// `auth_limit` passes without a successful authentication.
pub async fn serve<S>(
    stream: S,
    devbox: Arc<Devbox>,
    runner: Runner,
    config: Arc<server::Config>,
    peer: SocketAddr,
    auth_limit: Duration,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let authenticated = Arc::new(tokio::sync::Notify::new());
    let handler = Handler {
        devbox: devbox.clone(),
        runner,
        peer,
        channels: HashMap::new(),
        ptys: HashMap::new(),
        authenticated: authenticated.clone(),
    };
    let label = format!("{peer} {}", devbox.id);
    let session = async {
        match server::run_stream(config, stream, handler).await {
            Ok(session) => match session.await {
                Ok(()) => log(&format!("{label}: disconnected")),
                // Clients commonly drop the TCP connection after SSH's disconnect message.
                Err(russh::Error::IO(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    log(&format!("{label}: disconnected"))
                }
                Err(e) => log(&format!("{label}: session ended: {e:?}")),
            },
            Err(e) => log(&format!("{label}: SSH handshake failed: {e:?}")),
        }
    };
    tokio::pin!(session);
    // Until authenticated, the session has `auth_limit`; then it runs until it ends.
    tokio::select! {
        () = &mut session => return,
        () = authenticated.notified() => {}
        () = tokio::time::sleep(auth_limit) => {
            return log(&format!(
                "{label}: not authenticated within {} s; closing",
                auth_limit.as_secs()
            ));
        }
    }
    session.await;
}

struct Handler {
    devbox: Arc<Devbox>,
    runner: Runner,
    peer: SocketAddr,
    channels: HashMap<ChannelId, Channel<Msg>>,
    /// Terminals asked for, by channel, until the shell or command starts.
    ptys: HashMap<ChannelId, PtyRequest>,
    authenticated: Arc<tokio::sync::Notify>,
}

impl Handler {
    /// Starts `command` (`None`: the login shell) on channel `id`: on a terminal if one was
    /// asked for.
    fn start(
        &mut self,
        id: ChannelId,
        command: Option<&str>,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        let Some(channel) = self.channels.remove(&id) else {
            return session.channel_failure(id);
        };
        session.channel_success(id)?;
        let who = self.runner.who.clone();
        match self.ptys.remove(&id) {
            Some(req) => {
                let cmd = pty::command(&who, command, &req.term);
                tokio::spawn(pty::run(
                    channel,
                    session.handle(),
                    cmd,
                    req,
                    who,
                    self.label(),
                ));
            }
            None => {
                let cmd = match command {
                    Some(line) => {
                        let mut c = process::command(std::path::Path::new("/bin/sh"), &who);
                        c.arg("-c").arg(line);
                        c
                    }
                    None => {
                        let shell = pty::login_shell(&who.user);
                        let mut c = process::command(&shell, &who);
                        c.arg("-l");
                        c
                    }
                };
                tokio::spawn(process::run(
                    channel,
                    session.handle(),
                    cmd,
                    who,
                    self.label(),
                ));
            }
        }
        Ok(())
    }

    fn accepts(&self, user: &str, key: &russh::keys::PublicKey) -> bool {
        user == self.devbox.user && key.key_data() == self.devbox.public_key.key_data()
    }

    fn label(&self) -> String {
        format!("{} {}", self.peer, self.devbox.id)
    }

    fn reject(&self, user: &str, key: &russh::keys::PublicKey) -> Auth {
        log(&format!(
            "{}: AUTH FAILURE for user {user:?} with key {}",
            self.label(),
            key.fingerprint(Default::default())
        ));
        Auth::reject()
    }
}

impl server::Handler for Handler {
    type Error = russh::Error;

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: server::PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(if self.accepts(user, offer.public_key) {
            Auth::Accept
        } else {
            self.reject(user, offer.public_key)
        })
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        if self.accepts(user, key.public_key) {
            log(&format!("{}: authenticated as {user}", self.label()));
            self.authenticated.notify_one();
            Ok(Auth::Accept)
        } else {
            Ok(self.reject(user, key.public_key))
        }
    }

    async fn auth_none(&mut self, user: &str) -> Result<Auth, Self::Error> {
        log(&format!(
            "{}: AUTH FAILURE for user {user:?}: no key offered (public keys only)",
            self.label()
        ));
        Ok(Auth::reject())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.insert(channel.id(), channel);
        reply.accept().await;
        Ok(())
    }

    async fn exec_request(
        &mut self,
        id: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let command = String::from_utf8_lossy(data).into_owned();
        log(&format!("{}: exec {command}", self.label()));
        self.start(id, Some(&command), session)
    }

    async fn shell_request(
        &mut self,
        id: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        log(&format!("{}: shell", self.label()));
        self.start(id, None, session)
    }

    #[allow(clippy::too_many_arguments)] // russh's signature
    async fn pty_request(
        &mut self,
        id: ChannelId,
        term: &str,
        cols: u32,
        rows: u32,
        pix_width: u32,
        pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if !self.channels.contains_key(&id) {
            return session.channel_failure(id);
        }
        // Terminal names travel into the command's environment: keep them plain.
        let term = if !term.is_empty()
            && term.len() <= 64
            && term
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.+".contains(&b))
        {
            term.to_string()
        } else {
            "xterm".to_string()
        };
        self.ptys.insert(
            id,
            PtyRequest {
                term,
                cols,
                rows,
                pix_width,
                pix_height,
            },
        );
        session.channel_success(id)
    }

    async fn subsystem_request(
        &mut self,
        id: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        match (name, self.channels.remove(&id)) {
            ("sftp", Some(channel)) => {
                log(&format!("{}: sftp", self.label()));
                session.channel_success(id)?;
                // A process of its own, as the devbox's user: SFTP reaches what that user can.
                let mut cmd = process::command(&self.runner.exe, &self.runner.who);
                cmd.arg("sftp-server").arg(&self.runner.who.home);
                let who = self.runner.who.clone();
                tokio::spawn(process::run(
                    channel,
                    session.handle(),
                    cmd,
                    who,
                    self.label(),
                ));
            }
            _ => session.channel_failure(id)?,
        }
        Ok(())
    }
}
