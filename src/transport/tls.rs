//! TLS to a devbox gateway (rustls, ring): which certificates to trust and how to connect.
//!
//! Trust: the webpki roots plus the system's, plus an extra CA file (`--tls-ca`, for
//! self-hosted `devsync serve`). A certificate is accepted when it is valid for the SNI name
//! (the devbox's host name) or for the gateway host, since gateways commonly present their own
//! name. `--insecure-tls` skips certificate checks altogether (handshake signatures are still
//! verified); it exists for gateways with private certificates you cannot get the CA of, such
//! as the hosted service's gateway which the official CLI never verifies. The SSH host key is
//! still checked and pinned, so the connection stays authenticated end to end.

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::TransportError;

/// Why no TLS client configuration could be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading CA file {path}")]
    CaFile {
        path: String,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("CA file {path} holds no certificate")]
    CaEmpty { path: String },
    #[error("CA file {path}")]
    CaCert {
        path: String,
        #[source]
        source: rustls::Error,
    },
    #[error("TLS configuration")]
    Config(#[source] rustls::Error),
    #[error("TLS certificate verifier")]
    Verifier(#[source] rustls::client::VerifierBuilderError),
}

/// How server certificates are judged.
#[derive(Debug, Clone, Default)]
pub struct TlsPolicy {
    /// Extra CA certificates (PEM) to trust.
    pub extra_ca: Option<std::path::PathBuf>,
    /// Accept any certificate (see the module docs for why this exists).
    pub insecure: bool,
}

/// Installs ring as the process-wide rustls provider (reqwest's `rustls-no-provider` needs one).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default(); // already installed: fine
}

fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// Root store: webpki roots, the system's roots, and `extra_ca`.
pub fn roots(extra_ca: Option<&Path>) -> Result<RootCertStore, TlsError> {
    // The system store is a directory of files: read it once per process, not once per
    // client configuration (the API client and the gateway each need one).
    static BASE: OnceLock<RootCertStore> = OnceLock::new();
    let mut roots = BASE
        .get_or_init(|| {
            let mut roots = RootCertStore::empty();
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            // Unreadable system stores are not fatal: the bundled roots remain.
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            roots
        })
        .clone();
    if let Some(path) = extra_ca {
        let shown = || path.display().to_string();
        let file_err = |source| TlsError::CaFile {
            path: shown(),
            source,
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(file_err)?
            .collect::<Result<_, _>>()
            .map_err(file_err)?;
        if certs.is_empty() {
            return Err(TlsError::CaEmpty { path: shown() });
        }
        for c in certs {
            roots.add(c).map_err(|source| TlsError::CaCert {
                path: shown(),
                source,
            })?;
        }
    }
    Ok(roots)
}

/// A client configuration for `policy`. `alt_name` is the other name a certificate may be valid
/// for (the gateway host).
pub fn client_config(
    policy: &TlsPolicy,
    alt_name: Option<&str>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let verifier = verifier(policy, alt_name)?;
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// The certificate verifier for `policy`.
pub fn verifier(
    policy: &TlsPolicy,
    alt_name: Option<&str>,
) -> Result<Arc<dyn ServerCertVerifier>, TlsError> {
    let provider = provider();
    if policy.insecure {
        return Ok(Arc::new(AcceptAnyCert {
            algs: provider.signature_verification_algorithms,
        }));
    }
    let roots = Arc::new(roots(policy.extra_ca.as_deref())?);
    let inner = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(TlsError::Verifier)?;
    let alt = alt_name.and_then(|n| ServerName::try_from(n.to_string()).ok());
    Ok(Arc::new(EitherName { inner, alt }))
}

/// Opens TCP to `gateway` (`host:port`) and TLS with SNI `sni` (no ALPN).
pub async fn connect(
    cfg: Arc<ClientConfig>,
    gateway: &str,
    sni: &str,
    timeout: Duration,
) -> Result<TlsStream<TcpStream>, TransportError> {
    let tls_err = |source: std::io::Error| TransportError::Tls {
        gateway: gateway.to_string(),
        hint: hint_for(&source),
        source,
    };
    let tcp = super::connect_tcp(gateway, timeout).await?;
    let name = ServerName::try_from(sni.to_string()).map_err(|e| {
        tls_err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("bad server name {sni:?}: {e}"),
        ))
    })?;
    let handshake = TlsConnector::from(cfg).connect(name, tcp);
    tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| {
            tls_err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "handshake timed out",
            ))
        })?
        .map_err(tls_err)
}

/// What to do about a refused gateway certificate, if that is what `e` is.
fn hint_for(e: &std::io::Error) -> &'static str {
    let refused = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|r| matches!(r, rustls::Error::InvalidCertificate(_)));
    if refused {
        " (the gateway's certificate is not trusted: pass --tls-ca FILE with its CA, e.g. the \
         ca.pem in a `devsync serve` state directory, or --insecure-tls)"
    } else {
        ""
    }
}

/// Valid for the SNI name, or else for the gateway's own name.
#[derive(Debug)]
struct EitherName {
    inner: Arc<WebPkiServerVerifier>,
    alt: Option<ServerName<'static>>,
}

impl ServerCertVerifier for EitherName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if self.alt.is_some() => {
                let alt = self.alt.as_ref().unwrap_or(server_name);
                self.inner
                    .verify_server_cert(end_entity, intermediates, alt, ocsp, now)
            }
            r => r,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// `--insecure-tls`: any certificate, but the handshake must still be signed by its key.
#[derive(Debug)]
struct AcceptAnyCert {
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA (as a temp PEM file) and a leaf certificate for `names` signed by it.
    fn pki(names: &[&str]) -> (tempfile::NamedTempFile, CertificateDer<'static>) {
        let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = rcgen::CertifiedIssuer::self_signed(p, ca_key).unwrap();
        let leaf_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let leaf = rcgen::CertificateParams::new(names)
            .unwrap()
            .signed_by(&leaf_key, &ca)
            .unwrap();
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), ca.pem()).unwrap();
        (f, leaf.der().clone())
    }

    fn verify(
        policy: &TlsPolicy,
        alt: Option<&str>,
        cert: &CertificateDer<'_>,
        sni: &str,
    ) -> Result<(), rustls::Error> {
        install_crypto_provider();
        let name = ServerName::try_from(sni.to_string()).unwrap();
        verifier(policy, alt)
            .unwrap()
            .verify_server_cert(cert, &[], &name, &[], UnixTime::now())
            .map(|_| ())
    }

    #[test]
    fn certificates_valid_for_the_sni_or_the_gateway_name() {
        let (ca, leaf) = pki(&["*.devboxes.example"]);
        let policy = TlsPolicy {
            extra_ca: Some(ca.path().to_path_buf()),
            insecure: false,
        };
        verify(&policy, None, &leaf, "dbx_abc.devboxes.example").unwrap();
        // Valid for the gateway's name only: accepted when that is the gateway we dialled.
        let (ca2, gw_leaf) = pki(&["ssh.example"]);
        let policy2 = TlsPolicy {
            extra_ca: Some(ca2.path().to_path_buf()),
            insecure: false,
        };
        verify(
            &policy2,
            Some("ssh.example"),
            &gw_leaf,
            "dbx_abc.devboxes.example",
        )
        .unwrap();
        assert!(
            verify(
                &policy2,
                Some("other.example"),
                &gw_leaf,
                "dbx_abc.devboxes.example"
            )
            .is_err()
        );
        assert!(verify(&policy2, None, &gw_leaf, "dbx_abc.devboxes.example").is_err());
        // An untrusted CA is refused whatever the name; --insecure-tls accepts it.
        assert!(
            verify(
                &TlsPolicy::default(),
                None,
                &leaf,
                "dbx_abc.devboxes.example"
            )
            .is_err()
        );
        let insecure = TlsPolicy {
            extra_ca: None,
            insecure: true,
        };
        verify(&insecure, None, &leaf, "anything.at.all").unwrap();
    }

    #[test]
    fn bad_ca_files_are_reported() {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), "not a certificate").unwrap();
        let e = roots(Some(f.path())).unwrap_err().to_string();
        assert!(e.contains("holds no certificate"), "{e}");
        assert!(roots(Some(Path::new("/nonexistent/ca.pem"))).is_err());
    }
}
