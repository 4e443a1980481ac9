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

fn home() -> Result<PathBuf, String> {
    dirs::home_dir().ok_or_else(|| "cannot find the home directory (is $HOME set?)".to_string())
}

pub fn state_dir() -> Result<PathBuf, String> {
    if let Some(d) = std::env::var_os("DEVSYNC_STATE_DIR") {
        return Ok(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d).join("devsync"));
    }
    Ok(home()?.join(".local/state/devsync"))
}

/// Pinned devbox host keys (known_hosts format).
pub fn pin_file() -> Result<PathBuf, String> {
    Ok(state_dir()?.join("known_hosts"))
}

pub fn key_path(id: &str) -> Result<PathBuf, String> {
    Ok(home()?.join(".runloop/ssh_keys").join(format!("{id}.pem")))
}

fn meta_path(id: &str) -> Result<PathBuf, String> {
    Ok(state_dir()?.join("devboxes").join(format!("{id}.json")))
}

/// Refuses private keys others can read, as OpenSSH does.
pub fn check_key_mode(path: &Path) -> Result<(), String> {
    let mode = std::fs::metadata(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(format!(
            "private key {} is accessible by others (mode {:o}); fix it with: chmod 600 {}",
            path.display(),
            mode & 0o777,
            path.display()
        ));
    }
    Ok(())
}

/// Cached credentials for devbox `id`, if both the key and devsync's note are there.
pub fn load(id: &str) -> Result<Option<DevboxCreds>, String> {
    let (kp, mp) = (key_path(id)?, meta_path(id)?);
    if !kp.exists() || !mp.exists() {
        return Ok(None);
    }
    check_key_mode(&kp)?;
    let key_pem = std::fs::read_to_string(&kp).map_err(|e| format!("{}: {e}", kp.display()))?;
    let meta = std::fs::read(&mp).map_err(|e| format!("{}: {e}", mp.display()))?;
    let Ok(mut creds) = serde_json::from_slice::<DevboxCreds>(&meta) else {
        return Ok(None); // unreadable note: fetch afresh
    };
    creds.key_pem = key_pem;
    Ok(Some(creds))
}

/// Stores credentials: the key with mode 0600 in a 0700 directory, atomically.
pub fn store(id: &str, creds: &DevboxCreds) -> Result<(), String> {
    let kp = key_path(id)?;
    write_private(&kp, creds.key_pem.as_bytes(), 0o600)?;
    let meta = serde_json::to_vec_pretty(creds).map_err(|e| e.to_string())?;
    write_private(&meta_path(id)?, &meta, 0o600)
}

fn write_private(path: &Path, data: &[u8], mode: u32) -> Result<(), String> {
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    let dir = path
        .parent()
        .ok_or_else(|| format!("{}: no parent", path.display()))?;
    std::fs::create_dir_all(dir).map_err(err)?;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)); // best effort
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
        .map_err(err)?;
    f.write_all(data).map_err(err)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(err)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(err)
}
