//! `devsync serve`: the embedded endpoint, so the whole stack runs on one machine and can be
//! self-hosted. One process: a TLS gateway routing on SNI to devboxes (built-in SSH server
//! with exec and SFTP, or forwarding to an upstream sshd) and an HTTP API handing out devbox
//! credentials and status. [`start`] takes already-bound listeners (tests bind port 0 and
//! pass them in: no port races).

pub mod api;
pub mod gateway;
pub mod sftp;
pub mod sshd;
pub mod state;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use state::{KeyFormat, State, StateOptions};

/// Connection and authentication events go to stderr with a timestamp.
pub fn log(msg: &str) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    eprintln!(
        "[{}.{:03}] devsync serve: {msg}",
        now.as_secs(),
        now.subsec_millis()
    );
}

pub struct ServeConfig {
    pub state: StateOptions,
    /// PEM certificate chain and key for the gateway (default: generated, signed by the
    /// state's CA).
    pub cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// Extra names the generated gateway certificate is valid for.
    pub gateway_names: Vec<String>,
    /// Forward TLS-unwrapped SSH to this `host:port` instead of the built-in server.
    pub upstream: Option<String>,
    /// How long a failed SSH authentication is held (constant-time rejection).
    pub auth_rejection: Duration,
    /// Serve the API over TLS with the gateway's certificate (it hands out SSH keys).
    pub api_tls: bool,
}

pub struct Listeners {
    pub gateway: TcpListener,
    pub api: TcpListener,
}

/// A running endpoint.
pub struct Running {
    pub state: Arc<State>,
    pub task: JoinHandle<std::io::Result<()>>,
}

/// Opens the state directory and starts serving on the given listeners.
pub fn start(listeners: Listeners, cfg: ServeConfig) -> Result<Running, String> {
    let state = Arc::new(State::open(&cfg.state).map_err(|e| e.to_string())?);
    let tls = gateway::tls_config(
        &state,
        cfg.cert.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
        &cfg.gateway_names,
    )?;
    let api_tls = cfg.api_tls.then(|| tls.clone());
    let ssh = sshd::config(state.host_key.clone(), cfg.auth_rejection);
    let gw = Arc::new(gateway::Gateway {
        state: state.clone(),
        tls,
        ssh,
        upstream: cfg.upstream,
    });
    let api_state = state.clone();
    let task = tokio::spawn(async move {
        tokio::select! {
            r = gw.serve(listeners.gateway) => r,
            r = api::serve(listeners.api, api_state, api_tls) => r,
        }
    });
    Ok(Running { state, task })
}
