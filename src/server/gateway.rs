//! The TLS gateway: accepts TLS on one port, reads the SNI name before the handshake
//! (`LazyConfigAcceptor`), maps it to a devbox, then serves SSH for it, either with the
//! built-in server or by forwarding the decrypted stream to an upstream sshd. A client must
//! send its hello, then its first SSH bytes, within [`Limits::first_bytes`] each, and may
//! hold at most [`Limits::per_address`] connections.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::Acceptor;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::LazyConfigAcceptor;

use super::state::State;
use super::{Limits, PerAddress, ServeError, log, sshd};

/// TLS settings: the given certificate, or one for the devbox domain signed by the state's CA.
pub fn tls_config(
    state: &State,
    cert: Option<(&std::path::Path, &std::path::Path)>,
    names: &[String],
) -> Result<Arc<ServerConfig>, ServeError> {
    let cert_err = |path: &std::path::Path, e: &dyn std::fmt::Display| ServeError::Certificate {
        path: path.display().to_string(),
        msg: e.to_string(),
    };
    let (chain, key): (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) = match cert {
        Some((c, k)) => (
            CertificateDer::pem_file_iter(c)
                .map_err(|e| cert_err(c, &e))?
                .collect::<Result<_, _>>()
                .map_err(|e| cert_err(c, &e))?,
            PrivateKeyDer::from_pem_file(k).map_err(|e| cert_err(k, &e))?,
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
            let generated = std::path::Path::new("(generated)");
            (
                CertificateDer::pem_slice_iter(c.as_bytes())
                    .collect::<Result<_, _>>()
                    .map_err(|e| cert_err(generated, &e))?,
                PrivateKeyDer::from_pem_slice(k.as_bytes()).map_err(|e| cert_err(generated, &e))?,
            )
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(ServeError::Tls)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(ServeError::Tls)?;
    Ok(Arc::new(cfg))
}

pub struct Gateway {
    pub state: Arc<State>,
    pub tls: Arc<ServerConfig>,
    pub ssh: Arc<russh::server::Config>,
    /// Forward decrypted streams to this sshd instead of the built-in server.
    pub upstream: Option<String>,
    /// The devsync binary (sessions run its `sftp-server`).
    pub exe: std::path::PathBuf,
    pub limits: Limits,
    pub open: PerAddress,
}

impl Gateway {
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        loop {
            let (tcp, peer) = listener.accept().await?;
            let Some(slot) = self.open.take(peer.ip(), self.limits.per_address) else {
                log(&format!(
                    "{peer}: more than {} connections from {}; refused",
                    self.limits.per_address,
                    peer.ip()
                ));
                continue; // dropping it closes it
            };
            let _ = tcp.set_nodelay(true); // interactive protocol
            let g = self.clone();
            tokio::spawn(async move {
                g.connection(tcp, peer).await;
                drop(slot);
            });
        }
    }

    async fn connection(&self, tcp: TcpStream, peer: SocketAddr) {
        let limit = self.limits.first_bytes;
        let start =
            match tokio::time::timeout(limit, LazyConfigAcceptor::new(Acceptor::default(), tcp))
                .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return log(&format!("{peer}: not a TLS client hello: {e}")),
                Err(_) => {
                    return log(&format!(
                        "{peer}: no TLS client hello within {}s",
                        limit.as_secs()
                    ));
                }
            };
        let sni = start.client_hello().server_name().map(str::to_string);
        let Some(devbox) = sni.as_deref().and_then(|n| self.state.devbox_for_sni(n)) else {
            return log(&format!("{peer}: no devbox for SNI {sni:?}; closing"));
        };
        let stream = match tokio::time::timeout(limit, start.into_stream(self.tls.clone())).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return log(&format!("{peer} {}: TLS handshake failed: {e}", devbox.id)),
            Err(_) => return log(&format!("{peer} {}: TLS handshake timed out", devbox.id)),
        };
        log(&format!("{peer} {}: connected", devbox.id));
        let stream = FirstByte::new(stream, limit);
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
            None => {
                let runner = sshd::Runner {
                    who: self.state.identity(&devbox),
                    exe: self.exe.clone(),
                };
                sshd::serve(
                    stream,
                    devbox,
                    runner,
                    self.ssh.clone(),
                    peer,
                    self.limits.auth,
                )
                .await
            }
        }
    }
}

/// A stream that fails if its first byte does not arrive within a limit (a client that
/// finishes TLS and then says nothing holds a connection for nothing).
struct FirstByte<S> {
    inner: S,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> FirstByte<S> {
    fn new(inner: S, limit: Duration) -> Self {
        FirstByte {
            inner,
            deadline: Some(Box::pin(tokio::time::sleep(limit))),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FirstByte<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        match &r {
            Poll::Ready(Ok(())) if buf.filled().len() > before => self.deadline = None,
            Poll::Pending => {
                if let Some(d) = self.deadline.as_mut()
                    && d.as_mut().poll(cx).is_ready()
                {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no data after the TLS handshake",
                    )));
                }
            }
            _ => {}
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FirstByte<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
