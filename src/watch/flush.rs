//! The flush barrier: `devsync flush DIR` blocks until every change made in DIR before it was
//! called is on the remote. The watch serves it on a Unix socket in the state directory (mode
//! 0600, named after DIR's canonical path); a request is one line, `flush`, the answer one
//! JSON line: `{"ok":true,"generation":N}` or `{"ok":false,"error":"…"}`.
//!
//! Ordering comes from inotify itself: on a request the watch creates a marker file in a
//! private directory watched by the same inotify instance, so the marker's event is queued
//! after every event of changes made before the request. Once it arrives, the watch waits for
//! a generation holding everything seen up to it, then answers. A watch that is disconnected
//! answers at once with an error; the client gives up after its timeout. It never hangs.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

/// One flush request, waiting for its answer.
pub struct Request {
    pub reply: oneshot::Sender<Result<u64, String>>,
}

/// Where a watch of `root` serves flushes and keeps its markers.
pub struct Paths {
    pub socket: PathBuf,
    pub markers: PathBuf,
}

/// The socket and marker paths for a watch of `root` (canonicalized).
pub fn paths(root: &Path) -> anyhow::Result<Paths> {
    let canon = std::fs::canonicalize(root).with_context(|| format!("{}", root.display()))?;
    let dir = crate::target::credentials::state_dir()?.join("watch");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    let dir = std::fs::canonicalize(&dir)?;
    let h = blake3::hash(canon.as_os_str().as_encoded_bytes()).to_hex();
    let name = &h.as_str()[..16];
    Ok(Paths {
        socket: dir.join(format!("{name}.sock")),
        markers: dir.join(format!("{name}.markers")),
    })
}

/// Serves flush requests on `socket`, handing each to `tx`. Refuses to start if another watch
/// of the same directory is serving there.
pub async fn serve(socket: &Path, tx: mpsc::UnboundedSender<Request>) -> anyhow::Result<()> {
    if UnixStream::connect(socket).await.is_ok() {
        bail!(
            "another devsync watch of this directory is running (it serves {}); stop it first",
            socket.display()
        );
    }
    let _ = std::fs::remove_file(socket); // a stale socket of a watch that died
    let listener =
        UnixListener::bind(socket).with_context(|| format!("listening on {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                // Out of descriptors, say: not a reason to spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = answer(stream, tx).await; // a client that went away
            });
        }
    });
    Ok(())
}

async fn answer(stream: UnixStream, tx: mpsc::UnboundedSender<Request>) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let mut br = BufReader::new(tokio::io::AsyncReadExt::take(r, 64));
    let read = br.read_line(&mut line);
    if tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .is_err()
        || line.trim() != "flush"
    {
        let v = serde_json::json!({"ok": false, "error": "expected `flush`"});
        return w.write_all(format!("{v}\n").as_bytes()).await;
    }
    let (reply, rx) = oneshot::channel();
    let v = if tx.send(Request { reply }).is_err() {
        serde_json::json!({"ok": false, "error": "the watch is shutting down"})
    } else {
        match rx.await {
            Ok(Ok(generation)) => serde_json::json!({"ok": true, "generation": generation}),
            Ok(Err(e)) => serde_json::json!({"ok": false, "error": e}),
            Err(_) => serde_json::json!({"ok": false, "error": "the watch is shutting down"}),
        }
    };
    w.write_all(format!("{v}\n").as_bytes()).await
}

/// `devsync flush DIR`: asks the watch of `dir` and waits (at most `timeout`) for its answer.
pub async fn request(dir: &Path, timeout: Duration) -> anyhow::Result<u64> {
    let p = paths(dir)?;
    let no_watch = || {
        anyhow::anyhow!(
            "no devsync watch is running for {} (start one with `devsync watch {} TARGET`)",
            dir.display(),
            dir.display()
        )
    };
    if !p.socket.exists() {
        return Err(no_watch());
    }
    let mut s = match tokio::time::timeout(timeout, UnixStream::connect(&p.socket)).await {
        Ok(Ok(s)) => s,
        Ok(Err(_)) => return Err(no_watch()),
        Err(_) => bail!(
            "the watch of {} did not answer within {} s",
            dir.display(),
            timeout.as_secs()
        ),
    };
    s.write_all(b"flush\n").await?;
    let mut line = String::new();
    let mut r = BufReader::new(s);
    match tokio::time::timeout(timeout, r.read_line(&mut line)).await {
        Ok(Ok(n)) if n > 0 => {}
        Ok(_) => bail!(
            "the watch of {} closed the connection without answering",
            dir.display()
        ),
        Err(_) => bail!(
            "timed out after {} s waiting for the watch of {} to sync (is the link slow, or \
             the watch stuck reconnecting?)",
            timeout.as_secs(),
            dir.display()
        ),
    }
    let v: serde_json::Value =
        serde_json::from_str(line.trim()).context("the watch answered something unexpected")?;
    if v["ok"] == serde_json::Value::Bool(true) {
        Ok(v["generation"].as_u64().unwrap_or(0))
    } else {
        bail!(
            "the watch of {} could not flush: {}",
            dir.display(),
            v["error"].as_str().unwrap_or("unknown error")
        )
    }
}
