//! Fault injection: pushes and pulls killed at random points (chosen by how many bytes the
//! victim, or for a keeper or a server its client, has moved; not by time) — the client, the helper, the server in the middle
//! (`devsync serve`, or OpenSSH's `sshd`), or the keeper of a kept connection. After each kill every file at a final path must be
//! a version the source had (old or new, never a mix), and a rerun must converge to an
//! identical tree with none of devsync's temp or partial files left. Seeded; every wait
//! bounded.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
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

/// Every entry of `dst` (but devsync's own files) is one of the versions of its path: the
/// same content and mode as the old or the new version (a mix of the two is neither).
fn only_real_versions(dst: &Path, v: &Versions) -> Result<(), String> {
    for (path, node) in snapshot_filtered(dst, &is_ours) {
        let known = v.snaps.iter().any(|snap| match (snap.get(&path), &node) {
            (
                Some(Node::File {
                    content_hash: x,
                    mode: m,
                    ..
                }),
                Node::File {
                    content_hash: y,
                    mode: n,
                    ..
                },
            ) => x == y && m == n,
            (Some(Node::Link { target: x }), Node::Link { target: y }) => x == y,
            (Some(Node::Dir { .. }), Node::Dir { .. }) => true,
            _ => false,
        });
        if !known {
            return Err(format!(
                "{path:?} is no version the source ever had: {node:?}"
            ));
        }
    }
    Ok(())
}

fn is_ours(p: &Path) -> bool {
    devsync::engine::tempname::ours(p.file_name().unwrap().as_encoded_bytes()).is_some()
}

/// After a rerun: everything the source has is at `dst` exactly; without `--delete`, what
/// else is there is an old version (the rerun was not asked to delete it).
fn converged(dst: &Path, v: &Versions, delete: bool) -> Result<(), String> {
    let got = snapshot(dst);
    for (path, node) in &v.snaps[1] {
        match got.get(path) {
            Some(n) if n == node => {}
            other => return Err(format!("{path:?}: want {node:?}, have {other:?}")),
        }
    }
    for (path, node) in got.iter().filter(|(p, _)| !v.snaps[1].contains_key(*p)) {
        let old = v.snaps[0].get(path);
        let same_file = |a: &Node, b: &Node| match (a, b) {
            // A directory's mtime moves as its entries change: only files are compared.
            (Node::Dir { .. }, Node::Dir { .. }) => true,
            _ => a == b,
        };
        if delete || !old.is_some_and(|o| same_file(o, node)) {
            return Err(format!("{path:?} should not be there as {node:?}"));
        }
    }
    let root = |p: &Path| {
        let md = std::fs::metadata(p).unwrap();
        (md.mode() & 0o7777, md.mtime(), md.mtime_nsec())
    };
    if root(&v.b) != root(dst) {
        return Err("the root's own mode or mtime differs".into());
    }
    Ok(())
}

/// Waits for `child`, at most `limit` (a hang is a failure, not a wait).
fn wait_bounded(child: &mut Child, limit: Duration, what: &str) -> Option<i32> {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code();
        }
        if start.elapsed() > limit {
            let _ = child.kill(); // ours
            panic!("{what}: still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Runs `c` to its end within `limit`; (exit code, stderr).
fn run_bounded(mut c: Command, limit: Duration, what: &str) -> (Option<i32>, String) {
    let err = tempfile::NamedTempFile::new().unwrap();
    let mut child = c
        .stdout(Stdio::null())
        .stderr(err.reopen().unwrap())
        .spawn()
        .unwrap();
    let code = wait_bounded(&mut child, limit, what);
    (
        code,
        std::fs::read_to_string(err.path()).unwrap_or_default(),
    )
}

/// Who gets killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Victim {
    Client,
    Helper,
    /// `devsync serve`, or the `sshd` serving the connection.
    Server,
    /// The process keeping the connection between runs (kept trials only).
    Keeper,
}

/// Who there is to kill when the target is remote.
const REMOTE_VICTIMS: &[Victim] = &[
    Victim::Client,
    Victim::Helper,
    Victim::Server,
    Victim::Keeper,
];

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

/// A live `devsync __keep` whose pid file is in `dir` (a pid that was reused by another
/// process is not it).
pub fn live_keeper(dir: &Path) -> Option<u32> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".pid"))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok()?.trim().parse().ok())
        .find(|pid: &u32| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|&b| b == 0).any(|a| a == b"__keep"))
        })
}

/// The live keeper in `dir`, once one is up (bounded wait).
pub fn wait_for_keeper(dir: &Path) -> u32 {
    let t0 = Instant::now();
    loop {
        if let Some(pid) = live_keeper(dir) {
            return pid;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "no keeper came up");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How a trial reaches its victim.
struct Rig {
    /// Where helpers of this kind of target run from (remote targets).
    helpers: Option<PathBuf>,
    /// The `devsync serve` process, if the target goes through one.
    serve: Option<u32>,
    /// Where kept trials' keepers leave their pid files.
    keepers: Option<PathBuf>,
    /// Helpers that were running before the trial (a keeper's): not this run's.
    old_helpers: Vec<u32>,
}

impl Rig {
    /// The victim's pid, once it exists (polled while the client runs).
    fn find(&self, v: Victim, client: u32) -> Option<u32> {
        match v {
            Victim::Client => Some(client),
            Victim::Keeper => live_keeper(self.keepers.as_ref()?),
            Victim::Server if self.serve.is_some() => self.serve,
            Victim::Helper | Victim::Server => {
                let helper = match &self.helpers {
                    None => descendants(client).first().copied(),
                    Some(dir) => helpers_in(dir)
                        .into_iter()
                        .find(|p| !self.old_helpers.contains(p)),
                }?;
                if v == Victim::Helper {
                    return Some(helper);
                }
                // The topmost sshd above the helper (the harness runs one `sshd -i` per
                // connection, so this is the connection's own).
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

fn helpers_in(dir: &Path) -> Vec<u32> {
    crate::remote::processes_running_from(dir)
        .into_iter()
        .map(|p| p.as_raw_nonzero().get() as u32)
        .collect()
}

/// The rig for trial `t`: in a run that keeps nothing, a kept connection's helpers (from
/// earlier kept trials) are not the victim.
fn rig_for(target: &Target, t: &Trial) -> Rig {
    let mut rig = (target.rig)(t.kept);
    if let (false, Some(dir)) = (t.kept, &rig.helpers) {
        rig.old_helpers = helpers_in(dir);
    }
    rig
}

/// What one trial does.
#[derive(Debug, Clone, Copy)]
struct Trial {
    pull: bool,
    victim: Victim,
    /// Whether the killed run and its rerun pass `--delete`.
    delete: bool,
    /// Whether they go through a kept connection.
    kept: bool,
}

impl Trial {
    /// Trials that move about the same bytes share a calibration run.
    fn key(&self) -> (bool, Victim, bool) {
        (self.pull, self.victim, self.kept)
    }
}

/// One kind of target: how to run a sync, and how to reach its processes.
struct Target<'a> {
    name: &'a str,
    victims: &'a [Victim],
    /// Whether kept connections are tried (remote targets).
    kept: bool,
    /// The command for a trial (pull: B ← remote; push: B → dst).
    sync: &'a dyn Fn(&Trial, &Path) -> Command,
    /// How to reach a trial's processes (the argument: whether it is a kept trial).
    rig: &'a dyn Fn(bool) -> Rig,
    after_kill: &'a dyn Fn(Victim),
}

/// Counts of one target kind's trials.
#[derive(Debug, Default)]
struct Tally {
    trials: u32,
    kills: u32,
    /// Trials whose kill came too late (the victim had ended, or the run still succeeded).
    missed: u32,
    /// Unkilled runs that measured how many bytes each victim moves.
    calibrations: u32,
    /// Temp or partial files a kill left for the rerun to clean up or resume from.
    leftovers: usize,
    /// Kills by victim.
    by_victim: BTreeMap<String, u32>,
    failures: Vec<String>,
}

/// Runs `c` and kills `victim` once it has moved `point` bytes (`u64::MAX`: never); returns
/// whether the kill cut the run short (the signal was delivered and the run did not succeed)
/// and the most bytes the victim was seen to move. Bytes count from the victim's first
/// sighting, so a long-lived victim (serve, a keeper) is measured per trial.
fn run_and_kill(mut c: Command, t: &Trial, point: u64, rig: &Rig, what: &str) -> (bool, u64) {
    let mut child = c
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let mut base: Option<(u32, u64)> = None;
    let mut seen_most = 0;
    let mut killed = false;
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill(); // ours
            panic!("{what}: hangs");
        }
        // A keeper only relays between sockets, and socket traffic is not in /proc's I/O
        // counts (Rust uses send/recv); a server's counts include work for other sessions
        // (a keeper's spare helper). Their kill points are counted in the client's bytes,
        // which are the files read or written and nothing else.
        let clock = |pid: u32| match t.victim {
            Victim::Keeper | Victim::Server => child.id(),
            Victim::Client | Victim::Helper => pid,
        };
        if let Some(pid) = rig.find(t.victim, child.id())
            && let Some(n) = io_bytes(clock(pid))
        {
            let from = match base {
                Some((p, b)) if p == pid => b,
                _ => {
                    base = Some((pid, n));
                    n
                }
            };
            let moved = n - from.min(n);
            if moved >= point {
                // Ours; it may have just exited, and then this kill cut nothing short.
                killed = rustix::process::Pid::from_raw(pid as i32).is_some_and(|p| {
                    rustix::process::kill_process(p, rustix::process::Signal::KILL).is_ok()
                });
                break;
            }
            seen_most = seen_most.max(moved);
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    let code = wait_bounded(&mut child, Duration::from_secs(60), what);
    (killed && code != Some(0), seen_most)
}

/// Runs `n` seeded fault trials against one kind of target. Each trial copies the old tree
/// (A) to a fresh destination, syncs the new one (B) over it, kills its victim at a random
/// point below what that victim moves in a whole run, checks that only real versions are at
/// final paths, reruns, and checks the rerun converged and left nothing of ours. Failures are
/// collected, not stopped at, so one run shows them all.
fn trials(target: &Target, seed: u64, n: u32, v: &Versions, work: &Path) -> Tally {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let plan: Vec<Trial> = (0..n)
        .map(|_| {
            let kept = target.kept && rng.random_bool(0.4);
            let victims: Vec<Victim> = target
                .victims
                .iter()
                .copied()
                // With a kept connection the helper that runs is the keeper's, and a spare
                // may be started beside it; the keeper is the victim there instead.
                .filter(|&x| {
                    if kept {
                        x != Victim::Helper
                    } else {
                        x != Victim::Keeper
                    }
                })
                .collect();
            Trial {
                pull: rng.random_bool(0.5),
                victim: victims[rng.random_range(0..victims.len())],
                delete: rng.random_bool(0.5),
                kept,
            }
        })
        .collect();
    let mut tally = Tally::default();
    // Kept trials need a keeper up before they start (it comes up after a run).
    let warm = |t: &Trial, failures: &mut Vec<String>| {
        let rig = (target.rig)(t.kept);
        if !t.kept || live_keeper(rig.keepers.as_ref().unwrap()).is_some() {
            return;
        }
        let dst = work.join(format!("{}-warm", target.name));
        cp_a(&v.a, &dst);
        let (code, err) = run_bounded((target.sync)(t, &dst), Duration::from_secs(60), target.name);
        let _ = std::fs::remove_dir_all(&dst);
        if code != Some(0) {
            // An unkilled run that fails is a failure like any other (and leaves no keeper).
            return failures.push(format!(
                "{}: warm-up {t:?} exited {code:?}: {err}",
                target.name
            ));
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while live_keeper(rig.keepers.as_ref().unwrap()).is_none() {
            assert!(
                Instant::now() < deadline,
                "{}: no keeper came up",
                target.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // A first run installs the helper (megabytes no later run moves): out of the budgets.
    for kept in [false, true].into_iter().filter(|&k| !k || target.kept) {
        let t = Trial {
            pull: false,
            victim: Victim::Client,
            delete: false,
            kept,
        };
        let dst = work.join(format!("{}-prime", target.name));
        cp_a(&v.a, &dst);
        let (code, err) = run_bounded((target.sync)(&t, &dst), Duration::from_secs(60), "prime");
        assert_eq!(code, Some(0), "{}: first run: {err}", target.name);
        std::fs::remove_dir_all(&dst).unwrap();
        tally.calibrations += 1;
    }
    // How many bytes each victim moves in a whole run: kill points are drawn below that.
    let mut budget: BTreeMap<(bool, Victim, bool), u64> = BTreeMap::new();
    for t in &plan {
        if budget.contains_key(&t.key()) {
            continue;
        }
        // Twice, keeping the smaller: a long-lived victim (serve) may also be busy with
        // something else in one of them (the end of an earlier session, a spare helper).
        let mut runs = Vec::new();
        for _ in 0..2 {
            warm(t, &mut tally.failures);
            let dst = work.join(format!("{}-calibrate", target.name));
            cp_a(&v.a, &dst);
            let what = format!("{} calibration {t:?}", target.name);
            let (_, moved) = run_and_kill(
                (target.sync)(t, &dst),
                t,
                u64::MAX,
                &rig_for(target, t),
                &what,
            );
            let _ = std::fs::remove_dir_all(&dst);
            runs.push(moved);
            tally.calibrations += 1;
        }
        let most = runs.iter().copied().min().unwrap_or(0);
        eprintln!("{}: calibration {:?}: {runs:?} bytes", target.name, t.key());
        budget.insert(t.key(), most.max(1));
    }
    for (i, t) in plan.iter().enumerate() {
        warm(t, &mut tally.failures);
        let dst = work.join(format!("{}-{i}", target.name));
        cp_a(&v.a, &dst);
        // Below 75% of a whole run's bytes, so nearly every trial's kill lands mid-run (runs
        // vary, and bytes count from the victim's first sighting).
        let point = rng.random_range(0..budget[&t.key()] * 3 / 4 + 1);
        let what = format!("{} trial {i} ({t:?}, killed at {point} bytes)", target.name);
        let (killed, seen) =
            run_and_kill((target.sync)(t, &dst), t, point, &rig_for(target, t), &what);
        tally.trials += 1;
        if killed {
            tally.kills += 1;
            *tally
                .by_victim
                .entry(format!("{:?}", t.victim))
                .or_default() += 1;
            (target.after_kill)(t.victim);
        } else {
            tally.missed += 1;
            eprintln!("{what}: not cut short; it moved {seen} bytes");
        }
        let mut check = || -> Result<(), String> {
            only_real_versions(&dst, v)?;
            tally.leftovers += own_files(&dst).len();
            // A rerun converges and leaves nothing of ours behind, --delete or not.
            let (code, err) = run_bounded(
                (target.sync)(t, &dst),
                Duration::from_secs(60),
                &format!("{what}: rerun"),
            );
            if code != Some(0) {
                return Err(format!("rerun exited {code:?}: {err}"));
            }
            converged(&dst, v, t.delete)?;
            let left = own_files(&dst);
            if !left.is_empty() {
                return Err(format!("the rerun left {left:?}"));
            }
            Ok(())
        };
        if let Err(e) = check() {
            tally.failures.push(format!("{what}: {e}"));
        }
        // A helper orphaned by the kill may still be ending in there; the next trial has its
        // own directory anyway.
        let _ = std::fs::remove_dir_all(&dst);
    }
    eprintln!(
        "{}: {} trials, {} kills {:?}, {} kills too late, {} calibration runs, {} temp/partial files left by kills and cleaned or resumed by reruns, {} failures",
        target.name,
        tally.trials,
        tally.kills,
        tally.by_victim,
        tally.missed,
        tally.calibrations,
        tally.leftovers,
        tally.failures.len()
    );
    for f in &tally.failures {
        eprintln!("  {f}");
    }
    tally
}

/// The trials went as they must: no failure, and (nearly) every trial's kill cut it short.
fn assert_tally(t: &Tally, n: u32) {
    assert!(
        t.failures.is_empty(),
        "{} failures: {:#?}",
        t.failures.len(),
        t.failures
    );
    assert_eq!(t.trials, n);
    assert!(t.kills * 10 >= n * 9, "too few kills landed: {t:?}");
}

#[test]
fn killed_local_syncs_never_mix_versions_and_rerun_clean() {
    let td = tempfile::tempdir().unwrap();
    let v = versions(td.path(), 8001);
    let sync = |t: &Trial, dst: &Path| {
        let mut c = crate::common::bin();
        if t.pull {
            c.args(["pull", s(&v.b), s(dst)]);
        } else {
            c.args(["push", s(&v.b), s(dst)]);
        }
        if t.delete {
            c.arg("--delete");
        }
        c
    };
    let target = Target {
        name: "local",
        victims: &[Victim::Client, Victim::Helper],
        kept: false,
        sync: &sync,
        rig: &|_| Rig {
            helpers: None,
            serve: None,
            keepers: None,
            old_helpers: vec![],
        },
        after_kill: &|_| {},
    };
    assert_tally(&trials(&target, 1, 40, &v, td.path()), 40);
}

/// The environment of a kept trial (or of one that keeps nothing).
fn keep_env(c: &mut Command, home: &Path, kept: bool) {
    c.env("HOME", home)
        .env_remove("DEVSYNC_STATE_DIR")
        .env_remove("XDG_STATE_HOME")
        .env("DEVSYNC_KEEP_CONNECTION", if kept { "60" } else { "0" });
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
    let kept_helpers = td.path().join("kept-helpers");
    let sync = |t: &Trial, dst: &Path| {
        let mut c = crate::common::bin();
        serve.lock().unwrap().env(&mut c, &home);
        keep_env(&mut c, &home, t.kept);
        if t.pull {
            c.args(["pull", &format!("dbx_f:{}", s(&v.b)), s(dst)]);
        } else {
            c.args(["push", s(&v.b), &format!("dbx_f:{}", s(dst))]);
        }
        if t.delete {
            c.arg("--delete");
        }
        if t.kept {
            // Kept trials' helpers run from their own place, so a keeper's spare helper is
            // never taken for another trial's.
            c.args(["--remote-dir", s(&kept_helpers)]);
        }
        c
    };
    let keepers = home.join(".local/state/devsync/kept");
    let target = Target {
        name: "serve",
        victims: REMOTE_VICTIMS,
        kept: true,
        sync: &sync,
        rig: &|kept| Rig {
            helpers: Some(if kept { &kept_helpers } else { &helpers }.clone()),
            serve: Some(serve.lock().unwrap().child.id()),
            keepers: Some(keepers.clone()),
            old_helpers: vec![],
        },
        after_kill: &|victim| {
            if victim == Victim::Server {
                // It stays dead; a new one on the same state takes over.
                *serve.lock().unwrap() = ServeProc::start(&state, "dbx_f");
            }
        },
    };
    let tally = trials(&target, 2, 40, &v, td.path());
    stop_keeper(&keepers);
    assert_tally(&tally, 40);
}

/// Ends the keeper a test's kept trials left (it would go by itself once idle).
pub fn stop_keeper(dir: &Path) {
    if let Some(pid) = live_keeper(dir)
        && let Some(p) = rustix::process::Pid::from_raw(pid as i32)
    {
        let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL); // ours
    }
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
    let kept_helpers = td.path().join("kept-helpers");
    let port = sshd.addr.port();
    let sync = |t: &Trial, dst: &Path| {
        let remote = |p: &Path| format!("root@127.0.0.1:{port}:{}", s(p));
        let mut c = crate::common::bin();
        keep_env(&mut c, &home, t.kept);
        c.env_remove("SSH_AUTH_SOCK");
        if t.pull {
            c.args(["pull", &remote(&v.b), s(dst)]);
        } else {
            c.args(["push", s(&v.b), &remote(dst)]);
        }
        // Kept trials' helpers run from their own place (as for serve).
        let dir = if t.kept { &kept_helpers } else { &helpers };
        c.args(["-I", s(&sshd.client_key), "--remote-dir", s(dir)]);
        if t.delete {
            c.arg("--delete");
        }
        c
    };
    let keepers = home.join(".local/state/devsync/kept");
    let target = Target {
        name: "openssh",
        victims: REMOTE_VICTIMS,
        kept: true,
        sync: &sync,
        rig: &|kept| Rig {
            helpers: Some(if kept { &kept_helpers } else { &helpers }.clone()),
            serve: None,
            keepers: Some(keepers.clone()),
            old_helpers: vec![],
        },
        after_kill: &|_| {},
    };
    let tally = trials(&target, 3, 35, &v, td.path());
    stop_keeper(&keepers);
    assert_tally(&tally, 35);
}
