//! The embedded endpoint's persistent state: its SSH host key, its TLS CA, its API token and
//! the devboxes it serves (each with its own P-256 key pair, login user, status and home
//! directory). Everything lives in one state directory (mode 0700) and survives restarts.

use std::collections::HashMap;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use russh::keys::{PrivateKey, PublicKey};
use serde::{Deserialize, Serialize};

/// Statuses a devbox can be in (the hosted service's vocabulary).
pub const STATUSES: &[&str] = &[
    "provisioning",
    "initializing",
    "running",
    "suspending",
    "suspended",
    "resuming",
    "failure",
    "shutdown",
];

/// How devbox private keys are handed out by the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyFormat {
    /// `BEGIN PRIVATE KEY`
    #[default]
    Pkcs8,
    /// `BEGIN OPENSSH PRIVATE KEY`
    OpenSsh,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct DevboxFile {
    user: String,
    status: String,
}

/// One devbox served here.
#[derive(Debug)]
pub struct Devbox {
    pub id: String,
    pub user: String,
    /// The key clients must authenticate with.
    pub public_key: PublicKey,
    /// Its private half, as the API hands it out.
    pub key_pem: String,
    /// Home directory for exec and SFTP (`HOME`, working directory).
    pub home: PathBuf,
    status: Mutex<String>,
    dir: PathBuf,
}

impl Devbox {
    pub fn status(&self) -> String {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

pub struct State {
    pub dir: PathBuf,
    pub domain: String,
    pub token: String,
    pub host_key: PrivateKey,
    ca_key: KeyPair,
    default_user: String,
    create_on_demand: bool,
    key_format: KeyFormat,
    devboxes: Mutex<HashMap<String, Arc<Devbox>>>,
}

#[derive(Debug, thiserror::Error)]
#[error("state directory {dir}: {msg}")]
pub struct StateError {
    pub dir: String,
    pub msg: String,
}

/// What a state directory is opened with.
#[derive(Debug, Clone)]
pub struct StateOptions {
    pub dir: PathBuf,
    pub domain: String,
    /// API bearer token; `None`: the stored one, or a new random one.
    pub token: Option<String>,
    pub default_user: String,
    pub create_on_demand: bool,
    pub key_format: KeyFormat,
    /// Devboxes that must exist (created if missing).
    pub devboxes: Vec<String>,
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    let _ = rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty()); // fills or errors on ancient kernels
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn valid_id(id: &str) -> bool {
    id.len() <= 128
        && id.starts_with("dbx_")
        && id.len() > 4
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

impl State {
    pub fn open(o: &StateOptions) -> Result<State, StateError> {
        let err = |msg: String| StateError {
            dir: o.dir.display().to_string(),
            msg,
        };
        std::fs::create_dir_all(o.dir.join("devboxes")).map_err(|e| err(e.to_string()))?;
        let _ = std::fs::set_permissions(&o.dir, std::fs::Permissions::from_mode(0o700)); // best effort
        let host_pem = read_or_create(&o.dir.join("host_key.pem"), p256_pem).map_err(err)?;
        let host_key =
            russh::keys::decode_secret_key(&host_pem, None).map_err(|e| err(e.to_string()))?;
        let ca_pem = read_or_create(&o.dir.join("ca-key.pem"), p256_pem).map_err(err)?;
        let ca_key = KeyPair::from_pem(&ca_pem).map_err(|e| err(e.to_string()))?;
        let token = match &o.token {
            Some(t) => t.clone(),
            None => read_or_create(&o.dir.join("token"), || Ok(random_hex(24)))
                .map_err(err)?
                .trim()
                .to_string(),
        };
        let state = State {
            dir: o.dir.clone(),
            domain: o.domain.trim_matches('.').to_string(),
            token,
            host_key,
            ca_key,
            default_user: o.default_user.clone(),
            create_on_demand: o.create_on_demand,
            key_format: o.key_format,
            devboxes: Mutex::new(HashMap::new()),
        };
        // CA certificate for clients: written once, so copies handed to clients stay identical
        // (the issuer of gateway certificates is rebuilt from the same key and name).
        if !state.ca_path().exists() {
            let ca = state
                .ca_params()
                .self_signed(&state.ca_key)
                .map_err(|e| err(e.to_string()))?;
            std::fs::write(state.ca_path(), ca.pem()).map_err(|e| err(e.to_string()))?;
        }
        state.load_devboxes().map_err(err)?;
        for id in &o.devboxes {
            if state.devbox(id).is_none() {
                state.create(id).map_err(err)?;
            }
        }
        Ok(state)
    }

    /// PEM file clients pass to `--tls-ca`.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    fn ca_params(&self) -> CertificateParams {
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            format!("devsync serve CA ({})", self.domain),
        );
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p
    }

    /// A gateway certificate for `names`, signed by this state's CA: (chain PEM, key PEM).
    pub fn gateway_cert(&self, names: Vec<String>) -> Result<(String, String), String> {
        let key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
        let mut params = CertificateParams::new(names).map_err(|e| e.to_string())?;
        params.distinguished_name.push(
            DnType::CommonName,
            format!("devsync gateway {}", self.domain),
        );
        let issuer = rcgen::Issuer::new(self.ca_params(), &self.ca_key);
        let cert = params.signed_by(&key, &issuer).map_err(|e| e.to_string())?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// The host name (SNI) devbox `id` is reached at.
    pub fn url(&self, id: &str) -> String {
        format!("{id}.{}", self.domain)
    }

    pub fn devbox(&self, id: &str) -> Option<Arc<Devbox>> {
        self.devboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// The devbox an SNI name routes to.
    pub fn devbox_for_sni(&self, sni: &str) -> Option<Arc<Devbox>> {
        let id = sni.strip_suffix(&format!(".{}", self.domain))?;
        self.devbox(id)
    }

    /// An existing devbox, or a new one when devboxes are created on first use.
    pub fn devbox_or_create(&self, id: &str) -> Result<Option<Arc<Devbox>>, String> {
        match self.devbox(id) {
            Some(d) => Ok(Some(d)),
            None if self.create_on_demand && valid_id(id) => self.create(id).map(Some),
            None => Ok(None),
        }
    }

    pub fn key_format(&self) -> KeyFormat {
        self.key_format
    }

    pub fn set_status(&self, id: &str, status: &str) -> Result<(), String> {
        let d = self.devbox(id).ok_or_else(|| format!("no devbox {id}"))?;
        *d.status.lock().unwrap_or_else(|p| p.into_inner()) = status.to_string();
        write_json(
            &d.dir.join("devbox.json"),
            &DevboxFile {
                user: d.user.clone(),
                status: status.to_string(),
            },
        )
    }

    fn create(&self, id: &str) -> Result<Arc<Devbox>, String> {
        if !valid_id(id) {
            return Err(format!(
                "invalid devbox id {id:?} (dbx_ followed by letters, digits, _ or -)"
            ));
        }
        let dir = self.dir.join("devboxes").join(id);
        std::fs::create_dir_all(dir.join("home")).map_err(|e| e.to_string())?;
        write_private(&dir.join("key.pem"), p256_pem()?.as_bytes())?;
        write_json(
            &dir.join("devbox.json"),
            &DevboxFile {
                user: self.default_user.clone(),
                status: "running".into(),
            },
        )?;
        let d = self.load_devbox(id)?;
        eprintln!("devsync serve: created devbox {id} (user {})", d.user);
        Ok(d)
    }

    fn load_devboxes(&self) -> Result<(), String> {
        let rd = std::fs::read_dir(self.dir.join("devboxes")).map_err(|e| e.to_string())?;
        for e in rd.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            if valid_id(&id) && e.path().join("devbox.json").exists() {
                self.load_devbox(&id)?;
            }
        }
        Ok(())
    }

    fn load_devbox(&self, id: &str) -> Result<Arc<Devbox>, String> {
        let dir = self.dir.join("devboxes").join(id);
        let meta: DevboxFile = serde_json::from_slice(
            &std::fs::read(dir.join("devbox.json")).map_err(|e| format!("{id}: {e}"))?,
        )
        .map_err(|e| format!("{id}/devbox.json: {e}"))?;
        let pem = std::fs::read_to_string(dir.join("key.pem")).map_err(|e| format!("{id}: {e}"))?;
        let key =
            russh::keys::decode_secret_key(&pem, None).map_err(|e| format!("{id}/key.pem: {e}"))?;
        let key_pem = match self.key_format {
            KeyFormat::Pkcs8 => pem,
            KeyFormat::OpenSsh => key
                .to_openssh(russh::keys::ssh_key::LineEnding::LF)
                .map_err(|e| e.to_string())?
                .to_string(),
        };
        let home = dir.join("home");
        std::fs::create_dir_all(&home).map_err(|e| e.to_string())?;
        let d = Arc::new(Devbox {
            id: id.to_string(),
            user: meta.user,
            public_key: key.public_key().clone(),
            key_pem,
            home,
            status: Mutex::new(meta.status),
            dir,
        });
        self.devboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), d.clone());
        Ok(d)
    }
}

fn p256_pem() -> Result<String, String> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map(|k| k.serialize_pem())
        .map_err(|e| e.to_string())
}

fn read_or_create(
    path: &Path,
    make: impl FnOnce() -> Result<String, String>,
) -> Result<String, String> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let s = make()?;
            write_private(path, s.as_bytes())?;
            Ok(s)
        }
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), String> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    f.write_all(data)
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<(), String> {
    let data = serde_json::to_vec_pretty(v).map_err(|e| e.to_string())?;
    write_private(path, &data)
}
