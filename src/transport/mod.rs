//! Byte streams to a helper: a child process for local paths; for remote targets TLS (rustls)
//! to a devbox gateway or TCP to an SSH host, then SSH (russh) with an exec channel running
//! `devsync helper`, uploaded over SFTP when missing. Hands back a reader and a writer; knows
//! nothing of the sync protocol beyond waiting for the helper's greeting.

pub mod bootstrap;
pub mod devbox_api;
pub mod keep;
pub mod local;
mod packed;
pub mod remote;
pub mod shell;
pub mod ssh;
pub mod tls;

/// What failed while reaching a helper, named by stage.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("devbox API: {0}")]
    Api(String),
    #[error("connecting to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS with gateway {gateway}{hint}")]
    Tls {
        gateway: String,
        /// What to do about it (empty when there is nothing to suggest).
        hint: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    TlsSetup(#[from] tls::TlsError),
    #[error("SSH with {host}: {msg}")]
    Ssh { host: String, msg: String },
    #[error("host key check for {host}: {msg}")]
    HostKey { host: String, msg: String },
    #[error("SSH authentication as {user} on {host} failed: {msg}")]
    Auth {
        user: String,
        host: String,
        msg: String,
    },
    #[error("starting the helper on {host}")]
    Helper {
        host: String,
        #[source]
        source: bootstrap::HelperError,
    },
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Local(#[from] crate::target::credentials::CredError),
}

/// TCP to `addr` (`host:port`), within `timeout`, with Nagle off (an interactive protocol).
pub async fn connect_tcp(
    addr: &str,
    timeout: std::time::Duration,
) -> Result<tokio::net::TcpStream, TransportError> {
    let err = |source| TransportError::Connect {
        addr: addr.to_string(),
        source,
    };
    let tcp = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| {
            err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {}s", timeout.as_secs()),
            ))
        })?
        .map_err(err)?;
    let _ = tcp.set_nodelay(true); // best effort: only latency is at stake
    Ok(tcp)
}
