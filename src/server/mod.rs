//! `devsync serve`: the embedded endpoint, so the whole stack runs on one machine and can be
//! self-hosted. One process: a TLS gateway routing on SNI to devboxes (built-in SSH server
//! with exec and SFTP, or forwarding to an upstream sshd) and an HTTP API handing out devbox
//! credentials and status. [`start`] takes already-bound listeners (tests bind port 0 and
//! pass them in: no port races).
//!
//! Each devbox's sessions run as its own Unix user when the endpoint runs as root
//! ([`state::Isolation`]); a connection that never authenticates, never sends its TLS hello or
//! never speaks SSH is closed after a short limit, and each address may hold only so many
//! connections at once ([`Limits`]).
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

pub mod api;
pub mod gateway;
pub mod process;
pub mod pty;
pub mod sftp;
pub mod sshd;
pub mod state;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use state::{Isolation, KeyFormat, State, StateError, StateOptions};

/// Connection and authentication events go to stderr with an RFC 3339 timestamp.
pub fn log(msg: &str) {
    eprintln!("{} devsync serve: {msg}", rfc3339_now());
}

/// The current UTC time as `2026-12-01T23:05:17.123Z`.
pub fn rfc3339_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        now.subsec_millis()
    )
}

/// What `devsync serve` could not do.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("gateway certificate {path}: {msg}")]
    Certificate { path: String, msg: String },
    #[error("TLS configuration: {0}")]
    Tls(#[source] rustls::Error),
    #[error(
        "devboxes run as their own users, who cannot pass through {dir} (mode {mode:o}) to \
         reach {what}: put it under a directory others may pass through (e.g. --state \
         /var/lib/devsync/serve, or a copy of devsync in /usr/local/bin), or chmod o+x {dir}"
    )]
    Unreachable {
        dir: String,
        mode: u32,
        what: &'static str,
    },
}

/// Checks that users other than us can reach `path` (every directory above it searchable by
/// others, and the file itself readable and executable if `exec`).
fn reachable_by_others(
    path: &std::path::Path,
    exec: bool,
    what: &'static str,
) -> Result<(), ServeError> {
    use std::os::unix::fs::PermissionsExt;
    let mode_of =
        |p: &std::path::Path| std::fs::metadata(p).map_or(0, |m| m.permissions().mode() & 0o7777);
    let mut dirs: Vec<&std::path::Path> = path.ancestors().skip(1).collect();
    if !exec {
        dirs.insert(0, path);
    }
    for dir in dirs {
        let mode = mode_of(dir);
        if mode & 0o001 == 0 {
            return Err(ServeError::Unreachable {
                dir: dir.display().to_string(),
                mode,
                what,
            });
        }
    }
    if exec && mode_of(path) & 0o005 != 0o005 {
        return Err(ServeError::Unreachable {
            dir: path.display().to_string(),
            mode: mode_of(path),
            what,
        });
    }
    Ok(())
}

/// Limits against connections that hold resources without doing anything useful.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections one address may have open at once (gateway and API each).
    pub per_address: usize,
    /// For the TLS client hello, the first SSH bytes after it, an HTTP request's headers.
    pub first_bytes: Duration,
    /// For SSH authentication to succeed.
    pub auth: Duration,
    /// For one API connection altogether (its requests are small).
    pub api_connection: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            per_address: 64,
            first_bytes: Duration::from_secs(10),
            auth: Duration::from_secs(30),
            api_connection: Duration::from_secs(60),
        }
    }
}

/// Counts open connections per address; a [`Slot`] gives its place back when dropped.
#[derive(Clone, Default)]
pub struct PerAddress {
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

pub struct Slot {
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
    addr: IpAddr,
}

impl PerAddress {
    /// A slot for a connection from `addr`, unless it already has `limit` open.
    pub fn take(&self, addr: IpAddr, limit: usize) -> Option<Slot> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(addr).or_insert(0);
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(Slot {
            open: self.open.clone(),
            addr,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.addr) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.addr);
            }
        }
    }
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
    /// The devsync binary sessions run for the `sftp` subsystem.
    pub exe: PathBuf,
    pub limits: Limits,
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
pub fn start(listeners: Listeners, cfg: ServeConfig) -> Result<Running, ServeError> {
    let state = Arc::new(State::open(&cfg.state)?);
    if matches!(cfg.state.isolation, Isolation::Users { .. }) {
        // Their homes are inside the state directory, and SFTP runs this binary as them.
        reachable_by_others(&state.dir.join("homes"), false, "their homes")?;
        reachable_by_others(&cfg.exe, true, "the devsync binary (for SFTP)")?;
    }
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
        exe: cfg.exe,
        limits: cfg.limits,
        open: PerAddress::default(),
    });
    let api = api::Api {
        state: state.clone(),
        tls: api_tls.map(tokio_rustls::TlsAcceptor::from),
        limits: cfg.limits,
        open: PerAddress::default(),
    };
    let task = tokio::spawn(async move {
        tokio::select! {
            r = gw.serve(listeners.gateway) => r,
            r = Arc::new(api).serve(listeners.api) => r,
        }
    });
    Ok(Running { state, task })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        let t = rfc3339_now();
        assert_eq!(t.len(), "2026-12-01T23:05:17.123Z".len(), "{t}");
        assert!(
            t.starts_with("20") && t.ends_with('Z') && t.contains('T'),
            "{t}"
        );
    }

    #[test]
    fn slots_per_address_are_given_back() {
        let open = PerAddress::default();
        let a: IpAddr = [127, 0, 0, 1].into();
        let b: IpAddr = [127, 0, 0, 2].into();
        let s1 = open.take(a, 2);
        let s2 = open.take(a, 2);
        assert!(s1.is_some() && s2.is_some());
        assert!(open.take(a, 2).is_none(), "third from one address");
        assert!(open.take(b, 2).is_some(), "another address is not affected");
        drop(s1);
        assert!(open.take(a, 2).is_some());
    }
}
