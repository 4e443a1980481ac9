//! Byte streams to a helper: a child process for local paths; for remote targets TLS (rustls)
//! to a devbox gateway or TCP to an SSH host, then SSH (russh) with an exec channel running
//! `devsync helper`, uploaded over SFTP when missing. Hands back a reader and a writer; knows
//! nothing of the sync protocol beyond waiting for the helper's greeting.

pub mod bootstrap;
pub mod devbox_api;
pub mod local;
pub mod remote;
pub mod ssh;
pub mod tls;

/// What failed while reaching a helper, named by stage.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("devbox API: {0}")]
    Api(String),
    #[error("connecting to {addr}: {msg}")]
    Connect { addr: String, msg: String },
    #[error("TLS with gateway {gateway}: {msg}")]
    Tls { gateway: String, msg: String },
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
    #[error("starting the helper on {host}: {msg}")]
    Helper { host: String, msg: String },
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Local(#[from] crate::target::credentials::CredError),
}
