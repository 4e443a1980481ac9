//! The HTTP API of `devsync serve`, compatible with the hosted service's endpoints that
//! devsync uses: `POST /v1/devboxes/{id}/create_ssh_key` and `GET /v1/devboxes/{id}`, with a
//! bearer token. Plain HTTP: bind it to loopback or put a TLS proxy in front.

use std::convert::Infallible;
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

pub async fn serve(listener: TcpListener, state: Arc<State>) -> std::io::Result<()> {
    loop {
        let (tcp, peer) = listener.accept().await?;
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(req, &state, peer)) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await
            {
                log(&format!("api {peer}: {e}"));
            }
        });
    }
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
