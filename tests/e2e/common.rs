//! Shared helpers: seeded tree generation, tree comparison, running the binary.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub const BIN: &str = env!("CARGO_BIN_EXE_devsync");

/// What a tree holds, for comparison: relative path → description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    File {
        content_hash: [u8; 32],
        mode: u32,
        mtime: (i64, i64),
    },
    Dir {
        mode: u32,
        mtime: (i64, i64),
    },
    Link {
        target: Vec<u8>,
    },
}

/// Snapshot of everything under `root` (not following symlinks), minus paths for which
/// `skip` is true.
pub fn snapshot_filtered(root: &Path, skip: &dyn Fn(&Path) -> bool) -> BTreeMap<PathBuf, Node> {
    let mut out = BTreeMap::new();
    for e in walkdir::WalkDir::new(root).min_depth(1).follow_links(false) {
        let e = e.unwrap();
        let rel = e.path().strip_prefix(root).unwrap().to_path_buf();
        if skip(&rel) {
            continue;
        }
        let md = e.path().symlink_metadata().unwrap();
        let mtime = (md.mtime(), md.mtime_nsec());
        let node = if md.file_type().is_symlink() {
            Node::Link {
                target: fs::read_link(e.path())
                    .unwrap()
                    .as_os_str()
                    .as_bytes()
                    .to_vec(),
            }
        } else if md.is_dir() {
            Node::Dir {
                mode: md.mode() & 0o7777,
                mtime,
            }
        } else if md.is_file() {
            Node::File {
                content_hash: *blake3::hash(&fs::read(e.path()).unwrap()).as_bytes(),
                mode: md.mode() & 0o7777,
                mtime,
            }
        } else {
            continue; // fifos etc. are never synced
        };
        out.insert(rel, node);
    }
    out
}

pub fn snapshot(root: &Path) -> BTreeMap<PathBuf, Node> {
    snapshot_filtered(root, &|_| false)
}

/// Asserts two trees are identical in content, modes, mtimes (ns), symlink targets, empty dirs,
/// and the roots' own mode and mtime.
pub fn assert_same_tree(a: &Path, b: &Path) {
    assert_same_entries(a, b);
    let root = |p: &Path| {
        let md = fs::metadata(p).unwrap();
        (md.mode() & 0o7777, md.mtime(), md.mtime_nsec())
    };
    assert_eq!(root(a), root(b), "roots {a:?} and {b:?} differ");
}

/// [`assert_same_tree`] without the roots' own attributes.
pub fn assert_same_entries(a: &Path, b: &Path) {
    let (sa, sb) = (snapshot(a), snapshot(b));
    let only_a: Vec<_> = sa.keys().filter(|k| !sb.contains_key(*k)).collect();
    let only_b: Vec<_> = sb.keys().filter(|k| !sa.contains_key(*k)).collect();
    assert!(
        only_a.is_empty() && only_b.is_empty(),
        "only in {a:?}: {only_a:?}\nonly in {b:?}: {only_b:?}"
    );
    for (k, va) in &sa {
        assert_eq!(Some(va), sb.get(k), "{k:?} differs");
    }
}

fn set_mtime(p: &Path, sec: i64, nsec: u32) {
    use rustix::fs::{AtFlags, CWD, Timespec, Timestamps, utimensat};
    let t = Timespec {
        tv_sec: sec,
        tv_nsec: nsec.into(),
    };
    utimensat(
        CWD,
        p,
        &Timestamps {
            last_access: t,
            last_modification: t,
        },
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

/// Names that exercise quoting and encoding.
const NAMES: &[&str] = &[
    "plain",
    "with space",
    "-leading-dash",
    "--double",
    "ünïcödé",
    "日本語",
    "emoji 🚀",
    ".hidden",
    "a'quote",
    "semi;colon",
    "new\nline",
    "back\\slash",
    "UPPER",
    "x.rs",
    "y.txt",
    "z.json",
];

pub struct TreeSpec {
    pub files: usize,
    pub max_size: usize,
    pub dirs: usize,
    pub links: usize,
}

/// Builds a seeded random tree: nested dirs (some empty), files of random sizes, modes and
/// nanosecond mtimes, relative and dangling symlinks, awkward names.
pub fn make_tree(root: &Path, seed: u64, spec: &TreeSpec) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    fs::create_dir_all(root).unwrap();
    let mut dirs = vec![root.to_path_buf()];
    for i in 0..spec.dirs {
        let parent = dirs[rng.random_range(0..dirs.len())].clone();
        let d = parent.join(format!("{} d{i}", NAMES[rng.random_range(0..NAMES.len())]));
        fs::create_dir_all(&d).unwrap();
        dirs.push(d);
    }
    let mut files = Vec::new();
    for i in 0..spec.files {
        let dir = &dirs[rng.random_range(0..dirs.len())];
        let p = dir.join(format!("{}{i}", NAMES[rng.random_range(0..NAMES.len())]));
        let size = match rng.random_range(0..10) {
            0 => 0,
            1..=7 => rng.random_range(1..4096),
            _ => rng.random_range(4096..spec.max_size.max(4097)),
        };
        let mut data = vec![0u8; size];
        rng.fill_bytes(&mut data);
        fs::write(&p, &data).unwrap();
        let mode = [0o644, 0o600, 0o755, 0o640, 0o444, 0o700][rng.random_range(0..6)];
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        files.push(p);
    }
    for i in 0..spec.links {
        let dir = &dirs[rng.random_range(0..dirs.len())];
        let target: PathBuf = if rng.random_bool(0.3) || files.is_empty() {
            format!("../nowhere/{i}").into()
        } else {
            pathdiff(&files[rng.random_range(0..files.len())], dir)
        };
        symlink(&target, dir.join(format!("link {i}"))).unwrap();
    }
    for f in &files {
        set_mtime(
            f,
            rng.random_range(1_000_000_000..1_800_000_000),
            rng.random_range(0..1_000_000_000),
        );
    }
    // Directory mtimes last, deepest first, with odd modes on a few.
    for d in dirs.iter().skip(1).rev() {
        if rng.random_bool(0.2) {
            fs::set_permissions(d, fs::Permissions::from_mode(0o750)).unwrap();
        }
        set_mtime(
            d,
            rng.random_range(1_000_000_000..1_800_000_000),
            rng.random_range(0..1_000_000_000),
        );
    }
}

/// A relative path from `dir` to `file`.
fn pathdiff(file: &Path, dir: &Path) -> PathBuf {
    let f: Vec<_> = file.components().collect();
    let d: Vec<_> = dir.components().collect();
    let common = f.iter().zip(&d).take_while(|(a, b)| a == b).count();
    let mut p = PathBuf::new();
    for _ in common..d.len() {
        p.push("..");
    }
    for c in &f[common..] {
        p.push(c);
    }
    p
}

/// Runs the binary with `args`, returns its output.
/// `devsync`, as tests run it: no connection is kept in the background after a session (a
/// keeper would outlive the test's server and change what later runs see); the tests of
/// kept connections turn it on.
pub fn bin() -> Command {
    let mut c = Command::new(BIN);
    c.env("DEVSYNC_KEEP_CONNECTION", "0");
    c
}

pub fn devsync(args: &[&OsStr]) -> Output {
    bin().args(args).output().expect("run devsync")
}

/// Runs a sync with `--json`, asserting the exit status; returns the parsed summary.
pub fn sync_json(
    cmd: &str,
    src: &Path,
    dst: &Path,
    extra: &[&str],
    want_code: i32,
) -> serde_json::Value {
    let mut args: Vec<&OsStr> = vec![
        OsStr::new(cmd),
        OsStr::new("--json"),
        src.as_os_str(),
        dst.as_os_str(),
    ];
    args.extend(extra.iter().map(OsStr::new));
    let out = devsync(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(want_code),
        "devsync {cmd} {extra:?}: stderr: {stderr}"
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bad json ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

pub fn num(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
}

/// A two-worker runtime, like the CLI's, for tests that drive sessions or the endpoint.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// Whether the test may go on without `what`: under `CI=true` a missing prerequisite is a
/// failure (`.ci/run` installs everything), elsewhere the test says so and skips.
pub fn require(available: bool, what: &str) -> bool {
    if available {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("missing prerequisite under CI=true: {what}");
    }
    eprintln!("skipping: needs {what} (.ci/run provides it)");
    false
}

/// Child processes of `pid`, and theirs (from /proc, so no procps is needed).
/// The pids of the devsync helpers running from `dir` (a test's own `--remote-dir`), so a
/// test kills its own helpers and no other test's.
pub fn helpers_in(dir: &Path) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| {
                let args: Vec<&[u8]> = c.split(|&b| b == 0).collect();
                args.iter().any(|a| *a == b"helper")
                    && args
                        .first()
                        .is_some_and(|a| a.starts_with(dir.as_os_str().as_encoded_bytes()))
            })
        })
        .collect()
}

pub fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let Ok(tasks) = fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.filter_map(Result::ok) {
            let children = fs::read_to_string(t.path().join("children")).unwrap_or_default();
            for c in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                out.push(c);
                todo.push(c);
            }
        }
    }
    out
}

/// Bytes a process has read and written through syscalls so far (`/proc/<pid>/io`), or
/// `None` once it is gone.
pub fn io_bytes(pid: u32) -> Option<u64> {
    let io = fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    let field = |name: &str| -> u64 {
        io.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    Some(field("rchar:") + field("wchar:"))
}

/// SIGKILLs `pid` once it has moved `bytes` bytes, at most `limit` from now. It runs in
/// bursts of a millisecond between `SIGSTOP`s and is looked at only once stopped, so it
/// cannot finish between a look and the kill (a burst this thread oversleeps still runs on,
/// which a big enough transfer makes harmless). Returns whether it was killed (`false`: it
/// ended first, or the time ran out).
pub fn kill_after_bytes(pid: u32, bytes: u64, limit: std::time::Duration) -> bool {
    use rustix::process::Signal;
    let target = rustix::process::Pid::from_raw(pid as i32).expect("pid");
    let signal = |s: Signal| rustix::process::kill_process(target, s).is_ok();
    /// Lets the process go on if this thread panics or gives up.
    struct Resume<F: Fn(Signal) -> bool>(F);
    impl<F: Fn(Signal) -> bool> Drop for Resume<F> {
        fn drop(&mut self) {
            (self.0)(Signal::CONT);
        }
    }
    let resume = Resume(signal);
    let start = std::time::Instant::now();
    if !(resume.0)(Signal::STOP) {
        return false;
    }
    while start.elapsed() < limit {
        if !all_stopped(pid) {
            std::thread::yield_now();
            continue;
        }
        match io_bytes(pid) {
            None => return false,
            Some(n) if n >= bytes => return (resume.0)(Signal::KILL),
            Some(_) => {
                (resume.0)(Signal::CONT);
                std::thread::sleep(std::time::Duration::from_millis(1));
                (resume.0)(Signal::STOP);
            }
        }
    }
    false
}

/// Whether every thread of `pid` is stopped (`T`), or it is gone (nothing runs).
fn all_stopped(pid: u32) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    tasks.filter_map(Result::ok).all(|t| {
        fs::read_to_string(t.path().join("stat")).map_or(true, |st| {
            // "tid (comm) S ...": the state follows the last ')'.
            st.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_none_or(|state| state == "T" || state == "t" || state == "Z" || state == "X")
        })
    })
}

/// Names of devsync's own temp and partial files under `root`.
pub fn own_files(root: &Path) -> Vec<PathBuf> {
    walkdir::WalkDir::new(root)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| devsync::engine::tempname::ours(e.file_name().as_bytes()).is_some())
        .map(|e| e.into_path())
        .collect()
}

/// A `devsync serve` process of its own (so it can be killed), on ports it picked.
pub struct ServeProc {
    pub child: std::process::Child,
    pub state: PathBuf,
    pub gateway: std::net::SocketAddr,
    pub api: std::net::SocketAddr,
    /// What it has logged so far.
    pub log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl ServeProc {
    pub fn start(state: &Path, devbox: &str) -> ServeProc {
        let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
        Self::start_on(state, devbox, any, any)
    }

    /// [`ServeProc::start`] on given addresses (a restart on the ports it had).
    pub fn start_on(
        state: &Path,
        devbox: &str,
        gateway: std::net::SocketAddr,
        api: std::net::SocketAddr,
    ) -> ServeProc {
        let mut child = std::process::Command::new(BIN)
            .args(["serve", "--no-isolation", "--listen", &gateway.to_string()])
            .args(["--api-listen", &api.to_string(), "--token", "test-token"])
            .args(["--domain", "devsync.test", "--devbox", devbox, "--state"])
            .arg(state)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        let addr_after = |l: &str, key: &str| -> std::net::SocketAddr {
            let rest = &l[l.find(key).unwrap() + key.len()..];
            rest.split([' ', ',']).next().unwrap().parse().unwrap()
        };
        let (gateway, api) = loop {
            line.clear();
            assert!(
                std::io::BufRead::read_line(&mut err, &mut line).unwrap() > 0,
                "serve did not start"
            );
            if line.contains("gateway on ") {
                break (
                    addr_after(&line, "gateway on "),
                    addr_after(&line, "API on http://"),
                );
            }
        };
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for l in std::io::BufRead::lines(err).map_while(Result::ok) {
                sink.lock().unwrap().push_str(&(l + "\n"));
            }
        });
        ServeProc {
            child,
            state: state.to_path_buf(),
            gateway,
            api,
            log,
        }
    }

    pub fn env(&self, c: &mut std::process::Command, home: &Path) {
        c.env("HOME", home)
            .env("RUNLOOP_BASE_URL", format!("http://{}", self.api))
            .env("RUNLOOP_SSH_GATEWAY", self.gateway.to_string())
            .env("RUNLOOP_API_KEY", "test-token")
            .env("DEVSYNC_TLS_CA", self.state.join("ca.pem"))
            .env_remove("DEVSYNC_STATE_DIR")
            .env_remove("XDG_STATE_HOME");
    }
}

impl Drop for ServeProc {
    fn drop(&mut self) {
        let _ = self.child.kill(); // ours; it may have been killed by the test already
        let _ = self.child.wait();
    }
}

/// A small tmpfs mounted at a directory (a disk that fills up), unmounted when dropped.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts one of `size` (e.g. `4m`) at the existing directory `at`; `None` if that is not
    /// allowed here (it needs root).
    pub fn mount(at: &Path, size: &str, name: &str) -> Option<Tmpfs> {
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), name])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        mounted.then(|| Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status(); // ours
    }
}

/// A filesystem of `kind` (`xfs` with reflinks, `btrfs`, `ext4`) in an image file, loop-mounted,
/// unmounted and deleted when dropped.
pub struct LoopFs {
    dir: tempfile::TempDir,
}

impl LoopFs {
    /// `None` if it cannot be made here (it needs root, `mkfs.<kind>` and loop devices).
    pub fn new(kind: &str, size: &str) -> Option<LoopFs> {
        LoopFs::with_options(kind, size, "loop")
    }

    /// The same, mounted with `opts` (which must include `loop`).
    pub fn with_options(kind: &str, size: &str, opts: &str) -> Option<LoopFs> {
        let dir = tempfile::tempdir().ok()?;
        let img = dir.path().join("fs.img");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).ok()?;
        let ok = |c: &mut std::process::Command| {
            c.stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let mkfs_args: &[&str] = match kind {
            "xfs" => &["-q", "-f", "-m", "reflink=1"],
            "ext4" => &["-q", "-F"],
            _ => &["-q", "-f"],
        };
        let made = ok(std::process::Command::new("truncate")
            .args(["-s", size])
            .arg(&img))
            && ok(std::process::Command::new(format!("mkfs.{kind}"))
                .args(mkfs_args)
                .arg(&img))
            && ok(std::process::Command::new("mount")
                .args(["-o", opts])
                .arg(&img)
                .arg(&mnt));
        made.then_some(LoopFs { dir })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }

    /// Bytes in use on it.
    pub fn used(&self) -> u64 {
        let s = rustix::fs::statvfs(self.path()).unwrap();
        (s.f_blocks - s.f_bfree) * s.f_frsize
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.path())
            .status(); // ours
    }
}
