//! `devsync serve`: run the embedded endpoint (TLS gateway + SSH server + key API).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use tokio::net::TcpListener;

use super::{Failure, exit};
use crate::server::{self, Isolation, KeyFormat, Limits, Listeners, ServeConfig, StateOptions};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// State directory (keys, CA, devboxes); default ~/.local/state/devsync/serve, or
    /// /var/lib/devsync/serve as root
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
    /// As root, devboxes run as their own users with uids from N on (no accounts needed)
    #[arg(long, value_name = "N", default_value_t = 200_000)]
    uid_base: u32,
    /// Run devbox ID as the existing account USER (repeatable; needs root)
    #[arg(long = "devbox-account", value_name = "ID=USER")]
    accounts: Vec<String>,
    /// Run every session as the serving user (then only one devbox can be served)
    #[arg(long)]
    no_isolation: bool,
    /// Connections one address may hold open at once, on the gateway and on the API
    #[arg(long, value_name = "N", default_value_t = 64)]
    max_conns_per_ip: usize,
    /// Print the client environment (an `export` line for eval) on stdout, and exit
    #[arg(long)]
    print_env: bool,
}

pub fn run(a: ServeArgs) -> Result<u8, Failure> {
    let rt = super::runtime()?;
    rt.block_on(serve(a))?;
    Ok(exit::OK)
}

fn isolation(a: &ServeArgs) -> anyhow::Result<Isolation> {
    let root = rustix::process::geteuid().is_root();
    if a.no_isolation {
        return Ok(Isolation::SharedUser);
    }
    if !root {
        if !a.accounts.is_empty() {
            bail!("--devbox-account needs root: only root can run devboxes as other users");
        }
        return Ok(Isolation::SharedUser);
    }
    let mut accounts = HashMap::new();
    for m in &a.accounts {
        let Some((id, user)) = m
            .split_once('=')
            .filter(|(i, u)| !i.is_empty() && !u.is_empty())
        else {
            bail!("--devbox-account {m:?}: write it as ID=USER, e.g. dbx_a=alice");
        };
        accounts.insert(id.to_string(), user.to_string());
    }
    Ok(Isolation::Users {
        base: a.uid_base,
        accounts,
    })
}

/// `export …` for clients of this endpoint, safe to `eval`.
fn client_env(api: &str, gw: &str, token: &str, ca: &std::path::Path) -> String {
    let q = |s: &str| shell_escape::unix::escape(s.into()).into_owned();
    format!(
        "export RUNLOOP_BASE_URL={} RUNLOOP_SSH_GATEWAY={} RUNLOOP_API_KEY={} DEVSYNC_TLS_CA={}",
        q(api),
        q(gw),
        q(token),
        q(&ca.display().to_string())
    )
}

async fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let isolation = isolation(&a)?;
    let on_command_line = std::env::args().any(|x| x == "--token" || x.starts_with("--token="));
    if on_command_line && matches!(isolation, Isolation::Users { .. }) {
        // Every devbox user can read our command line in /proc.
        server::log(
            "warning: --token on the command line is visible to devbox users (in /proc); \
             pass it in DEVSYNC_SERVE_TOKEN instead",
        );
    }
    let dir = match &a.state {
        Some(d) => d.clone(),
        // Root's home is closed to the devbox users who must reach their homes in it.
        None if matches!(isolation, Isolation::Users { .. }) => "/var/lib/devsync/serve".into(),
        None => crate::target::credentials::state_dir()?.join("serve"),
    };
    // Homes live in it and sessions run elsewhere: it must not depend on our cwd.
    let dir = std::path::absolute(&dir).with_context(|| format!("--state {}", dir.display()))?;
    let scheme = if a.api_tls { "https" } else { "http" };
    let state = StateOptions {
        dir: dir.clone(),
        domain: a.domain.clone(),
        token: a.token.clone(),
        default_user: a.user.clone(),
        create_on_demand: a.create_on_demand,
        key_format: if a.key_format == "openssh" {
            KeyFormat::OpenSsh
        } else {
            KeyFormat::Pkcs8
        },
        devboxes: a.devboxes.clone(),
        isolation,
    };
    if a.print_env {
        let st = server::State::open(&state)?;
        println!(
            "{}",
            client_env(
                &format!("{scheme}://{}", a.api_listen),
                &a.listen,
                &st.token,
                &st.ca_path()
            )
        );
        return Ok(());
    }
    let bind = |addr: &str| {
        let addr = addr.to_string();
        async move {
            TcpListener::bind(&addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))
        }
    };
    // Checked before binding anything: the API hands out SSH private keys.
    if !a.api_tls {
        let mut addrs = tokio::net::lookup_host(&a.api_listen)
            .await
            .with_context(|| format!("--api-listen {}", a.api_listen))?;
        if let Some(open) = addrs.find(|ad| !ad.ip().is_loopback()) {
            bail!(
                "the API hands out SSH private keys and would be plain HTTP on {open}: add \
                 --api-tls (clients then use https:// and trust the state's CA), or bind \
                 --api-listen to 127.0.0.1 and put a TLS proxy in front"
            );
        }
    }
    let listeners = Listeners {
        gateway: bind(&a.listen).await?,
        api: bind(&a.api_listen).await?,
    };
    let (gw, api) = (listeners.gateway.local_addr()?, listeners.api.local_addr()?);
    let cfg = ServeConfig {
        state,
        cert: a.cert.zip(a.key),
        gateway_names: a.gateway_names,
        upstream: a.upstream,
        auth_rejection: Duration::from_secs(1),
        api_tls: a.api_tls,
        exe: std::env::current_exe().context("finding the devsync binary")?,
        limits: Limits {
            per_address: a.max_conns_per_ip.max(1),
            ..Limits::default()
        },
    };
    let running = server::start(listeners, cfg)?;
    let st = &running.state;
    server::log(&format!(
        "gateway on {gw} (TLS, SNI <devbox>.{}), API on {scheme}://{api}, state in {}",
        st.domain,
        dir.display()
    ));
    eprintln!(
        "# clients of this endpoint (or: eval \"$(devsync serve --print-env ...)\"):\n{}",
        client_env(
            &format!("{scheme}://{api}"),
            &gw.to_string(),
            &st.token,
            &st.ca_path()
        )
    );
    tokio::select! {
        r = running.task => r.context("the endpoint stopped")?.context("the endpoint stopped")?,
        _ = tokio::signal::ctrl_c() => server::log("interrupted; stopping"),
    }
    Ok(())
}
