//! `devsync serve`: run the embedded endpoint (TLS gateway + SSH server + key API).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use tokio::net::TcpListener;

use super::exit;
use crate::server::{self, KeyFormat, Listeners, ServeConfig, StateOptions};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// State directory (keys, CA, devboxes); default ~/.local/state/devsync/serve
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
    /// Address for the TLS gateway (SSH inside TLS, routed by SNI)
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8443")]
    listen: String,
    /// Address for the HTTP API (keys and status); plain HTTP only on loopback
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    api_listen: String,
    /// Serve the API over TLS with the gateway's certificate (required off loopback)
    #[arg(long)]
    api_tls: bool,
    /// Domain of devbox host names: devbox dbx_x is reached as dbx_x.DOMAIN
    #[arg(long, default_value = "devsync.localhost")]
    domain: String,
    /// Declare a devbox (repeatable); created if missing
    #[arg(long = "devbox", value_name = "ID")]
    devboxes: Vec<String>,
    /// Create unknown devboxes on first API request
    #[arg(long)]
    create_on_demand: bool,
    /// API bearer token (default: the stored one, or a new random one)
    #[arg(long, env = "DEVSYNC_SERVE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Login user reported for new devboxes (must exist upstream with --upstream)
    #[arg(long, default_value = "user")]
    user: String,
    /// Gateway certificate chain (PEM); default: generated, signed by the state's CA
    #[arg(long, value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,
    /// Gateway private key (PEM)
    #[arg(long, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,
    /// Extra name for the generated gateway certificate (repeatable)
    #[arg(long = "gateway-name", value_name = "NAME")]
    gateway_names: Vec<String>,
    /// Forward SSH to this sshd (HOST:PORT) instead of the built-in server
    #[arg(long, value_name = "HOST:PORT")]
    upstream: Option<String>,
    /// Private key format handed out by the API
    #[arg(long, value_parser = ["pkcs8", "openssh"], default_value = "pkcs8")]
    key_format: String,
}

pub fn run(a: ServeArgs) -> u8 {
    let rt = match super::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("devsync serve: {e}");
            return exit::FATAL;
        }
    };
    match rt.block_on(serve(a)) {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("devsync serve: error: {e}");
            exit::FATAL
        }
    }
}

async fn serve(a: ServeArgs) -> Result<(), String> {
    let dir = match a.state {
        Some(d) => d,
        None => crate::target::credentials::state_dir()?.join("serve"),
    };
    let bind = |addr: &str| {
        let addr = addr.to_string();
        async move {
            TcpListener::bind(&addr)
                .await
                .map_err(|e| format!("cannot listen on {addr}: {e}"))
        }
    };
    // Checked before binding anything: the API hands out SSH private keys.
    if !a.api_tls {
        let mut addrs = tokio::net::lookup_host(&a.api_listen)
            .await
            .map_err(|e| format!("--api-listen {}: {e}", a.api_listen))?;
        if let Some(open) = addrs.find(|ad| !ad.ip().is_loopback()) {
            return Err(format!(
                "the API hands out SSH private keys and would be plain HTTP on {open}: add \
                 --api-tls (clients then use https:// and trust the state's CA), or bind \
                 --api-listen to 127.0.0.1 and put a TLS proxy in front"
            ));
        }
    }
    let listeners = Listeners {
        gateway: bind(&a.listen).await?,
        api: bind(&a.api_listen).await?,
    };
    let (gw, api) = (
        listeners.gateway.local_addr().map_err(|e| e.to_string())?,
        listeners.api.local_addr().map_err(|e| e.to_string())?,
    );
    let scheme = if a.api_tls { "https" } else { "http" };
    let cfg = ServeConfig {
        state: StateOptions {
            dir: dir.clone(),
            domain: a.domain,
            token: a.token,
            default_user: a.user,
            create_on_demand: a.create_on_demand,
            key_format: if a.key_format == "openssh" {
                KeyFormat::OpenSsh
            } else {
                KeyFormat::Pkcs8
            },
            devboxes: a.devboxes,
        },
        cert: a.cert.zip(a.key),
        gateway_names: a.gateway_names,
        upstream: a.upstream,
        auth_rejection: Duration::from_secs(1),
        api_tls: a.api_tls,
    };
    let running = server::start(listeners, cfg)?;
    let st = &running.state;
    server::log(&format!(
        "gateway on {gw} (TLS, SNI <devbox>.{}), API on {scheme}://{api}, state in {}",
        st.domain,
        dir.display()
    ));
    eprintln!(
        "clients: export RUNLOOP_BASE_URL={scheme}://{api} RUNLOOP_SSH_GATEWAY={gw} \
         RUNLOOP_API_KEY={} DEVSYNC_TLS_CA={}",
        st.token,
        st.ca_path().display()
    );
    tokio::select! {
        r = running.task => r.map_err(|e| e.to_string())?.map_err(|e| e.to_string()),
        _ = tokio::signal::ctrl_c() => {
            server::log("interrupted; stopping");
            Ok(())
        }
    }
}
