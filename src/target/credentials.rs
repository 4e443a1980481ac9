//! Where devsync keeps what it learns about remotes, and the devbox key cache.
//!
//! Devbox keys are cached at `~/.runloop/ssh_keys/<id>.pem` (mode 0600), the same place the
//! official CLI uses, so either tool reuses the other's key. devsync's own state (the host
//! and user a devbox is reached as, pinned host keys) lives under `$DEVSYNC_STATE_DIR`, else
//! `$XDG_STATE_HOME/devsync`, else `~/.local/state/devsync`. Files only; no sockets.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What connecting to a devbox needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevboxCreds {
    /// PEM private key (SEC1, PKCS#8 or OpenSSH).
    #[serde(skip)]
    pub key_pem: String,
    /// Host name the gateway routes on (TLS SNI).
    pub url: String,
    /// Linux user to log in as.
    pub ssh_user: String,
}

/// What went wrong with devsync's own files about remotes.
#[derive(Debug, thiserror::Error)]
pub enum CredError {
    #[error("cannot find the home directory (is $HOME set?)")]
    NoHome,
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "private key {path} is accessible by others (mode {mode:o}); fix it with: chmod 600 {path}"
    )]
    KeyMode { path: String, mode: u32 },
    #[error("{path}: {source}")]
    Json {
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CredError + '_ {
    move |source| CredError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn home() -> Result<PathBuf, CredError> {
    dirs::home_dir().ok_or(CredError::NoHome)
}

pub fn state_dir() -> Result<PathBuf, CredError> {
    if let Some(d) = std::env::var_os("DEVSYNC_STATE_DIR") {
        return Ok(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d).join("devsync"));
    }
    Ok(home()?.join(".local/state/devsync"))
}

/// The name under which state kept per host (kept connections, what was learned about the
/// link) is filed: 16 hex digits of the endpoint's hash, the same for every such file.
pub fn endpoint_key(endpoint: &str) -> String {
    blake3::hash(endpoint.as_bytes()).to_hex()[..16].to_string()
}

/// A directory of small records kept per key (a host, a pair of trees) under the state
/// directory: `kind` names it.
pub fn records(kind: &str) -> Option<PathBuf> {
    state_dir().ok().map(|d| d.join(kind))
}

/// The record filed under `key` in `dir`, if there is one that can be read.
pub fn read_record(dir: &Path, key: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(endpoint_key(key))).ok()
}

/// Files `text` under `key` in `dir`, replacing what was there in one step. Records are
/// hints: one that cannot be written is not worth an error.
pub fn write_record(dir: &Path, key: &str, text: &str) {
    let _ = write_private(&dir.join(endpoint_key(key)), text.as_bytes(), 0o600);
}

/// Pinned devbox host keys (known_hosts format).
pub fn pin_file() -> Result<PathBuf, CredError> {
    Ok(state_dir()?.join("known_hosts"))
}

pub fn key_path(id: &str) -> Result<PathBuf, CredError> {
    Ok(home()?.join(".runloop/ssh_keys").join(format!("{id}.pem")))
}

fn meta_path(id: &str) -> Result<PathBuf, CredError> {
    Ok(state_dir()?.join("devboxes").join(format!("{id}.json")))
}

/// Refuses private keys others can read, as OpenSSH does.
pub fn check_key_mode(path: &Path) -> Result<(), CredError> {
    let mode = std::fs::metadata(path)
        .map_err(io_err(path))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(CredError::KeyMode {
            path: path.display().to_string(),
            mode: mode & 0o777,
        });
    }
    Ok(())
}

/// Cached credentials for devbox `id`, if both the key and devsync's note are there.
pub fn load(id: &str) -> Result<Option<DevboxCreds>, CredError> {
    let (kp, mp) = (key_path(id)?, meta_path(id)?);
    if !kp.exists() || !mp.exists() {
        return Ok(None);
    }
    check_key_mode(&kp)?;
    let key_pem = std::fs::read_to_string(&kp).map_err(io_err(&kp))?;
    let meta = std::fs::read(&mp).map_err(io_err(&mp))?;
    let Ok(mut creds) = serde_json::from_slice::<DevboxCreds>(&meta) else {
        return Ok(None); // unreadable note: fetch afresh
    };
    creds.key_pem = key_pem;
    Ok(Some(creds))
}

/// Stores credentials: the key with mode 0600 in a 0700 directory, atomically.
pub fn store(id: &str, creds: &DevboxCreds) -> Result<(), CredError> {
    let kp = key_path(id)?;
    write_private(&kp, creds.key_pem.as_bytes(), 0o600)?;
    let mp = meta_path(id)?;
    let meta = serde_json::to_vec_pretty(creds).map_err(|source| CredError::Json {
        path: mp.display().to_string(),
        source,
    })?;
    write_private(&mp, &meta, 0o600)
}

/// Writes `data` to `path` atomically with `mode`, in a directory only we can enter.
pub fn write_private(path: &Path, data: &[u8], mode: u32) -> Result<(), CredError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    private_dir(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("x"),
        std::process::id()
    ));
    let mut f = std::fs::File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    let written = f
        .write_all(data)
        .and_then(|()| f.set_permissions(std::fs::Permissions::from_mode(mode)));
    drop(f);
    written
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(io_err(path))
}

/// Creates `dir` (with parents) and makes it 0700, whatever the umask. devsync's own state
/// holds keys and pins: only its owner may look in.
pub fn private_dir(dir: &Path) -> Result<(), CredError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io_err(dir))
}
