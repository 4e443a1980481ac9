//! A helper on this machine: `devsync helper` as a child process talking over its stdin and
//! stdout, like rsync's local mode. Its stderr is captured and shown if something fails.

use std::path::PathBuf;
use std::process::Stdio;

use tokio::io::AsyncReadExt;
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::task::JoinHandle;

pub struct LocalHelper {
    pub child: Child,
    pub stdin: ChildStdin,
    pub stdout: ChildStdout,
    stderr: JoinHandle<Vec<u8>>,
}

/// The binary to run as helper: `$DEVSYNC_HELPER_BIN`, else this executable.
pub fn helper_binary() -> std::io::Result<PathBuf> {
    match std::env::var_os("DEVSYNC_HELPER_BIN") {
        Some(p) => Ok(PathBuf::from(p)),
        None => std::env::current_exe(),
    }
}

impl LocalHelper {
    pub fn spawn() -> std::io::Result<LocalHelper> {
        let bin = helper_binary()?;
        let mut cmd = Command::new(&bin);
        if crate::trace::enabled() {
            cmd.env("DEVSYNC_TRACE", "1"); // -v traces both ends
        }
        let mut child = cmd
            .arg("helper")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            // Traces are for a human watching; otherwise keep stderr to show on failure.
            .stderr(if crate::trace::enabled() {
                Stdio::inherit()
            } else {
                Stdio::piped()
            })
            .spawn()
            .map_err(|e| {
                std::io::Error::new(e.kind(), format!("starting {}: {e}", bin.display()))
            })?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(std::io::Error::other("child pipes missing"));
        };
        let mut err = child.stderr.take();
        let stderr = tokio::spawn(async move {
            let mut buf = Vec::new();
            if let Some(err) = &mut err {
                // Bounded: a misbehaving helper must not eat memory.
                let _ = err.take(1 << 20).read_to_end(&mut buf).await;
            }
            buf
        });
        Ok(LocalHelper {
            child,
            stdin,
            stdout,
            stderr,
        })
    }
}

/// Waits for a helper's exit; returns its status and whatever it wrote to stderr.
pub async fn finish(mut child: Child, stderr: JoinHandle<Vec<u8>>) -> (Option<i32>, String) {
    let status = child.wait().await.ok().and_then(|s| s.code());
    let err = stderr.await.unwrap_or_default();
    (status, String::from_utf8_lossy(&err).trim().to_string())
}

impl LocalHelper {
    /// Splits into the streams and a handle to wait for the process.
    pub fn into_parts(self) -> (ChildStdout, ChildStdin, (Child, JoinHandle<Vec<u8>>)) {
        (self.stdout, self.stdin, (self.child, self.stderr))
    }
}
