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

use super::log;
use super::state::State;

/// Answers API requests on `listener`, over TLS when `tls` is given.
pub async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> std::io::Result<()> {
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let (tcp, peer) = listener.accept().await?;
        let state = state.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let r = match tls {
                None => connection(tcp, state, peer).await,
                Some(acceptor) => match acceptor.accept(tcp).await {
                    Ok(stream) => connection(stream, state, peer).await,
                    Err(e) => Err(format!("TLS: {e}")),
                },
            };
            if let Err(e) = r {
                log(&format!("api {peer}: {e}"));
            }
        });
    }
}

async fn connection<S>(io: S, state: Arc<State>, peer: SocketAddr) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(handle(req, &state, peer)) }
    });
    hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), svc)
        .await
        .map_err(|e| e.to_string())
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
            match state.devbox_or_create(id) {
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
                Err(e) => json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    serde_json::json!({"error": e}),
                ),
            }
        }
        (&Method::GET, ["v1", "devboxes", id]) => match state.devbox_or_create(id) {
            Ok(Some(d)) => json(
                StatusCode::OK,
                serde_json::json!({
                    "id": d.id,
                    "status": d.status(),
                    "launch_parameters": {"user_parameters": {"username": d.user}},
                }),
            ),
            Ok(None) => not_found(&format!("devbox {id}")),
            Err(e) => json(
                StatusCode::INTERNAL_SERVER_ERROR,
                serde_json::json!({"error": e}),
            ),
        },
        _ => not_found(&path),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
