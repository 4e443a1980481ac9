//! The HTTP API of `devsync serve`, compatible with the hosted service's endpoints that
//! devsync uses: `POST /v1/devboxes/{id}/create_ssh_key` and `GET /v1/devboxes/{id}`, with a
//! bearer token. Over TLS with the gateway's certificate (`--api-tls`), or plain HTTP, which
//! `devsync serve` only allows on loopback: the API hands out SSH private keys.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::state::{State, StateError};
use super::{Limits, PerAddress, log};

/// The API and what it needs to answer.
pub struct Api {
    pub state: Arc<State>,
    /// Serve over TLS (with the gateway's certificate).
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub limits: Limits,
    pub open: PerAddress,
}

impl Api {
    /// Answers API requests on `listener`.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        loop {
            let (tcp, peer) = listener.accept().await?;
            let Some(slot) = self.open.take(peer.ip(), self.limits.per_address) else {
                log(&format!(
                    "api {peer}: more than {} connections from {}; refused",
                    self.limits.per_address,
                    peer.ip()
                ));
                continue; // dropping it closes it
            };
            let api = self.clone();
            tokio::spawn(async move {
                // Requests are small: a connection that lingers is not a client.
                let whole = tokio::time::timeout(api.limits.api_connection, api.handle(tcp, peer));
                match whole.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => log(&format!("api {peer}: {}", crate::error_chain::chain(&e))),
                    Err(_) => log(&format!(
                        "api {peer}: connection open for {} s; closed",
                        api.limits.api_connection.as_secs()
                    )),
                }
                drop(slot);
            });
        }
    }

    async fn handle(&self, tcp: tokio::net::TcpStream, peer: SocketAddr) -> Result<(), ConnError> {
        match &self.tls {
            None => self.connection(tcp, peer).await,
            Some(acceptor) => {
                let accepted = tokio::time::timeout(self.limits.first_bytes, acceptor.accept(tcp));
                match accepted.await {
                    Ok(Ok(stream)) => self.connection(stream, peer).await,
                    Ok(Err(e)) => Err(ConnError::Tls(e)),
                    Err(_) => Err(ConnError::NoHandshake),
                }
            }
        }
    }

    async fn connection<S>(&self, io: S, peer: SocketAddr) -> Result<(), ConnError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let state = self.state.clone();
        let svc = service_fn(move |req| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(handle(req, &state, peer)) }
        });
        // The header timeout also ends keep-alive connections that send no next request.
        hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(self.limits.first_bytes)
            .serve_connection(TokioIo::new(io), svc)
            .await
            .map_err(ConnError::Http)
    }
}

/// Why an API connection ended early (logged, never sent anywhere).
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("TLS")]
    Tls(#[source] std::io::Error),
    #[error("no TLS handshake in time")]
    NoHandshake,
    #[error("HTTP")]
    Http(#[source] hyper::Error),
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn handle(
    req: Request<Incoming>,
    state: &State,
    peer: std::net::SocketAddr,
) -> Response<Full<Bytes>> {
    let authorized = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| constant_time_eq(t.as_bytes(), state.token.as_bytes()));
    let path = req.uri().path().to_string();
    if !authorized {
        log(&format!("api {peer}: 401 {} {path}", req.method()));
        return json(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({"error": "invalid or missing bearer token"}),
        );
    }
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let not_found = |what: &str| {
        json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": format!("{what} not found")}),
        )
    };
    match (req.method(), parts.as_slice()) {
        (&Method::POST, ["v1", "devboxes", id, "create_ssh_key"]) => {
            match state
                .devbox_or_create(id)
                .map_err(|e| (e.to_string(), matches!(e, StateError::SharedUser)))
            {
                Ok(Some(d)) => json(
                    StatusCode::OK,
                    serde_json::json!({
                        "id": d.id,
                        "url": state.url(&d.id),
                        "ssh_private_key": d.key_pem,
                        "ssh_user": d.user,
                    }),
                ),
                Ok(None) => not_found(&format!("devbox {id}")),
                Err((e, refused)) => json(
                    if refused {
                        StatusCode::FORBIDDEN
                    } else {
                        StatusCode::INTERNAL_SERVER_ERROR
                    },
                    serde_json::json!({"error": e}),
                ),
            }
        }
        // Reading is not creating: an unknown devbox is 404 even with --create-on-demand.
        (&Method::GET, ["v1", "devboxes", id]) => match state.devbox(id) {
            Some(d) => json(
                StatusCode::OK,
                serde_json::json!({
                    "id": d.id,
                    "status": d.status(),
                    "launch_parameters": {"user_parameters": {"username": d.user}},
                }),
            ),
            None => not_found(&format!("devbox {id}")),
        },
        _ => not_found(&path),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
