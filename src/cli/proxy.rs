//! `devsync proxy HOST`: an OpenSSH ProxyCommand. stdin/stdout ↔ TLS to the devbox gateway
//! with SNI = HOST, the certificate checked by the same policy as push (`--tls-ca`,
//! `--insecure-tls`). Each direction ends on its own: our stdin's EOF ends what we send (TLS
//! close_notify, then the TCP write side), and the gateway's end of the stream ends the
//! proxy. Reads of any size are relayed whole (no 16 KiB record-boundary loss, unlike
//! `openssl s_client` 3.3–3.6.2).

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::transport::devbox_api::gateway_for;
use crate::transport::tls::{self, TlsPolicy};

#[derive(Args, Debug)]
pub struct ProxyArgs {
    /// The devbox's SSH host name (TLS SNI; `%h` in a ProxyCommand)
    #[arg(value_name = "HOST")]
    host: String,
    /// The TLS gateway, host:port (default: RUNLOOP_SSH_GATEWAY, else ssh.<domain>:443 for
    /// RUNLOOP_BASE_URL's api.<domain>)
    #[arg(long, value_name = "HOST:PORT")]
    gateway: Option<String>,
    /// Extra CA certificate (PEM) to trust for the gateway
    #[arg(long, value_name = "FILE", env = "DEVSYNC_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Skip verifying the gateway's TLS certificate (ssh still checks the host key)
    #[arg(long)]
    insecure_tls: bool,
    /// Seconds to wait for the connection and TLS handshake
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    timeout: u64,
}

pub fn run(a: ProxyArgs) -> Result<u8, super::Failure> {
    let rt = super::runtime()?;
    let r = rt.block_on(relay(&a));
    rt.shutdown_background(); // the stdin reader may be blocked in read(2)
    r.map_err(|error| super::Failure {
        error,
        code: 255,
        json: false,
    })
}

async fn relay(a: &ProxyArgs) -> anyhow::Result<u8> {
    let gateway = match &a.gateway {
        Some(g) => gateway_for("", Some(g))?,
        None => {
            let base = std::env::var("RUNLOOP_BASE_URL")
                .ok()
                .filter(|b| !b.is_empty())
                .unwrap_or_else(|| crate::transport::devbox_api::DEFAULT_BASE.into());
            gateway_for(&base, std::env::var("RUNLOOP_SSH_GATEWAY").ok().as_deref())?
        }
    };
    let policy = TlsPolicy {
        extra_ca: a.tls_ca.clone(),
        insecure: a.insecure_tls,
    };
    let gw_host = gateway
        .rsplit_once(':')
        .map_or(gateway.as_str(), |(h, _)| h);
    let cfg = tls::client_config(&policy, Some(gw_host))?;
    let stream = tls::connect(
        cfg,
        &gateway,
        &a.host,
        Duration::from_secs(a.timeout.max(1)),
    )
    .await?;
    let (mut from_gw, mut to_gw) = tokio::io::split(stream);
    let mut stdin = super::stdin_chunks();
    let send = async move {
        while let Some(chunk) = stdin.recv().await {
            to_gw.write_all(&chunk).await?;
            to_gw.flush().await?;
        }
        // Our side is done: say so, keep receiving.
        to_gw.shutdown().await?;
        std::future::pending::<std::io::Result<()>>().await
    };
    let receive = async move {
        let mut out = std::io::stdout().lock();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match from_gw.read(&mut buf).await {
                Ok(0) => return Ok::<_, std::io::Error>(()),
                Ok(n) => n,
                // A gateway that closes without close_notify still ended the stream.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            };
            out.write_all(buf.get(..n).unwrap_or_default())?;
            out.flush()?;
        }
    };
    tokio::select! {
        r = send => r?,
        r = receive => r?,
    }
    Ok(super::exit::OK)
}
