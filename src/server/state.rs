//! The embedded endpoint's persistent state: its SSH host key, its TLS CA, its API token and
//! the devboxes it serves (each with its own P-256 key pair, login user, status, home directory
//! and, when devboxes are isolated, Unix user). Everything lives in one state directory and
//! survives restarts.
//!
//! Layout: keys, token and CA in the state directory itself and in `devboxes/<id>/` (mode 0700
//! directories, 0600 files, whatever the umask); homes in `homes/<id>/`, each owned by its
//! devbox's user and 0700. When devboxes run as their own users the state directory is 0711
//! (others may pass through it to reach their home, but list and read nothing).

use std::collections::HashMap;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use russh::keys::{PrivateKey, PublicKey};
use serde::{Deserialize, Serialize};

use super::log;

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
    /// The Unix user its processes run as (allocated when devboxes are isolated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    uid: Option<u32>,
}

/// Whose rights a devbox's sessions have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Isolation {
    /// Each devbox runs as its own Unix user: uids allocated from `base` (no accounts needed),
    /// or the accounts `accounts` maps devbox ids to. Needs root.
    Users {
        base: u32,
        accounts: HashMap<String, String>,
    },
    /// Sessions run as the endpoint's own user, which therefore serves one devbox only.
    SharedUser,
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
    /// `(uid, gid)` its processes run as; `None`: the endpoint's own.
    pub ids: Option<(u32, u32)>,
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
    isolation: Isolation,
    devboxes: Mutex<HashMap<String, Arc<Devbox>>>,
    /// Serializes creating devboxes (uid allocation, the one-devbox rule, their files).
    creating: Mutex<()>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state directory {dir}: {msg}")]
    Dir { dir: String, msg: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("generating {what}: {msg}")]
    Generate { what: &'static str, msg: String },
    #[error(
        "cannot serve more than one devbox as one user: each could read the others' files and \
         keys. Run devsync serve as root (each devbox then runs as its own user), or run one \
         endpoint per user"
    )]
    SharedUser,
    #[error("invalid devbox id {0:?} (dbx_ followed by letters, digits, _ or -)")]
    BadId(String),
    #[error("no devbox {0}")]
    NoDevbox(String),
    #[error("--token must not be empty")]
    EmptyToken,
    #[error("devbox {id}: account {account:?} not found in /etc/passwd")]
    NoAccount { id: String, account: String },
    #[error("the uid range for devboxes is exhausted")]
    NoUid,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.display().to_string(),
        source,
    }
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
    pub isolation: Isolation,
}

/// `n` random bytes from the kernel, hex-encoded; an error rather than a weak token.
fn random_hex(n: usize) -> Result<String, StateError> {
    let mut b = vec![0u8; n];
    let mut got = 0;
    while got < n {
        let rest = b.get_mut(got..).unwrap_or_default();
        match rustix::rand::getrandom(rest, rustix::rand::GetRandomFlags::empty()) {
            Ok(k) if k > 0 => got += k,
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                return Err(StateError::Generate {
                    what: "the API token",
                    msg: format!("getrandom: {e}"),
                });
            }
        }
    }
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Creates `dir` (and missing parents) and sets its mode, whatever the umask.
fn private_dir(dir: &Path, mode: u32) -> Result<(), StateError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).map_err(io_err(dir))
}

/// Ids the system already uses: accounts and groups, and the ranges handed to users for their
/// own user namespaces (`/etc/subuid`, `/etc/subgid`) — a devbox given one of those could be
/// entered by that user's rootless containers.
struct SystemIds {
    ids: std::collections::HashSet<u32>,
    ranges: Vec<(u32, u32)>,
}

impl SystemIds {
    fn read() -> SystemIds {
        let text = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let mut ids = std::collections::HashSet::new();
        for (file, field) in [("/etc/passwd", 2), ("/etc/group", 2)] {
            for line in text(file).lines() {
                if let Some(id) = line.split(':').nth(field).and_then(|f| f.parse().ok()) {
                    ids.insert(id);
                }
            }
        }
        if let Some(gids) = text("/etc/passwd")
            .lines()
            .map(|l| l.split(':').nth(3).and_then(|f| f.parse::<u32>().ok()))
            .collect::<Option<Vec<u32>>>()
        {
            ids.extend(gids);
        }
        let mut ranges = Vec::new();
        for file in ["/etc/subuid", "/etc/subgid"] {
            for line in text(file).lines() {
                let mut f = line.split(':').skip(1);
                if let (Some(Ok(start)), Some(Ok(count))) = (
                    f.next().map(str::parse::<u32>),
                    f.next().map(str::parse::<u32>),
                ) {
                    ranges.push((start, start.saturating_add(count)));
                }
            }
        }
        SystemIds { ids, ranges }
    }

    fn taken(&self, id: u32) -> bool {
        self.ids.contains(&id) || self.ranges.iter().any(|&(a, b)| (a..b).contains(&id))
    }
}

/// uid and primary gid of `account` from /etc/passwd.
fn lookup_account(account: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        if f.next()? != account {
            return None;
        }
        let _pw = f.next()?;
        Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
    })
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
        let dir_err = |msg: String| StateError::Dir {
            dir: o.dir.display().to_string(),
            msg,
        };
        // A blank token would let anyone send `Bearer ` and whitespace through.
        if o.token.as_deref().is_some_and(|t| t.trim().is_empty()) {
            return Err(StateError::EmptyToken);
        }
        let users = matches!(o.isolation, Isolation::Users { .. });
        // Devbox users pass through the state directory to their homes; nothing in it is
        // readable by them.
        private_dir(&o.dir, if users { 0o711 } else { 0o700 })?;
        private_dir(&o.dir.join("devboxes"), 0o700)?;
        private_dir(&o.dir.join("homes"), if users { 0o711 } else { 0o700 })?;
        let host_pem = read_or_create(&o.dir.join("host_key.pem"), p256_pem)?;
        let host_key = russh::keys::decode_secret_key(&host_pem, None)
            .map_err(|e| dir_err(format!("host_key.pem: {e}")))?;
        let ca_pem = read_or_create(&o.dir.join("ca-key.pem"), p256_pem)?;
        let ca_key = KeyPair::from_pem(&ca_pem).map_err(|e| dir_err(format!("ca-key.pem: {e}")))?;
        let token = match &o.token {
            Some(t) => t.clone(),
            None => read_or_create(&o.dir.join("token"), || random_hex(24))?
                .trim()
                .to_string(),
        };
        if token.is_empty() {
            return Err(StateError::EmptyToken);
        }
        let state = State {
            dir: o.dir.clone(),
            domain: o.domain.trim_matches('.').to_string(),
            token,
            host_key,
            ca_key,
            default_user: o.default_user.clone(),
            create_on_demand: o.create_on_demand,
            key_format: o.key_format,
            isolation: o.isolation.clone(),
            devboxes: Mutex::new(HashMap::new()),
            creating: Mutex::new(()),
        };
        // CA certificate for clients: written once, so copies handed to clients stay identical
        // (the issuer of gateway certificates is rebuilt from the same key and name).
        if !state.ca_path().exists() {
            let ca =
                state
                    .ca_params()
                    .self_signed(&state.ca_key)
                    .map_err(|e| StateError::Generate {
                        what: "the CA certificate",
                        msg: e.to_string(),
                    })?;
            write_file(&state.ca_path(), ca.pem().as_bytes(), 0o644)?;
        }
        state.load_devboxes()?;
        for id in &o.devboxes {
            if state.devbox(id).is_none() {
                state.create(id)?;
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
    pub fn gateway_cert(&self, names: Vec<String>) -> Result<(String, String), StateError> {
        let gen_err = |e: rcgen::Error| StateError::Generate {
            what: "the gateway certificate",
            msg: e.to_string(),
        };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
        let mut params = CertificateParams::new(names).map_err(gen_err)?;
        params.distinguished_name.push(
            DnType::CommonName,
            format!("devsync gateway {}", self.domain),
        );
        let issuer = rcgen::Issuer::new(self.ca_params(), &self.ca_key);
        let cert = params.signed_by(&key, &issuer).map_err(gen_err)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Who devbox `d`'s processes run as, and where.
    pub fn identity(&self, d: &Devbox) -> super::process::Identity {
        super::process::Identity {
            ids: d.ids,
            user: d.user.clone(),
            home: d.home.clone(),
        }
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
    pub fn devbox_or_create(&self, id: &str) -> Result<Option<Arc<Devbox>>, StateError> {
        match self.devbox(id) {
            Some(d) => Ok(Some(d)),
            None if self.create_on_demand && valid_id(id) => self.create(id).map(Some),
            None => Ok(None),
        }
    }

    pub fn key_format(&self) -> KeyFormat {
        self.key_format
    }

    pub fn set_status(&self, id: &str, status: &str) -> Result<(), StateError> {
        let d = self
            .devbox(id)
            .ok_or_else(|| StateError::NoDevbox(id.into()))?;
        *d.status.lock().unwrap_or_else(|p| p.into_inner()) = status.to_string();
        write_json(
            &d.dir.join("devbox.json"),
            &DevboxFile {
                user: d.user.clone(),
                status: status.to_string(),
                uid: d.ids.map(|(u, _)| u).filter(|_| self.allocates()),
            },
        )
    }

    /// Whether uids are allocated (rather than none, or mapped accounts).
    fn allocates(&self) -> bool {
        matches!(self.isolation, Isolation::Users { .. })
    }

    fn create(&self, id: &str) -> Result<Arc<Devbox>, StateError> {
        if !valid_id(id) {
            return Err(StateError::BadId(id.into()));
        }
        let _one_at_a_time = self.creating.lock().unwrap_or_else(|p| p.into_inner());
        // Two requests for the same new devbox: the second finds the first's.
        if let Some(d) = self.devbox(id) {
            return Ok(d);
        }
        let count = self
            .devboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len();
        if self.isolation == Isolation::SharedUser && count >= 1 {
            return Err(StateError::SharedUser);
        }
        let uid = match &self.isolation {
            Isolation::Users { base, .. } => Some(self.next_uid(*base)?),
            Isolation::SharedUser => None,
        };
        let dir = self.dir.join("devboxes").join(id);
        private_dir(&dir, 0o700)?;
        write_file(&dir.join("key.pem"), p256_pem()?.as_bytes(), 0o600)?;
        write_json(
            &dir.join("devbox.json"),
            &DevboxFile {
                user: self.default_user.clone(),
                status: "running".into(),
                uid,
            },
        )?;
        let d = self.load_devbox(id)?;
        log(&format!(
            "created devbox {id} (user {}{})",
            d.user,
            d.ids.map_or(String::new(), |(u, _)| format!(", uid {u}"))
        ));
        Ok(d)
    }

    /// The lowest uid from `base` no devbox has.
    fn next_uid(&self, base: u32) -> Result<u32, StateError> {
        let taken: std::collections::HashSet<u32> = self
            .devboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter_map(|d| d.ids.map(|(u, _)| u))
            .collect();
        let system = SystemIds::read();
        (base..base.saturating_add(1 << 20))
            .find(|u| !taken.contains(u) && !system.taken(*u))
            .ok_or(StateError::NoUid)
    }

    fn load_devboxes(&self) -> Result<(), StateError> {
        let dir = self.dir.join("devboxes");
        let rd = std::fs::read_dir(&dir).map_err(io_err(&dir))?;
        for e in rd.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            if valid_id(&id) && e.path().join("devbox.json").exists() {
                self.load_devbox(&id)?;
            }
        }
        let n = self
            .devboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len();
        if self.isolation == Isolation::SharedUser && n > 1 {
            return Err(StateError::SharedUser);
        }
        Ok(())
    }

    fn load_devbox(&self, id: &str) -> Result<Arc<Devbox>, StateError> {
        let dir = self.dir.join("devboxes").join(id);
        let bad = |msg: String| StateError::Dir {
            dir: dir.display().to_string(),
            msg,
        };
        let json = dir.join("devbox.json");
        let mut meta: DevboxFile =
            serde_json::from_slice(&std::fs::read(&json).map_err(io_err(&json))?)
                .map_err(|e| bad(format!("devbox.json: {e}")))?;
        let key_file = dir.join("key.pem");
        let pem = std::fs::read_to_string(&key_file).map_err(io_err(&key_file))?;
        let key =
            russh::keys::decode_secret_key(&pem, None).map_err(|e| bad(format!("key.pem: {e}")))?;
        let key_pem = match self.key_format {
            KeyFormat::Pkcs8 => pem,
            KeyFormat::OpenSsh => key
                .to_openssh(russh::keys::ssh_key::LineEnding::LF)
                .map_err(|e| bad(format!("key.pem: {e}")))?
                .to_string(),
        };
        let ids = match &self.isolation {
            Isolation::SharedUser => None,
            Isolation::Users { accounts, base } => match accounts.get(id) {
                Some(account) => {
                    Some(
                        lookup_account(account).ok_or_else(|| StateError::NoAccount {
                            id: id.into(),
                            account: account.clone(),
                        })?,
                    )
                }
                None => {
                    let uid = match meta.uid {
                        Some(u) => u,
                        None => {
                            // Made before isolation was on: give it a uid of its own now.
                            let u = self.next_uid(*base)?;
                            meta.uid = Some(u);
                            write_json(&json, &meta)?;
                            u
                        }
                    };
                    Some((uid, uid))
                }
            },
        };
        let home = self.dir.join("homes").join(id);
        // Homes of older states lived next to the keys: move them out.
        let old_home = dir.join("home");
        if old_home.is_dir() && !home.exists() {
            std::fs::rename(&old_home, &home).map_err(io_err(&old_home))?;
        }
        private_dir(&home, 0o700)?;
        if let Some((uid, gid)) = ids {
            rustix::fs::chown(
                &home,
                Some(rustix::process::Uid::from_raw(uid)),
                Some(rustix::process::Gid::from_raw(gid)),
            )
            .map_err(|e| io_err(&home)(e.into()))?;
        }
        let d = Arc::new(Devbox {
            id: id.to_string(),
            user: meta.user,
            public_key: key.public_key().clone(),
            key_pem,
            home,
            ids,
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

fn p256_pem() -> Result<String, StateError> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map(|k| k.serialize_pem())
        .map_err(|e| StateError::Generate {
            what: "a P-256 key",
            msg: e.to_string(),
        })
}

fn read_or_create(
    path: &Path,
    make: impl FnOnce() -> Result<String, StateError>,
) -> Result<String, StateError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let s = make()?;
            write_file(path, s.as_bytes(), 0o600)?;
            Ok(s)
        }
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Writes `data` to `path` atomically with `mode` (whatever the umask).
fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), StateError> {
    use std::io::Write;
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // Unique, so concurrent writers of one file never share a temp file.
    let tmp = path.with_extension(format!("tmp.{}.{n}", std::process::id()));
    let mut f = std::fs::File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(data).map_err(io_err(&tmp))?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<(), StateError> {
    let data = serde_json::to_vec_pretty(v).map_err(|e| StateError::Generate {
        what: "devbox.json",
        msg: e.to_string(),
    })?;
    write_file(path, &data, 0o600)
}
