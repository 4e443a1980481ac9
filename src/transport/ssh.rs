//! SSH client over any byte stream (russh `connect_stream`): a TLS stream to a devbox gateway
//! or a TCP connection to a plain host. Checks the host key, authenticates, and opens the exec
//! and SFTP channels the helper bootstrap needs.
//!
//! Host keys are refused unless verified: against an OpenSSH `known_hosts` file (unknown hosts
//! are learned on first contact, like `StrictHostKeyChecking accept-new`, unless strict), or
//! against a per-devbox pin recorded on first use.

use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use russh::client::{self, Handle};
use russh::keys::agent::AgentIdentity;
use russh::keys::agent::client::AgentClient;
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::{ChannelMsg, Preferred, cipher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};

use super::TransportError;

/// Ciphers in order of preference: AES-GCM is hardware-accelerated almost everywhere and about
/// twice as fast as chacha20-poly1305 in russh.
const CIPHERS: &[cipher::Name] = &[
    cipher::AES_256_GCM,
    cipher::AES_128_GCM,
    cipher::CHACHA20_POLY1305,
    cipher::AES_256_CTR,
];

/// Connection settings tuned for bulk transfer on fast and long links.
pub fn client_config() -> Arc<client::Config> {
    Arc::new(client::Config {
        preferred: Preferred {
            cipher: Cow::Borrowed(CIPHERS),
            // Sessions compress their own frames (adaptively, with zstd): zlib under them
            // would only spend CPU twice.
            compression: Cow::Borrowed(&[russh::compression::NONE]),
            ..Preferred::DEFAULT
        },
        // The client ignores window adjustments it is asked for (russh #770): only this counts.
        window_size: 32 << 20,
        maximum_packet_size: 65535,
        channel_buffer_size: 512,
        // Hosted devboxes drop sessions after 15 idle minutes.
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 4,
        nodelay: true,
        ..Default::default()
    })
}

/// How the server's host key is judged.
#[derive(Debug, Clone)]
pub enum HostKeyCheck {
    /// An OpenSSH known_hosts file.
    KnownHosts {
        file: PathBuf,
        host: String,
        port: u16,
        /// Refuse hosts not in the file instead of learning them.
        strict: bool,
    },
    /// devsync's own pin file, keyed by a name (the devbox id).
    Pin { file: PathBuf, name: String },
}

impl HostKeyCheck {
    fn judge(&self, key: &PublicKey, notice: &dyn Fn(String)) -> Result<(), String> {
        use russh::keys::known_hosts::{check_known_hosts_path, learn_known_hosts_path};
        let (file, host, port, strict, what) = match self {
            HostKeyCheck::KnownHosts {
                file,
                host,
                port,
                strict,
            } => (file, host.as_str(), *port, *strict, format!("host {host}")),
            HostKeyCheck::Pin { file, name } => {
                (file, name.as_str(), 22, false, format!("devbox {name}"))
            }
        };
        let fp = key.fingerprint(Default::default());
        match check_known_hosts_path(host, port, key, file) {
            Ok(true) => Ok(()),
            Ok(false) if strict => Err(format!(
                "{what} is not in {} and --strict-host-keys is set; its key is {fp} \
                 (add it with: ssh-keyscan -p {port} {host} >> {})",
                file.display(),
                file.display()
            )),
            Ok(false) => {
                learn_known_hosts_path(host, port, key, file).map_err(|e| {
                    format!("recording the key of {what} in {}: {e}", file.display())
                })?;
                notice(format!(
                    "pinned the host key of {what} ({fp}) in {}",
                    file.display()
                ));
                Ok(())
            }
            Err(russh::keys::Error::KeyChanged { line }) => {
                let entry = if port == 22 {
                    host.to_string()
                } else {
                    format!("[{host}]:{port}")
                };
                Err(format!(
                    "THE HOST KEY OF {} CHANGED (now {fp}; the old one is line {line} of {}). \
                     This is expected only if it was recreated; otherwise someone may be \
                     intercepting the connection. To accept the new key, remove the old one: \
                     ssh-keygen -R '{entry}' -f {}",
                    what.to_uppercase(),
                    file.display(),
                    file.display()
                ))
            }
            Err(e) => Err(format!("reading {}: {e}", file.display())),
        }
    }
}

struct Client {
    check: HostKeyCheck,
    verdict: Arc<Mutex<Option<String>>>,
    notice: Arc<dyn Fn(String) + Send + Sync>,
}

impl client::Handler for Client {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            *self.verdict.lock().unwrap_or_else(|p| p.into_inner()) = Some(
                "the server presented a host certificate; only plain host keys are checked".into(),
            );
            return Ok(false);
        };
        match self.check.judge(key, &*self.notice) {
            Ok(()) => Ok(true),
            Err(msg) => {
                *self.verdict.lock().unwrap_or_else(|p| p.into_inner()) = Some(msg);
                Ok(false)
            }
        }
    }
}

/// One way to prove who we are.
#[derive(Clone)]
pub enum Credential {
    Key {
        key: Arc<PrivateKey>,
        source: String,
    },
    /// Whatever the ssh-agent at `$SSH_AUTH_SOCK` holds.
    Agent,
}

/// An authenticated SSH connection.
pub struct Connection {
    handle: Handle<Client>,
    label: String,
}

/// Handshake, host key check and authentication over `stream`. `label` names the server in
/// messages.
pub async fn connect<S>(
    stream: S,
    label: &str,
    user: &str,
    credentials: &[Credential],
    check: HostKeyCheck,
    timeout: Duration,
    notice: Arc<dyn Fn(String) + Send + Sync>,
) -> Result<Connection, TransportError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let verdict = Arc::new(Mutex::new(None));
    let handler = Client {
        check,
        verdict: verdict.clone(),
        notice,
    };
    let ssh_err = |msg: String| TransportError::Ssh {
        host: label.to_string(),
        msg,
    };
    let handle = tokio::time::timeout(
        timeout,
        client::connect_stream(client_config(), stream, handler),
    )
    .await
    .map_err(|_| ssh_err(format!("no SSH handshake within {}s", timeout.as_secs())))?
    .map_err(
        |e| match verdict.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(msg) => TransportError::HostKey {
                host: label.to_string(),
                msg,
            },
            None => ssh_err(e.to_string()),
        },
    )?;
    let mut conn = Connection {
        handle,
        label: label.to_string(),
    };
    tokio::time::timeout(timeout, conn.authenticate(user, credentials))
        .await
        .map_err(|_| TransportError::Auth {
            user: user.to_string(),
            host: label.to_string(),
            msg: format!("no answer within {}s", timeout.as_secs()),
        })??;
    Ok(conn)
}

impl Connection {
    async fn authenticate(
        &mut self,
        user: &str,
        credentials: &[Credential],
    ) -> Result<(), TransportError> {
        let mut tried = Vec::new();
        for cred in credentials {
            match cred {
                Credential::Key { key, source } => {
                    let key = PrivateKeyWithHashAlg::new(key.clone(), None);
                    match self.handle.authenticate_publickey(user, key).await {
                        Ok(r) if r.success() => return Ok(()),
                        Ok(_) => tried.push(format!("{source} (rejected)")),
                        Err(e) => tried.push(format!("{source} ({e})")),
                    }
                }
                Credential::Agent => match self.try_agent(user).await {
                    Ok(true) => return Ok(()),
                    Ok(false) => tried.push("ssh-agent keys (rejected)".into()),
                    Err(e) => tried.push(format!("ssh-agent ({e})")),
                },
            }
        }
        Err(TransportError::Auth {
            user: user.to_string(),
            host: self.label.clone(),
            msg: if tried.is_empty() {
                "no key to try: pass --identity FILE, start an ssh-agent, or create ~/.ssh/id_ed25519".into()
            } else {
                format!("tried {}", tried.join(", "))
            },
        })
    }

    async fn try_agent(&mut self, user: &str) -> Result<bool, String> {
        let mut agent = AgentClient::connect_env()
            .await
            .map_err(|e| e.to_string())?;
        let ids = agent
            .request_identities()
            .await
            .map_err(|e| e.to_string())?;
        let mut rsa_hashes = None;
        for id in ids {
            let AgentIdentity::PublicKey { key, .. } = id else {
                continue;
            };
            // The agent signs, so RSA keys work here (unlike key files, see remote::load_key),
            // but only with the hash asked for: `None` means SHA-1 `ssh-rsa`, which OpenSSH
            // >= 8.8 refuses by default.
            let hashes = if matches!(key.algorithm(), russh::keys::Algorithm::Rsa { .. }) {
                if rsa_hashes.is_none() {
                    rsa_hashes = Some(self.rsa_hashes().await);
                }
                rsa_hashes.clone().unwrap_or_default()
            } else {
                vec![None]
            };
            for hash in hashes {
                match self
                    .handle
                    .authenticate_publickey_with(user, key.clone(), hash, &mut agent)
                    .await
                {
                    Ok(r) if r.success() => return Ok(true),
                    _ => continue,
                }
            }
        }
        Ok(false)
    }

    /// The RSA signature hashes to try, best first, from the server's `server-sig-algs`
    /// (OpenSSH has sent it since 7.2, before any auth request). A server that does not send
    /// it gets SHA-256, then SHA-1 for servers older than RFC 8332.
    async fn rsa_hashes(&self) -> Vec<Option<HashAlg>> {
        match self.handle.best_supported_rsa_hash().await {
            Ok(Some(best)) => vec![best],
            Ok(None) | Err(_) => vec![Some(HashAlg::Sha256), None],
        }
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// Runs `command` on the server; its stdout/stdin become a byte stream, its stderr and exit
    /// status are kept for error messages.
    pub async fn exec(&self, command: &str) -> Result<Exec, russh::Error> {
        let channel = self.handle.channel_open_session().await?;
        channel.exec(true, command).await?;
        let (mut read_half, write_half) = channel.split();
        let (tx, rx) = mpsc::channel::<Bytes>(64);
        let (status_tx, status) = watch::channel(ExecStatus::default());
        tokio::spawn(async move {
            let mut tx = Some(tx);
            while let Some(msg) = read_half.wait().await {
                match msg {
                    ChannelMsg::Data { data } => {
                        if let Some(t) = &tx
                            && t.send(data).await.is_err()
                        {
                            tx = None; // reader gone: keep draining for the exit status
                        }
                    }
                    ChannelMsg::ExtendedData { data, ext: 1 } => {
                        if crate::trace::enabled() {
                            // The helper's milestones, as they happen.
                            eprint!("{}", crate::escape::escape_lines(&data));
                        }
                        status_tx.send_modify(|s| {
                            let room = STDERR_KEEP.saturating_sub(s.stderr.len());
                            s.stderr.extend_from_slice(&data[..data.len().min(room)]);
                        })
                    }
                    ChannelMsg::Eof => tx = None,
                    ChannelMsg::ExitStatus { exit_status } => {
                        status_tx.send_modify(|s| s.code = Some(exit_status))
                    }
                    ChannelMsg::ExitSignal { signal_name, .. } => {
                        status_tx.send_modify(|s| s.signal = Some(format!("{signal_name:?}")))
                    }
                    ChannelMsg::Close => break,
                    _ => {}
                }
            }
            status_tx.send_modify(|s| s.closed = true);
        });
        let reader = tokio_util::io::StreamReader::new(Box::pin(futures_util::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx)) },
        )));
        Ok(Exec {
            reader: Box::new(reader),
            writer: Box::new(write_half.make_writer()),
            status,
        })
    }

    /// A new session channel, for a shell or a command whose input and output the caller
    /// drives itself.
    pub async fn session_channel(&self) -> Result<russh::Channel<client::Msg>, russh::Error> {
        self.handle.channel_open_session().await
    }

    /// Opens an SFTP session on a new channel of this connection.
    pub async fn sftp(&self) -> Result<russh_sftp::client::SftpSession, SftpError> {
        let channel = self
            .handle
            .channel_open_session()
            .await
            .map_err(SftpError::Channel)?;
        channel
            .request_subsystem(true, "sftp")
            .await
            .map_err(SftpError::Channel)?;
        russh_sftp::client::SftpSession::new(channel.into_stream())
            .await
            .map_err(SftpError::Refused)
    }

    /// Whether the connection has ended (the peer went away or the link failed).
    pub fn is_closed(&self) -> bool {
        self.handle.is_closed()
    }

    pub async fn close(&self) {
        // Best effort: the peer may already be gone, which is what closing wants anyway.
        let _ = self
            .handle
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
    }
}

/// Why no SFTP session could be opened.
#[derive(Debug, thiserror::Error)]
pub enum SftpError {
    #[error("opening an SFTP channel")]
    Channel(#[source] russh::Error),
    #[error("the server refused SFTP")]
    Refused(#[source] russh_sftp::client::error::Error),
}

/// How much of a remote command's stderr is kept.
const STDERR_KEEP: usize = 64 << 10;

/// What a remote command said on stderr and how it ended.
#[derive(Debug, Clone, Default)]
pub struct ExecStatus {
    pub stderr: Vec<u8>,
    pub code: Option<u32>,
    pub signal: Option<String>,
    /// The channel is closed: nothing more will arrive.
    pub closed: bool,
}

impl ExecStatus {
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).trim().to_string()
    }
}

/// A running remote command.
pub struct Exec {
    pub reader: Box<dyn AsyncRead + Send + Unpin>,
    pub writer: Box<dyn AsyncWrite + Send + Unpin>,
    pub status: watch::Receiver<ExecStatus>,
}

/// Waits (bounded) for a remote command to end and returns how it did.
pub async fn wait_exit(status: &mut watch::Receiver<ExecStatus>, limit: Duration) -> ExecStatus {
    let _ = tokio::time::timeout(limit, status.wait_for(|s| s.closed || s.code.is_some())).await;
    status.borrow().clone()
}
