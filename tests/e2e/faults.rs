//! Fault injection: pushes and pulls killed at random points (chosen by how many bytes the
//! victim has moved, not by time) — the client, the helper, or the server in the middle
//! (`devsync serve`, or OpenSSH's `sshd`). After each kill every file at a final path must be
//! a version the source had (old or new, never a mix), and a rerun must converge to an
//! identical tree with none of devsync's temp or partial files left. Seeded; every wait
//! bounded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::common::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Two versions of a source tree: `a` (what the receiver had) and `b` (what the sender has).
struct Versions {
    a: PathBuf,
    b: PathBuf,
    snaps: [BTreeMap<PathBuf, Node>; 2],
}

fn cp_a(from: &Path, to: &Path) {
    let ok = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap()
        .success();
    assert!(ok, "cp -a {from:?} {to:?}");
}

fn versions(dir: &Path, seed: u64) -> Versions {
    let (a, b) = (dir.join("A"), dir.join("B"));
    make_tree(
        &a,
        seed,
        &TreeSpec {
            files: 50,
            max_size: 300_000,
            dirs: 8,
            links: 5,
        },
    );
    // A big file the new version edits in three places (a delta through the chunk pass).
    let big = random_bytes(12 << 20, seed);
    std::fs::write(a.join("big-edit"), &big).unwrap();
    cp_a(&a, &b);
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xb);
    let mut edited = big;
    for k in [1usize, 5, 11] {
        let at = k << 20;
        edited[at..at + 4096].fill(rng.random());
    }
    std::fs::write(b.join("big-edit"), edited).unwrap();
    // A big new file (staged in a resumable partial).
    std::fs::write(b.join("big-new"), random_bytes(33 << 20, seed ^ 1)).unwrap();
    // Edit, add and delete some of the small ones; change some modes.
    let files: Vec<PathBuf> = walkdir::WalkDir::new(&b)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file() && !e.file_name().to_string_lossy().starts_with("big"))
        .map(|e| e.into_path())
        .collect();
    for (i, f) in files.iter().enumerate() {
        match rng.random_range(0..6) {
            0 => std::fs::write(f, random_bytes(rng.random_range(0..200_000), i as u64)).unwrap(),
            1 => std::fs::remove_file(f).unwrap(),
            2 => {
                let mut d = std::fs::read(f).unwrap();
                if !d.is_empty() {
                    let at = rng.random_range(0..d.len());
                    d[at] ^= 0x5a;
                    std::fs::write(f, d).unwrap();
                }
            }
            3 => std::fs::set_permissions(f, std::os::unix::fs::PermissionsExt::from_mode(0o640))
                .unwrap(),
            _ => {}
        }
    }
    for i in 0..10 {
        std::fs::write(
            b.join(format!("added {i}")),
            random_bytes(i * 3000, 500 + i as u64),
        )
        .unwrap();
    }
    let snaps = [snapshot(&a), snapshot(&b)];
    Versions { a, b, snaps }
}

/// Every entry of `dst` (but devsync's own files) is one of the versions of its path.
fn assert_only_real_versions(dst: &Path, v: &Versions, what: &str) {
    let ours = |p: &Path| {
        devsync::engine::tempname::ours(p.file_name().unwrap().as_encoded_bytes()).is_some()
    };
    for (path, node) in snapshot_filtered(dst, &ours) {
        let known = v.snaps.iter().any(|snap| match (snap.get(&path), &node) {
            (
                Some(Node::File {
                    content_hash: x, ..
                }),
                Node::File {
                    content_hash: y, ..
                },
            ) => x == y,
            (Some(Node::Link { target: x }), Node::Link { target: y }) => x == y,
            (Some(Node::Dir { .. }), Node::Dir { .. }) => true,
            _ => false,
        });
        assert!(
            known,
            "{what}: {path:?} is no version the source ever had: {node:?}"
        );
    }
}

/// Waits for `child`, at most `limit` (a hang is a failure, not a wait).
fn wait_bounded(child: &mut Child, limit: Duration, what: &str) -> Option<i32> {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("{what}: still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Who gets killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Victim {
    Client,
    Helper,
    /// `devsync serve`, or the `sshd` serving the connection.
    Server,
}

/// The parent pid of `pid`.
fn ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// How a trial reaches its victim.
struct Rig {
    /// Where helpers of this kind of target run from (remote targets).
    helpers: Option<PathBuf>,
    /// The `devsync serve` process, if the target goes through one.
    serve: Option<u32>,
}

impl Rig {
    /// The victim's pid, once it exists (polled while the client runs).
    fn find(&self, v: Victim, client: u32) -> Option<u32> {
        match v {
            Victim::Client => Some(client),
            Victim::Server if self.serve.is_some() => self.serve,
            Victim::Helper | Victim::Server => {
                let helper = match &self.helpers {
                    None => descendants(client).first().copied(),
                    Some(dir) => crate::remote::processes_running_from(dir)
                        .first()
                        .map(|p| p.as_raw_nonzero().get() as u32),
                }?;
                if v == Victim::Helper {
                    return Some(helper);
                }
                // The topmost sshd above the helper.
                let mut top = None;
                let mut p = helper;
                while let Some(pp) = ppid(p).filter(|&pp| pp > 1) {
                    if comm(pp).starts_with("sshd") {
                        top = Some(pp);
                    }
                    p = pp;
                }
                top
            }
        }
    }
}

/// Counts of one target kind's trials.
#[derive(Debug, Default)]
struct Tally {
    trials: u32,
    kills: u32,
    /// Temp or partial files a kill left for the rerun to clean up or resume from.
    leftovers: usize,
}

/// Runs `trials` seeded fault trials against one kind of target. `sync` builds the command
/// for a direction (push: B → dst, pull: B ← remote), `victims` are the ones that exist there.
#[allow(clippy::too_many_arguments)]
fn trials(
    name: &str,
    seed: u64,
    trials: u32,
    v: &Versions,
    work: &Path,
    victims: &[Victim],
    sync: &dyn Fn(bool, &Path) -> Command,
    rig: &dyn Fn() -> Rig,
    after_kill: &dyn Fn(Victim),
) -> Tally {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut tally = Tally::default();
    // How many bytes each victim moves in a whole run: kill points are drawn below that.
    let mut budget: BTreeMap<(bool, u8), u64> = BTreeMap::new();
    for t in 0..trials {
        let pull = rng.random_bool(0.5);
        let victim = victims[rng.random_range(0..victims.len())];
        let dst = work.join(format!("{name}-{t}"));
        cp_a(&v.a, &dst);
        let key = (pull, victim as u8);
        let most = *budget.get(&key).unwrap_or(&0);
        let point = if most == 0 {
            u64::MAX // calibration: let it run, note how much it moved
        } else {
            rng.random_range(0..most)
        };
        let mut child = sync(pull, &dst)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        let r = rig();
        let mut killed = false;
        let mut seen_most = 0;
        while child.try_wait().unwrap().is_none() {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{name} trial {t} hangs"
            );
            if let Some(pid) = r.find(victim, child.id()) {
                match io_bytes(pid) {
                    Some(n) if n >= point => {
                        let _ = rustix::process::kill_process(
                            rustix::process::Pid::from_raw(pid as i32).unwrap(),
                            rustix::process::Signal::KILL,
                        ); // it may have just exited
                        killed = true;
                        break;
                    }
                    Some(n) => seen_most = seen_most.max(n),
                    None => {}
                }
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        wait_bounded(&mut child, Duration::from_secs(60), name);
        if point == u64::MAX {
            budget.insert(key, seen_most.max(1));
        }
        tally.trials += 1;
        if killed {
            tally.kills += 1;
            after_kill(victim);
        }
        let what = format!(
            "{name} trial {t} ({}, {victim:?} killed at {point} bytes)",
            if pull { "pull" } else { "push" }
        );
        assert_only_real_versions(&dst, v, &what);
        tally.leftovers += own_files(&dst).len();
        // A clean rerun converges and leaves nothing of ours behind.
        let out = sync(pull, &dst).output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{what}: rerun: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_same_tree(&v.b, &dst);
        let left = own_files(&dst);
        assert!(left.is_empty(), "{what}: left {left:?}");
        std::fs::remove_dir_all(&dst).unwrap();
    }
    eprintln!(
        "{name}: {} trials, {} kills, {} temp/partial files left by kills and cleaned or resumed by reruns",
        tally.trials, tally.kills, tally.leftovers
    );
    tally
}

#[test]
fn killed_local_syncs_never_mix_versions_and_rerun_clean() {
    let td = tempfile::tempdir().unwrap();
    let v = versions(td.path(), 8001);
    let sync = |pull: bool, dst: &Path| {
        let mut c = crate::common::bin();
        if pull {
            c.args(["pull", s(&v.b), s(dst)]);
        } else {
            c.args(["push", s(&v.b), s(dst)]);
        }
        c.arg("--delete");
        c
    };
    let t = trials(
        "local",
        1,
        40,
        &v,
        td.path(),
        &[Victim::Client, Victim::Helper],
        &sync,
        &|| Rig {
            helpers: None,
            serve: None,
        },
        &|_| {},
    );
    assert!(t.kills >= 20, "{t:?}");
}

#[test]
fn killed_devbox_syncs_through_serve_never_mix_versions_and_rerun_clean() {
    let td = tempfile::tempdir().unwrap();
    let v = versions(td.path(), 8002);
    let home = td.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let state = td.path().join("state");
    let serve = Mutex::new(ServeProc::start(&state, "dbx_f"));
    let helpers = state.join("homes/dbx_f/.cache/devsync");
    let sync = |pull: bool, dst: &Path| {
        let mut c = crate::common::bin();
        serve.lock().unwrap().env(&mut c, &home);
        if pull {
            c.args(["pull", &format!("dbx_f:{}", s(&v.b)), s(dst)]);
        } else {
            c.args(["push", s(&v.b), &format!("dbx_f:{}", s(dst))]);
        }
        c.arg("--delete");
        c
    };
    let t = trials(
        "serve",
        2,
        40,
        &v,
        td.path(),
        &[Victim::Client, Victim::Helper, Victim::Server],
        &sync,
        &|| Rig {
            helpers: Some(helpers.clone()),
            serve: Some(serve.lock().unwrap().child.id()),
        },
        &|victim| {
            if victim == Victim::Server {
                // It stays dead; a new one on the same state takes over.
                *serve.lock().unwrap() = ServeProc::start(&state, "dbx_f");
            }
        },
    );
    assert!(t.kills >= 20, "{t:?}");
}

#[test]
fn killed_syncs_over_openssh_never_mix_versions_and_rerun_clean() {
    let Some(sshd) = crate::openssh::sshd() else {
        return;
    };
    let td = tempfile::tempdir().unwrap();
    let v = versions(td.path(), 8003);
    let home = td.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let helpers = td.path().join("helpers");
    let port = sshd.addr.port();
    let sync = |pull: bool, dst: &Path| {
        let remote = |p: &Path| format!("root@127.0.0.1:{port}:{}", s(p));
        let mut c = crate::common::bin();
        c.env("HOME", &home).env_remove("SSH_AUTH_SOCK");
        if pull {
            c.args(["pull", &remote(&v.b), s(dst)]);
        } else {
            c.args(["push", s(&v.b), &remote(dst)]);
        }
        c.args([
            "-I",
            s(&sshd.client_key),
            "--remote-dir",
            s(&helpers),
            "--delete",
        ]);
        c
    };
    let t = trials(
        "openssh",
        3,
        30,
        &v,
        td.path(),
        &[Victim::Client, Victim::Helper, Victim::Server],
        &sync,
        &|| Rig {
            helpers: Some(helpers.clone()),
            serve: None,
        },
        &|_| {},
    );
    assert!(t.kills >= 15, "{t:?}");
}
