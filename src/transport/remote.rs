//! Reaching a helper on another machine: a devbox (API credentials, TLS gateway, SSH) or a
//! plain SSH host (`~/.ssh/config`, keys, agent, known_hosts). Returns the started helper.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use russh::keys::PrivateKey;

use super::TransportError;
use super::bootstrap::{self, BootstrapOptions, Started};
use super::devbox_api::{self, Api};
use super::ssh::{self, Connection, Credential, HostKeyCheck};
use super::tls::{self, TlsPolicy};
use crate::target::Target;
use crate::target::credentials::{self, DevboxCreds};

/// Everything about connecting that the command line can change.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    pub tls: TlsPolicy,
    /// Private keys to offer first (`--identity`).
    pub identities: Vec<PathBuf>,
    /// Refuse SSH hosts missing from known_hosts instead of learning them.
    pub strict_host_keys: bool,
    pub bootstrap: BootstrapOptions,
    /// Connect, handshake and authentication timeout.
    pub timeout: Duration,
    /// Devbox status polling: interval and limit.
    pub poll_every: Duration,
    pub poll_limit: Duration,
    /// How long a kept connection waits for the next session (`--keep-connection`; zero:
    /// none is kept), and the flags that make these options again in the keeper process.
    pub keep: Duration,
    pub keep_args: Vec<std::ffi::OsString>,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            tls: TlsPolicy::default(),
            identities: Vec::new(),
            strict_host_keys: false,
            bootstrap: BootstrapOptions::default(),
            timeout: Duration::from_secs(30),
            poll_every: Duration::from_secs(3),
            poll_limit: Duration::from_secs(180),
            keep: Duration::ZERO,
            keep_args: Vec::new(),
        }
    }
}

pub type Notice = Arc<dyn Fn(String) + Send + Sync>;

/// A helper running on a remote machine, greeted and ready for the session.
pub struct Remote {
    pub helper: Started,
    pub conn: Connection,
}

/// Connects and starts a helper; what `early` returns (maybe nothing; asked again for each
/// start) goes to it at once, before its greeting is awaited (see
/// `session::client::Prepared::early`). The helper's root is the
/// target's path as the user wrote it (`Target::remote_path`).
pub async fn open(
    target: &Target,
    opts: &RemoteOptions,
    notice: Notice,
    early: &(dyn Fn() -> Vec<u8> + Send + Sync),
) -> Result<Remote, TransportError> {
    let (conn, _) = connect(target, opts, &notice).await?;
    crate::trace!("client", "SSH ready");
    let helper = bootstrap::start(&conn, &opts.bootstrap, notice.clone(), early).await?;
    Ok(Remote { helper, conn })
}

/// An authenticated SSH connection to `target` (no helper started), and the path it named.
pub async fn connect(
    target: &Target,
    opts: &RemoteOptions,
    notice: &Notice,
) -> Result<(Connection, String), TransportError> {
    match target {
        Target::Devbox { id, user, path } => Ok((
            connect_devbox(id, user.as_deref(), opts, notice).await?,
            path.clone(),
        )),
        Target::Ssh {
            user,
            host,
            port,
            path,
        } => Ok((
            connect_ssh(user.as_deref(), host, *port, opts, notice).await?,
            path.clone(),
        )),
        Target::Local(p) => Err(TransportError::Config(format!(
            "{} is a local path",
            p.display()
        ))),
    }
}

async fn connect_devbox(
    id: &str,
    user: Option<&str>,
    opts: &RemoteOptions,
    notice: &Notice,
) -> Result<Connection, TransportError> {
    let api = Api::from_env(&opts.tls)?;
    // The key first when none is cached: asking for it is also what brings a devbox into
    // being on endpoints that create them on demand (reading the status never does).
    let cached = credentials::load(id)?;
    let (creds, from_cache) = match cached {
        Some(c) => (c, true),
        None => (fetch(&api, id).await?, false),
    };
    // The status call and the TLS + SSH handshakes go at the same time (a round trip saved
    // on every connection): a running box is the common case. If the box had to be waited
    // for and the early attempt failed (or is still trying), it is made again once it runs.
    let polls = std::sync::atomic::AtomicU32::new(0);
    let status = devbox_api::wait_running(
        id,
        || {
            polls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            api.status(id)
        },
        opts.poll_every,
        opts.poll_limit,
        &**notice,
    );
    let early = devbox_ssh(&api, id, user, &creds, opts, notice);
    tokio::pin!(status, early);
    let mut early_done = None;
    let running = loop {
        tokio::select! {
            r = &mut status => break r,
            r = &mut early, if early_done.is_none() => early_done = Some(r),
        }
    };
    running?;
    crate::trace!("client", "devbox running");
    let waited = polls.load(std::sync::atomic::Ordering::Relaxed) > 1;
    let first = match early_done {
        Some(Ok(c)) => Ok(c),
        _ if waited => devbox_ssh(&api, id, user, &creds, opts, notice).await,
        Some(Err(e)) => Err(e),
        None => early.await,
    };
    match first {
        Err(TransportError::Auth { .. }) if from_cache => {
            notice(format!(
                "the cached key for {id} was refused; fetching a fresh one"
            ));
            let fresh = fetch(&api, id).await?;
            devbox_ssh(&api, id, user, &fresh, opts, notice).await
        }
        r => r,
    }
}

async fn fetch(api: &Api, id: &str) -> Result<DevboxCreds, TransportError> {
    let creds = api.create_ssh_key(id).await?;
    credentials::store(id, &creds)?;
    Ok(creds)
}

async fn devbox_ssh(
    api: &Api,
    id: &str,
    user: Option<&str>,
    creds: &DevboxCreds,
    opts: &RemoteOptions,
    notice: &Notice,
) -> Result<Connection, TransportError> {
    let gateway = api.gateway()?;
    let gw_host = gateway
        .rsplit_once(':')
        .map_or(gateway.as_str(), |(h, _)| h);
    let cfg = tls::client_config(&opts.tls, Some(gw_host))?;
    let stream = tls::connect(cfg, &gateway, &creds.url, opts.timeout).await?;
    crate::trace!("client", "TLS up");
    let key = russh::keys::decode_secret_key(&creds.key_pem, None)
        .map_err(|e| TransportError::Api(format!("the devbox key for {id} does not parse: {e}")))?;
    let cred = Credential::Key {
        key: Arc::new(key),
        source: format!(
            "devbox key {}",
            credentials::key_path(id).unwrap_or_default().display()
        ),
    };
    let pins = credentials::pin_file()?;
    let check = HostKeyCheck::Pin {
        file: pins,
        name: id.to_string(),
    };
    let user = user.unwrap_or(&creds.ssh_user);
    ssh::connect(
        stream,
        id,
        user,
        &[cred],
        check,
        opts.timeout,
        notice.clone(),
    )
    .await
}

async fn connect_ssh(
    user: Option<&str>,
    host: &str,
    port: Option<u16>,
    opts: &RemoteOptions,
    notice: &Notice,
) -> Result<Connection, TransportError> {
    // `~/.ssh/config` Host aliases: HostName, User, Port, IdentityFile.
    let cfg =
        russh_config::parse_home(host).unwrap_or_else(|_| russh_config::Config::default(host));
    let hostname = cfg.host().to_string();
    let port = port.or(cfg.host_config.port).unwrap_or(22);
    let user = user
        .map(str::to_string)
        .or(cfg.host_config.user.clone())
        .unwrap_or_else(current_user);
    let mut creds = Vec::new();
    for path in &opts.identities {
        creds.push(load_key(path)?);
    }
    let home = dirs::home_dir().unwrap_or_default();
    let from_config: Vec<PathBuf> = cfg
        .host_config
        .identity_file
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|p| expand_tilde(&p, &home))
        .collect();
    for path in &from_config {
        match load_key(path) {
            Ok(c) => creds.push(c),
            Err(e) => notice(format!("skipping {}: {e}", path.display())),
        }
    }
    if std::env::var_os("SSH_AUTH_SOCK").is_some() {
        creds.push(Credential::Agent);
    }
    if opts.identities.is_empty() && from_config.is_empty() {
        for name in ["id_ed25519", "id_ecdsa"] {
            let p = home.join(".ssh").join(name);
            if p.exists() {
                match load_key(&p) {
                    Ok(c) => creds.push(c),
                    Err(e) => notice(format!("skipping {}: {e}", p.display())),
                }
            }
        }
    }
    let addr = format!("{hostname}:{port}");
    let tcp = super::connect_tcp(&addr, opts.timeout).await?;
    let known = cfg
        .host_config
        .user_known_hosts_file
        .clone()
        .map(|p| expand_tilde(&p, &home))
        .unwrap_or_else(|| home.join(".ssh/known_hosts"));
    let check = HostKeyCheck::KnownHosts {
        file: known,
        host: hostname.clone(),
        port,
        strict: opts.strict_host_keys || cfg.host_config.strict_host_key_checking == Some(true),
    };
    let label = if port == 22 { hostname } else { addr };
    ssh::connect(
        tcp,
        &label,
        &user,
        &creds,
        check,
        opts.timeout,
        notice.clone(),
    )
    .await
}

fn current_user() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "root".into())
}

fn expand_tilde(p: &Path, home: &Path) -> PathBuf {
    match p.strip_prefix("~") {
        Ok(rest) => home.join(rest),
        Err(_) => p.to_path_buf(),
    }
}

/// Loads a private key file, refusing ones others can read and explaining encrypted ones.
fn load_key(path: &Path) -> Result<Credential, TransportError> {
    credentials::check_key_mode(path)?;
    let key: PrivateKey = russh::keys::load_secret_key(path, None).map_err(|e| {
        let hint = match e {
            russh::keys::Error::KeyIsEncrypted => {
                " (it is passphrase-protected: add it to ssh-agent instead)"
            }
            _ => {
                " (supported: Ed25519 and ECDSA keys in OpenSSH, PKCS#8 or SEC1 PEM; RSA keys \
                 only through ssh-agent)"
            }
        };
        TransportError::Config(format!("private key {}: {e}{hint}", path.display()))
    })?;
    // This build signs with Ed25519 and ECDSA only (russh without its `rsa` feature); an RSA
    // key would load but fail when it is asked to sign. The agent signs RSA keys itself.
    if !matches!(
        key.algorithm(),
        russh::keys::Algorithm::Ed25519 | russh::keys::Algorithm::Ecdsa { .. }
    ) {
        return Err(TransportError::Config(format!(
            "private key {} is an `{}` key, which devsync cannot sign with from a file \
             (supported: Ed25519 and ECDSA): add it to your ssh-agent (`ssh-add {}`), which \
             devsync uses, or make one with `ssh-keygen -t ed25519` and add its .pub to the \
             server's authorized_keys",
            path.display(),
            key.algorithm(),
            path.display()
        )));
    }
    Ok(Credential::Key {
        key: Arc::new(key),
        source: path.display().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use russh::keys::{Algorithm, EcdsaCurve};

    #[test]
    fn devbox_keys_decode_in_every_pem_layout() {
        let layouts = [
            include_str!("../../fixtures/keys/p256-sec1.pem"),
            include_str!("../../fixtures/keys/p256-pkcs8.pem"),
            include_str!("../../fixtures/keys/p256-openssh.pem"),
        ];
        for pem in layouts {
            let key = russh::keys::decode_secret_key(pem, None).unwrap();
            assert_eq!(
                key.algorithm(),
                Algorithm::Ecdsa {
                    curve: EcdsaCurve::NistP256
                }
            );
        }
        // SEC1 and PKCS#8 are the same key.
        let a = russh::keys::decode_secret_key(layouts[0], None).unwrap();
        let b = russh::keys::decode_secret_key(layouts[1], None).unwrap();
        assert_eq!(a.public_key(), b.public_key());
    }
}
