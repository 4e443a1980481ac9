//! The built-in SSH server of `devsync serve`: public-key authentication against the devbox's
//! own key only, `exec` (runs `sh -c` with the channel as stdin/stdout/stderr and reports the
//! exit status) and the `sftp` subsystem, both in the devbox's home directory.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use russh::server::{self, Auth, Msg, Session};
use russh::{Channel, ChannelId, ChannelMsg, MethodKind, MethodSet, Preferred, cipher};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::log;
use super::sftp::SftpServer;
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
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 4,
        nodelay: true,
        ..Default::default()
    })
}

/// Serves one SSH connection for `devbox` over `stream` until it closes.
pub async fn serve<S>(stream: S, devbox: Arc<Devbox>, config: Arc<server::Config>, peer: SocketAddr)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let handler = Handler {
        devbox: devbox.clone(),
        peer,
        channels: HashMap::new(),
    };
    match server::run_stream(config, stream, handler).await {
        Ok(session) => match session.await {
            Ok(()) => log(&format!("{peer} {}: disconnected", devbox.id)),
            // Clients commonly drop the TCP connection after SSH's disconnect message.
            Err(russh::Error::IO(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                log(&format!("{peer} {}: disconnected", devbox.id))
            }
            Err(e) => log(&format!("{peer} {}: session ended: {e:?}", devbox.id)),
        },
        Err(e) => log(&format!(
            "{peer} {}: SSH handshake failed: {e:?}",
            devbox.id
        )),
    }
}

struct Handler {
    devbox: Arc<Devbox>,
    peer: SocketAddr,
    channels: HashMap<ChannelId, Channel<Msg>>,
}

impl Handler {
    fn accepts(&self, user: &str, key: &russh::keys::PublicKey) -> bool {
        user == self.devbox.user && key.key_data() == self.devbox.public_key.key_data()
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
            Auth::reject()
        })
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        if self.accepts(user, key.public_key) {
            log(&format!(
                "{} {}: authenticated as {user}",
                self.peer, self.devbox.id
            ));
            Ok(Auth::Accept)
        } else {
            log(&format!(
                "{} {}: AUTH FAILURE for user {user:?} with key {}",
                self.peer,
                self.devbox.id,
                key.public_key.fingerprint(Default::default())
            ));
            Ok(Auth::reject())
        }
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
        let Some(channel) = self.channels.remove(&id) else {
            return session.channel_failure(id);
        };
        let command = String::from_utf8_lossy(data).into_owned();
        log(&format!("{} {}: exec {command}", self.peer, self.devbox.id));
        session.channel_success(id)?;
        tokio::spawn(run_exec(channel, command, self.devbox.clone()));
        Ok(())
    }

    async fn subsystem_request(
        &mut self,
        id: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        match (name, self.channels.remove(&id)) {
            ("sftp", Some(channel)) => {
                log(&format!("{} {}: sftp", self.peer, self.devbox.id));
                session.channel_success(id)?;
                russh_sftp::server::run(
                    channel.into_stream(),
                    SftpServer::new(self.devbox.home.clone()),
                )
                .await;
            }
            _ => session.channel_failure(id)?,
        }
        Ok(())
    }
}

/// Runs `command` with the channel as its stdio; reports its exit status, then closes.
async fn run_exec(channel: Channel<Msg>, command: String, devbox: Arc<Devbox>) {
    let (mut read, write) = channel.split();
    let spawned = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&command)
        .current_dir(&devbox.home)
        .env("HOME", &devbox.home)
        .env("USER", &devbox.user)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let mut err = write.make_writer_ext(Some(1));
            let _ = err
                .write_all(format!("devsync serve: cannot run sh: {e}\n").as_bytes())
                .await;
            let _ = write.exit_status(127).await;
            let _ = write.eof().await;
            let _ = write.close().await;
            return;
        }
    };
    let (Some(mut stdin), Some(mut stdout), Some(mut stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return;
    };
    // Client → stdin; a closed channel (client gone) kills the command.
    let input = tokio::spawn(async move {
        while let Some(msg) = read.wait().await {
            match msg {
                ChannelMsg::Data { data } if stdin.write_all(&data).await.is_err() => break,
                ChannelMsg::Data { .. } => {}
                ChannelMsg::Eof => break,
                ChannelMsg::Close => return false,
                _ => {}
            }
        }
        drop(stdin);
        // Keep draining so the session never blocks on this channel.
        while let Some(msg) = read.wait().await {
            if matches!(msg, ChannelMsg::Close) {
                return false;
            }
        }
        true
    });
    let mut out = write.make_writer();
    let mut err = write.make_writer_ext(Some(1));
    let copy_out = tokio::io::copy(&mut stdout, &mut out);
    let copy_err = tokio::io::copy(&mut stderr, &mut err);
    let (r_out, _) = tokio::join!(copy_out, copy_err);
    let _ = out.flush().await;
    let status = tokio::select! {
        s = child.wait() => s.ok(),
        // Client closed the channel while the command still runs: stop it.
        Ok(false) = input => { let _ = child.kill().await; None }
    };
    if r_out.is_err() {
        let _ = child.kill().await;
    }
    let code = status.and_then(|s| s.code()).unwrap_or(255);
    // The client may already be gone; there is no one to tell.
    let _ = write.exit_status(code as u32).await;
    let _ = write.eof().await;
    let _ = write.close().await;
}
