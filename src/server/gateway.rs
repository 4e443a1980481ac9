//! The TLS gateway: accepts TLS on one port, reads the SNI name before the handshake
//! (`LazyConfigAcceptor`), maps it to a devbox, then serves SSH for it, either with the
//! built-in server or by forwarding the decrypted stream to an upstream sshd.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::Acceptor;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::LazyConfigAcceptor;

use super::state::State;
use super::{log, sshd};

/// TLS settings: the given certificate, or one for the devbox domain signed by the state's CA.
pub fn tls_config(
    state: &State,
    cert: Option<(&std::path::Path, &std::path::Path)>,
    names: &[String],
) -> Result<Arc<ServerConfig>, String> {
    let (chain, key): (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) = match cert {
        Some((c, k)) => (
            CertificateDer::pem_file_iter(c)
                .map_err(|e| format!("{}: {e}", c.display()))?
                .collect::<Result<_, _>>()
                .map_err(|e| format!("{}: {e}", c.display()))?,
            PrivateKeyDer::from_pem_file(k).map_err(|e| format!("{}: {e}", k.display()))?,
        ),
        None => {
            let mut sans = vec![
                format!("*.{}", state.domain),
                state.domain.clone(),
                format!("ssh.{}", state.domain),
                "localhost".into(),
                "127.0.0.1".into(),
                "::1".into(),
            ];
            sans.extend(names.iter().cloned());
            let (c, k) = state.gateway_cert(sans)?;
            (
                CertificateDer::pem_slice_iter(c.as_bytes())
                    .collect::<Result<_, _>>()
                    .map_err(|e| e.to_string())?,
                PrivateKeyDer::from_pem_slice(k.as_bytes()).map_err(|e| e.to_string())?,
            )
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("gateway certificate: {e}"))?;
    Ok(Arc::new(cfg))
}

pub struct Gateway {
    pub state: Arc<State>,
    pub tls: Arc<ServerConfig>,
    pub ssh: Arc<russh::server::Config>,
    /// Forward decrypted streams to this sshd instead of the built-in server.
    pub upstream: Option<String>,
}

impl Gateway {
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        loop {
            let (tcp, peer) = listener.accept().await?;
            let _ = tcp.set_nodelay(true); // interactive protocol
            let g = self.clone();
            tokio::spawn(async move { g.connection(tcp, peer).await });
        }
    }

    async fn connection(&self, tcp: TcpStream, peer: SocketAddr) {
        let start = match tokio::time::timeout(
            Duration::from_secs(30),
            LazyConfigAcceptor::new(Acceptor::default(), tcp),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return log(&format!("{peer}: not a TLS client hello: {e}")),
            Err(_) => return log(&format!("{peer}: no TLS client hello within 30s")),
        };
        let sni = start.client_hello().server_name().map(str::to_string);
        let Some(devbox) = sni.as_deref().and_then(|n| self.state.devbox_for_sni(n)) else {
            return log(&format!("{peer}: no devbox for SNI {sni:?}; closing"));
        };
        let stream = match start.into_stream(self.tls.clone()).await {
            Ok(s) => s,
            Err(e) => return log(&format!("{peer} {}: TLS handshake failed: {e}", devbox.id)),
        };
        log(&format!("{peer} {}: connected", devbox.id));
        match &self.upstream {
            Some(addr) => {
                let mut tls = stream;
                match TcpStream::connect(addr).await {
                    Ok(mut up) => {
                        let _ = up.set_nodelay(true); // interactive protocol
                        if let Err(e) = tokio::io::copy_bidirectional(&mut tls, &mut up).await {
                            log(&format!("{peer} {}: upstream {addr}: {e}", devbox.id));
                        }
                    }
                    Err(e) => log(&format!(
                        "{peer} {}: cannot reach upstream {addr}: {e}",
                        devbox.id
                    )),
                }
            }
            None => sshd::serve(stream, devbox, self.ssh.clone(), peer).await,
        }
    }
}
