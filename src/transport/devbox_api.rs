//! The hosted devbox service's HTTP API: devbox status and SSH credentials.
//!
//! `RUNLOOP_API_KEY` authenticates (bearer), `RUNLOOP_BASE_URL` picks the service (default
//! `https://api.runloop.ai`), `RUNLOOP_SSH_GATEWAY` overrides the TLS gateway (default
//! `ssh.<domain>:443` for `api.<domain>`). Requests time out after 30 s and are retried on
//! 408/409/429/5xx and connection failures with exponential backoff, like the official clients.

use std::future::Future;
use std::time::Duration;

use serde::Deserialize;

use super::TransportError;
use super::tls::{TlsPolicy, client_config};
use crate::target::credentials::DevboxCreds;

pub const DEFAULT_BASE: &str = "https://api.runloop.ai";

/// Retry schedule for API calls.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    pub retries: u32,
    pub first: Duration,
    pub max: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            retries: 5,
            first: Duration::from_millis(500),
            max: Duration::from_secs(8),
        }
    }
}

/// One failed attempt: worth retrying or not.
#[derive(Debug)]
pub enum Attempt {
    /// A busy or briefly unreachable service (5xx, 429, timeouts): back off and try again.
    Retry(String),
    /// Nothing listens there (connection refused): most likely a wrong address, so one quick
    /// retry (a service restarting) and then an error that says what to check.
    Quick(String),
    Fail(String),
}

/// The pause before the one retry of a refused connection.
pub const QUICK_RETRY: Duration = Duration::from_millis(250);

/// Runs `op` until it succeeds, fails for good, or the retries run out (backoff doubling from
/// `first` up to `max`).
pub async fn with_retry<T, F, Fut>(policy: Retry, mut op: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Attempt>>,
{
    let mut delay = policy.first;
    let mut quick_tried = false;
    for attempt in 0..=policy.retries {
        match op().await {
            Ok(v) => return Ok(v),
            Err(Attempt::Fail(e)) => return Err(e),
            Err(Attempt::Quick(e)) if quick_tried => {
                return Err(format!(
                    "{e} (nothing accepts connections there: check RUNLOOP_BASE_URL)"
                ));
            }
            Err(Attempt::Quick(_)) => {
                quick_tried = true;
                tokio::time::sleep(QUICK_RETRY).await;
            }
            Err(Attempt::Retry(e)) if attempt == policy.retries => {
                return Err(format!("{e} (gave up after {} attempts)", attempt + 1));
            }
            Err(Attempt::Retry(_)) => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(policy.max);
            }
        }
    }
    Err("no attempt made".into())
}

/// Whether `e` (or what it wraps) is a refused TCP connection.
fn refused(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return true;
        }
        cur = c.source();
    }
    false
}

#[derive(Deserialize)]
struct KeyResponse {
    url: String,
    ssh_private_key: String,
    ssh_user: String,
}

#[derive(Deserialize)]
struct DevboxResponse {
    status: String,
}

pub struct Api {
    http: reqwest::Client,
    base: String,
    key: String,
    retry: Retry,
}

impl Api {
    pub fn from_env(tls: &TlsPolicy) -> Result<Api, TransportError> {
        let key = std::env::var("RUNLOOP_API_KEY")
            .ok()
            .filter(|k| !k.is_empty())
            .ok_or_else(|| {
                TransportError::Api(
                    "RUNLOOP_API_KEY is not set: export your API key to reach devboxes".into(),
                )
            })?;
        let base = std::env::var("RUNLOOP_BASE_URL")
            .ok()
            .filter(|b| !b.is_empty())
            .unwrap_or_else(|| DEFAULT_BASE.into());
        Api::new(&base, &key, tls)
    }

    /// An API client for `base` with bearer `key`.
    pub fn new(base: &str, key: &str, tls: &TlsPolicy) -> Result<Api, TransportError> {
        let base = base.trim_end_matches('/').to_string();
        let key = key.to_string();
        let tls_cfg = client_config(tls, None)?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("devsync/", env!("CARGO_PKG_VERSION")))
            .tls_backend_preconfigured((*tls_cfg).clone())
            .build()
            .map_err(|e| TransportError::Api(format!("HTTP client: {e}")))?;
        Ok(Api {
            http,
            base,
            key,
            retry: Retry::default(),
        })
    }

    /// `host:port` of the TLS gateway in front of the devboxes.
    pub fn gateway(&self) -> Result<String, TransportError> {
        gateway_for(
            &self.base,
            std::env::var("RUNLOOP_SSH_GATEWAY").ok().as_deref(),
        )
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        id: &str,
    ) -> Result<String, TransportError> {
        let url = format!("{}{path}", self.base);
        with_retry(self.retry, || async {
            let mut req = self
                .http
                .request(method.clone(), &url)
                .bearer_auth(&self.key);
            if method == reqwest::Method::POST {
                req = req.json(&serde_json::json!({}));
            }
            let resp = req.send().await.map_err(|e| {
                let msg = format!("{url}: {}", error_chain(&e));
                if let Some(hint) = permanent_failure(&e) {
                    // Retrying cannot make a certificate acceptable or the answer HTTP.
                    Attempt::Fail(format!("{msg} ({hint})"))
                } else if refused(&e) {
                    Attempt::Quick(msg)
                } else if e.is_connect() || e.is_timeout() || e.is_request() {
                    Attempt::Retry(msg)
                } else {
                    Attempt::Fail(msg)
                }
            })?;
            let status = resp.status();
            let body = resp.text().await.unwrap_or_default();
            if status.is_success() {
                return Ok(body);
            }
            let snippet: String = body.chars().take(300).collect();
            let msg = match status.as_u16() {
                401 | 403 => format!("the API refused RUNLOOP_API_KEY ({status}); check the key"),
                404 => format!("devbox {id} not found ({status}); check the id"),
                _ => format!("{url}: {status} {snippet}"),
            };
            match status.as_u16() {
                408 | 409 | 429 | 500..=599 => Err(Attempt::Retry(msg)),
                _ => Err(Attempt::Fail(msg)),
            }
        })
        .await
        .map_err(TransportError::Api)
    }

    pub async fn status(&self, id: &str) -> Result<String, TransportError> {
        let body = self
            .call(reqwest::Method::GET, &format!("/v1/devboxes/{id}"), id)
            .await?;
        serde_json::from_str::<DevboxResponse>(&body)
            .map(|d| d.status)
            .map_err(|e| TransportError::Api(format!("unexpected devbox status answer: {e}")))
    }

    pub async fn create_ssh_key(&self, id: &str) -> Result<DevboxCreds, TransportError> {
        let path = format!("/v1/devboxes/{id}/create_ssh_key");
        let body = self.call(reqwest::Method::POST, &path, id).await?;
        let k: KeyResponse = serde_json::from_str(&body)
            .map_err(|e| TransportError::Api(format!("unexpected create_ssh_key answer: {e}")))?;
        Ok(DevboxCreds {
            key_pem: k.ssh_private_key,
            url: k.url,
            ssh_user: k.ssh_user,
        })
    }
}

/// The gateway for API base `base`: `over` (`RUNLOOP_SSH_GATEWAY`, port 443 if none is given),
/// else `ssh.<domain>:443` for `https://api.<domain>`.
pub fn gateway_for(base: &str, over: Option<&str>) -> Result<String, TransportError> {
    if let Some(g) = over.filter(|g| !g.is_empty()) {
        return Ok(if g.contains(':') {
            g.to_string()
        } else {
            format!("{g}:443")
        });
    }
    let host = reqwest::Url::parse(base)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_default();
    match host.strip_prefix("api.") {
        Some(domain) => Ok(format!("ssh.{domain}:443")),
        None => Err(TransportError::Config(format!(
            "cannot derive the SSH gateway from RUNLOOP_BASE_URL={base}; set RUNLOOP_SSH_GATEWAY=host:port"
        ))),
    }
}

/// Devbox states that will not become `running` by waiting.
const DEAD_STATES: &[&str] = &["failure", "shutdown", "suspended"];

/// Polls `status` until it says `running`; gives up on a dead state or after `limit`.
pub async fn wait_running<F, Fut>(
    id: &str,
    mut status: F,
    every: Duration,
    limit: Duration,
    notice: &(dyn Fn(String) + Send + Sync),
) -> Result<(), TransportError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<String, TransportError>>,
{
    let start = tokio::time::Instant::now();
    let mut announced: Option<String> = None;
    loop {
        let s = status().await?;
        if s == "running" {
            return Ok(());
        }
        if DEAD_STATES.contains(&s.as_str()) {
            let hint = if s == "suspended" {
                " (resume it first)"
            } else {
                ""
            };
            return Err(TransportError::Api(format!("devbox {id} is {s}{hint}")));
        }
        if start.elapsed() >= limit {
            return Err(TransportError::Api(format!(
                "devbox {id} is still {s} after {}s",
                limit.as_secs()
            )));
        }
        if announced.as_deref() != Some(s.as_str()) {
            notice(format!("devbox {id} is {s}; waiting for it to be running…"));
            announced = Some(s);
        }
        tokio::time::sleep(every).await;
    }
}

/// `e` and its causes, `: `-separated (reqwest's own message rarely says what went wrong).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = c.source();
    }
    out
}

/// Why a request failed for good, if it did: the TLS layer refused the connection (a
/// certificate no configured root vouches for), or the answer was not HTTP at all.
fn permanent_failure(e: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    if e.downcast_ref::<rustls::Error>().is_some() {
        return Some("if the API uses a private CA, trust it with --tls-ca or DEVSYNC_TLS_CA");
    }
    if e.downcast_ref::<hyper::Error>()
        .is_some_and(|h| h.is_parse())
    {
        return Some(
            "the API did not answer in HTTP; if it serves TLS, use https:// in RUNLOOP_BASE_URL",
        );
    }
    // io::Error hides the error it wraps from `source()`.
    let wrapped = e
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
        .and_then(|inner| permanent_failure(inner));
    wrapped.or_else(|| e.source().and_then(permanent_failure))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn gateway_is_derived_from_the_api_host() {
        assert_eq!(
            gateway_for("https://api.runloop.ai", None).unwrap(),
            "ssh.runloop.ai:443"
        );
        assert_eq!(
            gateway_for("https://api.example.dev/", None).unwrap(),
            "ssh.example.dev:443"
        );
        assert_eq!(
            gateway_for("http://127.0.0.1:8080", Some("127.0.0.1:8443")).unwrap(),
            "127.0.0.1:8443"
        );
        assert_eq!(
            gateway_for("https://api.runloop.ai", Some("gw.local")).unwrap(),
            "gw.local:443"
        );
        let e = gateway_for("http://127.0.0.1:8080", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("RUNLOOP_SSH_GATEWAY"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn retries_back_off_then_succeed() {
        let calls = AtomicU32::new(0);
        let t0 = tokio::time::Instant::now();
        let r = with_retry(Retry::default(), || async {
            match calls.fetch_add(1, Ordering::SeqCst) {
                0..=2 => Err(Attempt::Retry("503".into())),
                _ => Ok(7),
            }
        })
        .await;
        assert_eq!(r, Ok(7));
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        assert_eq!(t0.elapsed(), Duration::from_millis(500 + 1000 + 2000));
    }

    #[tokio::test(start_paused = true)]
    async fn retries_give_up_and_fatal_stops_at_once() {
        let calls = AtomicU32::new(0);
        let r: Result<(), _> = with_retry(Retry::default(), || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(Attempt::Retry("429".into()))
        })
        .await;
        assert!(r.unwrap_err().contains("gave up after 6 attempts"));
        assert_eq!(calls.load(Ordering::SeqCst), 6);
        let calls = AtomicU32::new(0);
        let r: Result<(), _> = with_retry(Retry::default(), || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(Attempt::Fail("401".into()))
        })
        .await;
        assert_eq!(r.unwrap_err(), "401");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_connection_gets_one_quick_retry() {
        let calls = AtomicU32::new(0);
        let t0 = tokio::time::Instant::now();
        let r: Result<(), _> = with_retry(Retry::default(), || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(Attempt::Quick("connection refused".into()))
        })
        .await;
        let e = r.unwrap_err();
        assert!(e.contains("check RUNLOOP_BASE_URL"), "{e}");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(t0.elapsed(), QUICK_RETRY);
        // A service that comes back at once is fine.
        let calls = AtomicU32::new(0);
        let r = with_retry(Retry::default(), || async {
            match calls.fetch_add(1, Ordering::SeqCst) {
                0 => Err(Attempt::Quick("refused".into())),
                _ => Ok(1),
            }
        })
        .await;
        assert_eq!(r, Ok(1));
    }

    #[tokio::test]
    async fn a_refused_api_fails_within_a_second() {
        // A port nothing listens on: bind one and drop it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        crate::transport::tls::install_crypto_provider();
        let api = Api::new(
            &format!("http://127.0.0.1:{port}"),
            "k",
            &TlsPolicy::default(),
        )
        .unwrap();
        let t0 = std::time::Instant::now();
        let e = api.status("dbx_x").await.unwrap_err().to_string();
        assert!(
            e.contains("refused") && e.contains("RUNLOOP_BASE_URL"),
            "{e}"
        );
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn waits_for_running_and_names_dead_states() {
        let seq =
            Mutex::new(vec!["provisioning", "initializing", "initializing", "running"].into_iter());
        let notes = Mutex::new(Vec::new());
        let t0 = tokio::time::Instant::now();
        wait_running(
            "dbx_x",
            || async { Ok(seq.lock().unwrap().next().unwrap().to_string()) },
            Duration::from_secs(3),
            Duration::from_secs(180),
            &|m| notes.lock().unwrap().push(m),
        )
        .await
        .unwrap();
        assert_eq!(t0.elapsed(), Duration::from_secs(9));
        assert_eq!(notes.lock().unwrap().len(), 2, "one message per state");
        for dead in ["failure", "shutdown", "suspended"] {
            let e = wait_running(
                "dbx_x",
                || async { Ok(dead.to_string()) },
                Duration::from_secs(3),
                Duration::from_secs(180),
                &|_| {},
            )
            .await
            .unwrap_err();
            assert!(e.to_string().contains(dead), "{e}");
        }
        let e = wait_running(
            "dbx_x",
            || async { Ok("provisioning".to_string()) },
            Duration::from_secs(3),
            Duration::from_secs(180),
            &|_| {},
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("after 180s"), "{e}");
    }
}
