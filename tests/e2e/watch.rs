//! `devsync watch` end to end: the real binary watching a real tree, syncing to a local
//! directory, through `devsync serve` (TLS gateway + SSH) and through OpenSSH. Every check
//! is "until identical or a time limit" (or, after `devsync flush`, identical at once: the
//! barrier's promise), never a fixed sleep.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;

/// Longest any convergence may take in these tests.
const LIMIT: Duration = Duration::from_secs(60);

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A running `devsync watch --json`, its events as they come.
pub struct Watch {
    child: Child,
    pub events: Arc<Mutex<Vec<serde_json::Value>>>,
    pub stderr: Arc<Mutex<String>>,
    src: PathBuf,
    env: Vec<(String, String)>,
}

impl Watch {
    /// Starts `devsync watch --json SRC DST extra…` with `env`, waits for its `ready` event.
    pub fn start(src: &Path, dst: &str, extra: &[&str], env: &[(String, String)]) -> Watch {
        let mut c = crate::common::bin();
        c.args(["watch", "--json", s(src), dst])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_remove("SSH_AUTH_SOCK");
        for (k, v) in env {
            c.env(k, v);
        }
        let mut child = c.spawn().unwrap();
        let events = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let (out, err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let ev = events.clone();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let v: serde_json::Value = serde_json::from_str(&l)
                    .unwrap_or_else(|e| panic!("watch printed a non-JSON line ({e}): {l}"));
                ev.lock().unwrap().push(v);
            }
        });
        let se = stderr.clone();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                se.lock().unwrap().push_str(&(l + "\n"));
            }
        });
        let w = Watch {
            child,
            events,
            stderr,
            src: src.to_path_buf(),
            env: env.to_vec(),
        };
        w.wait_event("ready", LIMIT);
        w
    }

    fn diag(&self) -> String {
        format!(
            "events: {:#?}\nstderr: {}",
            self.events.lock().unwrap(),
            self.stderr.lock().unwrap()
        )
    }

    /// Waits for an event named `name` (any so far counts); returns it.
    pub fn wait_event(&self, name: &str, limit: Duration) -> serde_json::Value {
        let t0 = Instant::now();
        loop {
            if let Some(v) = self
                .events
                .lock()
                .unwrap()
                .iter()
                .find(|v| v["event"] == name)
            {
                return v.clone();
            }
            assert!(
                t0.elapsed() < limit,
                "no {name} event in {limit:?}\n{}",
                self.diag()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// `devsync flush SRC`: must succeed within `limit`.
    pub fn flush(&self) {
        let (code, err) = self.flush_result();
        assert_eq!(code, 0, "flush failed: {err}\n{}", self.diag());
    }

    pub fn flush_result(&self) -> (i32, String) {
        let mut c = crate::common::bin();
        c.args(["flush", s(&self.src), "--timeout", "60"]);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Flushes, then asserts the trees are identical at once (the barrier's promise).
    pub fn flush_and_check(&self, dst: &Path, skip: &dyn Fn(&Path) -> bool) {
        self.flush();
        let (a, b) = (snapshot_filtered(&self.src, skip), snapshot(dst));
        if a != b {
            panic!(
                "not identical right after flush:\n{}\n{}",
                tree_diff(&a, &b),
                self.diag()
            );
        }
    }

    /// The `synced` events so far.
    pub fn synced(&self) -> Vec<serde_json::Value> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|v| v["event"] == "synced")
            .cloned()
            .collect()
    }

    /// Stops it with SIGINT; returns its exit status.
    pub fn interrupt(mut self) -> i32 {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::INT);
        self.wait_exit(LIMIT)
    }

    pub fn wait_exit(&mut self, limit: Duration) -> i32 {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code().unwrap_or(-1);
            }
            assert!(t0.elapsed() < limit, "watch did not exit\n{}", self.diag());
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill(); // ours; may have exited
        let _ = self.child.wait();
    }
}

fn tree_diff(a: &BTreeMap<PathBuf, Node>, b: &BTreeMap<PathBuf, Node>) -> String {
    let mut out = String::new();
    for (k, v) in a {
        match b.get(k) {
            None => out.push_str(&format!("only local: {k:?}\n")),
            Some(w) if w != v => out.push_str(&format!("differs: {k:?}: {v:?} vs {w:?}\n")),
            _ => {}
        }
    }
    for k in b.keys() {
        if !a.contains_key(k) {
            out.push_str(&format!("only remote: {k:?}\n"));
        }
    }
    out
}

/// Polls until `dst` mirrors `src` (minus `skip`), or fails after `limit`.
pub fn converge(src: &Path, dst: &Path, skip: &dyn Fn(&Path) -> bool, limit: Duration, w: &Watch) {
    let t0 = Instant::now();
    loop {
        let (a, b) = (snapshot_filtered(src, skip), snapshot(dst));
        if a == b {
            return;
        }
        if t0.elapsed() > limit {
            panic!(
                "did not converge in {limit:?}:\n{}\n{}",
                tree_diff(&a, &b),
                w.diag()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn nothing(_: &Path) -> bool {
    false
}

fn write(p: &Path, body: &[u8]) {
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(p, body).unwrap();
}

/// The edits every target kind gets: what editors, git and build tools do.
fn exercise(w: &Watch, src: &Path, dst: &Path) {
    // Create, modify, delete a file.
    write(&src.join("new.txt"), b"first");
    w.flush_and_check(dst, &nothing);
    write(&src.join("new.txt"), b"second version, longer");
    w.flush_and_check(dst, &nothing);
    std::fs::remove_file(src.join("new.txt")).unwrap();
    w.flush_and_check(dst, &nothing);
    // An editor's atomic save: a temp file renamed over the original.
    write(&src.join("doc.md"), b"draft");
    w.flush_and_check(dst, &nothing);
    write(&src.join(".doc.md.swp"), b"saved text");
    std::fs::rename(src.join(".doc.md.swp"), src.join("doc.md")).unwrap();
    w.flush_and_check(dst, &nothing);
    // Rename a file, and a directory with a file edited inside it after the move.
    std::fs::rename(src.join("doc.md"), src.join("renamed.md")).unwrap();
    std::fs::create_dir_all(src.join("pkg/inner")).unwrap();
    write(&src.join("pkg/inner/a.rs"), b"fn a() {}");
    w.flush_and_check(dst, &nothing);
    std::fs::rename(src.join("pkg"), src.join("pkg2")).unwrap();
    write(&src.join("pkg2/inner/a.rs"), b"fn a() { changed() }");
    w.flush_and_check(dst, &nothing);
    // Two files trade names.
    write(&src.join("left"), b"L");
    write(&src.join("right"), b"R");
    w.flush_and_check(dst, &nothing);
    std::fs::rename(src.join("left"), src.join("tmp-swap")).unwrap();
    std::fs::rename(src.join("right"), src.join("left")).unwrap();
    std::fs::rename(src.join("tmp-swap"), src.join("right")).unwrap();
    w.flush_and_check(dst, &nothing);
    // A file replaced by a directory and back; a symlink; permissions.
    std::fs::remove_file(src.join("left")).unwrap();
    write(&src.join("left/inside"), b"now a directory");
    w.flush_and_check(dst, &nothing);
    std::fs::remove_dir_all(src.join("left")).unwrap();
    write(&src.join("left"), b"a file again");
    std::os::unix::fs::symlink("renamed.md", src.join("link")).unwrap();
    std::fs::set_permissions(
        src.join("right"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    w.flush_and_check(dst, &nothing);
    // Delete and recreate at once.
    std::fs::remove_dir_all(src.join("pkg2")).unwrap();
    write(&src.join("pkg2/other.rs"), b"recreated");
    w.flush_and_check(dst, &nothing);
}

/// A big directory renamed: the bytes for it are tiny.
fn big_rename(w: &Watch, src: &Path, dst: &Path) {
    let big = src.join("big");
    for i in 0..40 {
        write(
            &big.join(format!("part{i}.bin")),
            &random_bytes(512 << 10, i),
        ); // 20 MB
    }
    w.flush_and_check(dst, &nothing);
    let before = w.synced().len();
    std::fs::rename(&big, src.join("big-renamed")).unwrap();
    w.flush_and_check(dst, &nothing);
    let after = w.synced();
    let bytes: u64 = after[before..].iter().map(|v| num(v, "bytes")).sum();
    let renamed: usize = after[before..]
        .iter()
        .map(|v| v["renamed"].as_array().map_or(0, Vec::len))
        .sum();
    assert!(renamed >= 1, "not sent as a rename: {:?}", &after[before..]);
    assert!(
        bytes < 4096,
        "a 20 MB directory rename sent {bytes} bytes of content"
    );
}

/// A `git checkout`-sized burst.
fn burst(w: &Watch, src: &Path, dst: &Path) {
    for i in 0..5000 {
        write(
            &src.join(format!("burst/d{}/f{i}.txt", i % 50)),
            format!("file {i}").as_bytes(),
        );
    }
    w.flush_and_check(dst, &nothing);
    for i in (0..5000).step_by(2) {
        write(
            &src.join(format!("burst/d{}/f{i}.txt", i % 50)),
            format!("file {i}, changed").as_bytes(),
        );
    }
    w.flush_and_check(dst, &nothing);
}

#[test]
fn watch_to_a_local_directory_follows_what_editors_and_tools_do() {
    let td = tempfile::tempdir().unwrap();
    let (src, dst) = (td.path().join("src"), td.path().join("dst"));
    make_tree(
        &src,
        91,
        &TreeSpec {
            files: 60,
            max_size: 1 << 20,
            dirs: 8,
            links: 4,
        },
    );
    let env = vec![(
        "DEVSYNC_STATE_DIR".to_string(),
        td.path().join("state").display().to_string(),
    )];
    let w = Watch::start(&src, s(&dst), &[], &env);
    converge(&src, &dst, &nothing, LIMIT, &w);
    exercise(&w, &src, &dst);
    big_rename(&w, &src, &dst);
    burst(&w, &src, &dst);
    // Latency is reported per generation.
    let last = w.synced().last().cloned().unwrap();
    assert!(last["latency_ms"].as_f64().is_some(), "{last}");
    assert_eq!(w.interrupt(), 0);
    assert!(own_files(&dst).is_empty(), "{:?}", own_files(&dst));
}

#[test]
fn ignore_rules_apply_and_an_edited_gitignore_is_followed() {
    let td = tempfile::tempdir().unwrap();
    let (src, dst) = (td.path().join("src"), td.path().join("dst"));
    write(&src.join(".gitignore"), b"node_modules/\n*.log\n");
    write(&src.join("keep.txt"), b"kept");
    write(&src.join("node_modules/dep/index.js"), b"ignored");
    write(&src.join("sub/.gitignore"), b"local-only\n");
    write(&src.join("sub/local-only"), b"ignored by a nested file");
    let env = vec![(
        "DEVSYNC_STATE_DIR".to_string(),
        td.path().join("state").display().to_string(),
    )];
    let w = Watch::start(&src, s(&dst), &[], &env);
    let ignored = |p: &Path| {
        p.starts_with("node_modules")
            || p.extension().is_some_and(|e| e == "log")
            || p == Path::new("sub/local-only")
    };
    converge(&src, &dst, &ignored, LIMIT, &w);
    // Ignored paths get no watch and are never sent.
    write(&src.join("node_modules/dep/more.js"), b"still ignored");
    write(&src.join("debug.log"), b"ignored");
    write(&src.join("seen.txt"), b"synced");
    w.flush_and_check(&dst, &ignored);
    assert!(!dst.join("node_modules").exists());
    // Newly excluded paths stay on the remote; newly included ones are sent.
    write(&src.join("build.txt"), b"soon excluded");
    w.flush_and_check(&dst, &ignored);
    write(&src.join(".gitignore"), b"*.log\nbuild.txt\n");
    w.flush();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        std::fs::read(dst.join("build.txt")).unwrap(),
        b"soon excluded"
    );
    assert_eq!(
        std::fs::read(dst.join("node_modules/dep/index.js")).unwrap(),
        b"ignored",
        "node_modules is no longer ignored: it must be sent"
    );
    // build.txt is excluded now: an edit there is not sent.
    write(&src.join("build.txt"), b"edited locally only");
    write(&src.join("after.txt"), b"marks a generation");
    w.flush();
    assert_eq!(
        std::fs::read(dst.join("build.txt")).unwrap(),
        b"soon excluded"
    );
    assert_eq!(
        std::fs::read(dst.join("after.txt")).unwrap(),
        b"marks a generation"
    );
    assert_eq!(w.interrupt(), 0);
}

#[test]
fn a_file_rewritten_while_being_sent_arrives_complete() {
    let td = tempfile::tempdir().unwrap();
    let (src, dst) = (td.path().join("src"), td.path().join("dst"));
    write(&src.join("steady"), b"x");
    let env = vec![(
        "DEVSYNC_STATE_DIR".to_string(),
        td.path().join("state").display().to_string(),
    )];
    let w = Watch::start(&src, s(&dst), &[], &env);
    // A writer rewrites a 16 MiB file in place, over and over, each version one byte value.
    let hot = src.join("hot.bin");
    write(&hot, &vec![0u8; 16 << 20]);
    let versions = 12u8;
    let writer = {
        let hot = hot.clone();
        std::thread::spawn(move || {
            use std::io::{Seek, Write};
            for v in 1..=versions {
                let mut f = std::fs::OpenOptions::new().write(true).open(&hot).unwrap();
                for _ in 0..16 {
                    f.write_all(&vec![v; 1 << 20]).unwrap();
                    std::thread::sleep(Duration::from_millis(2));
                }
                f.seek(std::io::SeekFrom::Start(0)).unwrap();
            }
        })
    };
    // Meanwhile: whatever the remote has at any moment is one whole version.
    let t0 = Instant::now();
    while !writer.is_finished() && t0.elapsed() < LIMIT {
        if let Ok(d) = std::fs::read(dst.join("hot.bin"))
            && !d.is_empty()
        {
            let v = d[0];
            assert!(d.iter().all(|&b| b == v), "a torn version arrived");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    writer.join().unwrap();
    w.flush_and_check(&dst, &nothing);
    assert_eq!(
        std::fs::read(dst.join("hot.bin")).unwrap(),
        vec![versions; 16 << 20]
    );
    assert_eq!(w.interrupt(), 0);
}

#[test]
fn watch_halts_instead_of_mirroring_an_emptied_or_deleted_root() {
    for deleted in [false, true] {
        let td = tempfile::tempdir().unwrap();
        let (src, dst) = (td.path().join("src"), td.path().join("dst"));
        for i in 0..20 {
            write(&src.join(format!("f{i}")), b"precious");
        }
        let env = vec![(
            "DEVSYNC_STATE_DIR".to_string(),
            td.path().join("state").display().to_string(),
        )];
        let mut w = Watch::start(&src, s(&dst), &[], &env);
        converge(&src, &dst, &nothing, LIMIT, &w);
        if deleted {
            std::fs::remove_dir_all(&src).unwrap();
        } else {
            for i in 0..20 {
                std::fs::remove_file(src.join(format!("f{i}"))).unwrap();
            }
        }
        let v = w.wait_event("halted", LIMIT);
        let reason = v["reason"].as_str().unwrap().to_string();
        assert!(
            reason.contains(if deleted {
                "deleted"
            } else {
                "lost all its entries"
            }),
            "{reason}"
        );
        assert_eq!(w.wait_exit(LIMIT), 26, "{}", w.diag());
        assert_eq!(
            std::fs::read_dir(&dst).unwrap().count(),
            20,
            "the remote lost files"
        );
    }
}

#[test]
fn flush_without_a_watch_fails_at_once_with_the_fix() {
    let td = tempfile::tempdir().unwrap();
    let out = crate::common::bin()
        .args(["flush", s(td.path())])
        .env("DEVSYNC_STATE_DIR", td.path().join("state"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no devsync watch is running") && err.contains("devsync watch"),
        "{err}"
    );
}

#[test]
fn a_local_destination_inside_the_watched_tree_is_refused() {
    let td = tempfile::tempdir().unwrap();
    let src = td.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let out = crate::common::bin()
        .args(["watch", s(&src), s(&src.join("mirror"))])
        .env("DEVSYNC_STATE_DIR", td.path().join("state"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("contain one another"), "{err}");
}

/// The helper processes a `devsync serve` (pid) runs.
fn helpers_of(pid: u32) -> Vec<u32> {
    descendants(pid)
        .into_iter()
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .map(|c| c.split(|&b| b == 0).any(|a| a == b"helper"))
                .unwrap_or(false)
        })
        .collect()
}

fn kill(pid: u32) {
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).unwrap(),
        rustix::process::Signal::KILL,
    ); // it may be gone already
}

#[test]
fn watch_through_serve_survives_a_killed_helper_and_a_restarted_server() {
    let td = tempfile::tempdir().unwrap();
    let home = td.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let state = td.path().join("serve-state");
    let mut serve = ServeProc::start(&state, "dbx_watch");
    let src = td.path().join("src");
    make_tree(
        &src,
        17,
        &TreeSpec {
            files: 40,
            max_size: 256 << 10,
            dirs: 6,
            links: 2,
        },
    );
    let remote = state.join("homes/dbx_watch/proj");
    let env = serve_env(&serve, &home);
    let w = Watch::start(&src, "dbx_watch:proj", &[], &env);
    converge(&src, &remote, &nothing, LIMIT, &w);
    exercise(&w, &src, &remote);
    // The helper dies: changes made meanwhile arrive after the reconnect.
    for h in helpers_of(serve.child.id()) {
        kill(h);
    }
    write(
        &src.join("during-outage-1"),
        b"made while the helper was dead",
    );
    std::fs::rename(src.join("renamed.md"), src.join("renamed-again.md")).unwrap();
    w.wait_event("reconnecting", LIMIT);
    converge(&src, &remote, &nothing, LIMIT, &w);
    w.flush_and_check(&remote, &nothing);
    // The whole server dies and comes back on the same ports.
    let (gw, api) = (serve.gateway, serve.api);
    kill(serve.child.id());
    let _ = serve.child.wait();
    std::fs::remove_file(src.join("during-outage-1")).unwrap();
    write(
        &src.join("during-outage-2"),
        b"made while the server was down",
    );
    // A flush while disconnected answers at once (an error, never a hang).
    let t0 = Instant::now();
    let (code, err) = w.flush_result();
    if code != 0 {
        assert!(
            err.contains("disconnected") || err.contains("reconnect"),
            "{err}"
        );
    }
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "flush hung: {:?}",
        t0.elapsed()
    );
    let serve2 = ServeProc::start_on(&state, "dbx_watch", gw, api);
    converge(&src, &remote, &nothing, LIMIT, &w);
    w.wait_event("connected", LIMIT);
    w.flush_and_check(&remote, &nothing);
    assert_eq!(w.interrupt(), 0);
    drop(serve2);
}

#[test]
fn watch_over_openssh_follows_edits_and_reconnects() {
    let Some(sshd) = crate::openssh::sshd() else {
        return;
    };
    let td = tempfile::tempdir().unwrap();
    let home = td.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let (src, remote) = (td.path().join("src"), td.path().join("remote"));
    make_tree(
        &src,
        23,
        &TreeSpec {
            files: 40,
            max_size: 256 << 10,
            dirs: 6,
            links: 2,
        },
    );
    let dst = format!("root@127.0.0.1:{}:{}", sshd.addr.port(), s(&remote));
    let helpers = td.path().join("helpers");
    let env = vec![("HOME".to_string(), s(&home).to_string())];
    let w = Watch::start(
        &src,
        &dst,
        &["-I", s(&sshd.client_key), "--remote-dir", s(&helpers)],
        &env,
    );
    converge(&src, &remote, &nothing, LIMIT, &w);
    exercise(&w, &src, &remote);
    big_rename(&w, &src, &remote);
    // The remote helper dies (as when the devbox restarts it): reconnect and catch up.
    let helper_pids = helpers_in(&helpers);
    assert!(!helper_pids.is_empty(), "no remote helper found");
    for p in helper_pids {
        kill(p);
    }
    write(&src.join("after-kill"), b"sent after the reconnect");
    w.wait_event("reconnecting", LIMIT);
    converge(&src, &remote, &nothing, LIMIT, &w);
    w.flush_and_check(&remote, &nothing);
    assert_eq!(w.interrupt(), 0);
}

fn state_env(td: &Path) -> Vec<(String, String)> {
    vec![(
        "DEVSYNC_STATE_DIR".to_string(),
        td.join("state").display().to_string(),
    )]
}

#[test]
fn directories_beyond_the_watch_limit_are_read_again_instead() {
    let td = tempfile::tempdir().unwrap();
    let (src, dst) = (td.path().join("src"), td.path().join("dst"));
    for d in 0..8 {
        write(&src.join(format!("d{d}/sub/f")), b"v1");
    }
    let mut env = state_env(td.path());
    env.push(("DEVSYNC_WATCH_LIMIT".into(), "4".into()));
    let w = Watch::start(&src, s(&dst), &[], &env);
    let warn = w.wait_event("warning", LIMIT);
    let msg = warn["message"].as_str().unwrap();
    assert!(
        msg.contains("fs.inotify.max_user_watches") && msg.contains("sysctl"),
        "{msg}"
    );
    // A flush reads the unwatched directories too.
    for d in 0..8 {
        write(&src.join(format!("d{d}/sub/f")), b"v2, longer");
    }
    w.flush_and_check(&dst, &nothing);
    // Without a flush, the periodic rescan finds changes there within seconds.
    for d in 0..8 {
        write(&src.join(format!("d{d}/sub/g")), b"new");
    }
    converge(&src, &dst, &nothing, Duration::from_secs(20), &w);
    assert_eq!(w.interrupt(), 0);
}

/// The variables a watch through `serve` needs (its API, gateway and CA), as a list.
fn serve_env(serve: &ServeProc, home: &Path) -> Vec<(String, String)> {
    let mut c = Command::new("true");
    serve.env(&mut c, home);
    c.get_envs()
        .filter_map(|(k, v)| Some((k.to_str()?.to_string(), v?.to_str()?.to_string())))
        .collect()
}

/// The `devsync helper` processes under `pid`.
fn local_helpers(pid: u32) -> Vec<u32> {
    helpers_of(pid)
}

#[test]
fn a_silent_helper_is_taken_for_gone_and_replaced() {
    let td = tempfile::tempdir().unwrap();
    let (src, dst) = (td.path().join("src"), td.path().join("dst"));
    write(&src.join("a"), b"1");
    let mut env = state_env(td.path());
    // Pings every 125 ms; a peer silent for 1 s is gone.
    env.push(("DEVSYNC_PEER_TIMEOUT_MS".into(), "1000".into()));
    let w = Watch::start(&src, s(&dst), &[], &env);
    // Idle for longer than the limit: keepalives keep it up.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        w.events
            .lock()
            .unwrap()
            .iter()
            .all(|v| v["event"] != "reconnecting"),
        "an idle but live session was dropped\n{}",
        w.diag()
    );
    write(&src.join("b"), b"2");
    w.flush_and_check(&dst, &nothing);
    // The helper freezes: within the limit the watch replaces it.
    let helpers = local_helpers(w.child.id());
    assert_eq!(helpers.len(), 1, "{helpers:?}");
    let pid = rustix::process::Pid::from_raw(helpers[0] as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::STOP).unwrap();
    write(&src.join("c"), b"3");
    w.wait_event("reconnecting", Duration::from_secs(20));
    converge(&src, &dst, &nothing, LIMIT, &w);
    w.flush_and_check(&dst, &nothing);
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL); // if still there
    assert_eq!(w.interrupt(), 0);
}

#[test]
fn ctrl_c_finishes_the_generation_under_way_and_leaves_nothing_half_written() {
    let td = tempfile::tempdir().unwrap();
    let (src, dst) = (td.path().join("src"), td.path().join("dst"));
    write(&src.join("small"), b"s");
    let w = Watch::start(&src, s(&dst), &[], &state_env(td.path()));
    let big = random_bytes(256 << 20, 7);
    // Written beside the tree and renamed in: the watch sees one complete file (a file still
    // being written is sent again once it holds still, which is another test's business).
    write(&td.path().join("big.bin"), &big);
    let before = io_bytes(w.child.id()).unwrap();
    std::fs::rename(td.path().join("big.bin"), src.join("big.bin")).unwrap();
    // Interrupt once the transfer is under way (the watch has read 16 MiB of it).
    let t0 = Instant::now();
    while io_bytes(w.child.id()).unwrap() < before + (16 << 20) {
        assert!(
            t0.elapsed() < LIMIT,
            "the transfer never began\n{}",
            w.diag()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let under_way = w.synced().is_empty();
    assert_eq!(w.interrupt(), 0);
    if under_way {
        // The generation under way was finished before the watch ended.
        assert_eq!(std::fs::read(dst.join("big.bin")).unwrap(), big);
    }
    assert!(own_files(&dst).is_empty(), "{:?}", own_files(&dst));
    match std::fs::read(dst.join("big.bin")) {
        Ok(d) => assert!(d == big, "a partial big.bin"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound),
    }
}

#[test]
fn a_push_into_a_watched_directory_is_refused_not_mixed_in() {
    let td = tempfile::tempdir().unwrap();
    let (src, other, dst) = (
        td.path().join("src"),
        td.path().join("other"),
        td.path().join("dst"),
    );
    write(&src.join("a.txt"), b"from the watched tree");
    write(&other.join("a.txt"), b"from another tree");
    let env = vec![(
        "DEVSYNC_STATE_DIR".to_string(),
        td.path().join("state").display().to_string(),
    )];
    let w = Watch::start(&src, s(&dst), &[], &env);
    converge(&src, &dst, &nothing, LIMIT, &w);
    let out = crate::common::bin()
        .args(["push", "--delete", s(&other), s(&dst)])
        .env("DEVSYNC_LOCK_WAIT_MS", "300")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("another devsync session (pid ") && err.contains("is syncing into"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(dst.join("a.txt")).unwrap(),
        b"from the watched tree"
    );
    // The watch goes on; once it is stopped, the push goes through.
    write(&src.join("b.txt"), b"still watched");
    converge(&src, &dst, &nothing, LIMIT, &w);
    assert_eq!(w.interrupt(), 0);
    let out = crate::common::bin()
        .args(["push", "--delete", s(&other), s(&dst)])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_entries(&other, &dst);
}

#[test]
fn a_directory_recreated_or_moved_back_is_still_watched() {
    let td = tempfile::tempdir().unwrap();
    let (src, dst) = (td.path().join("src"), td.path().join("dst"));
    write(&src.join("gen/a"), b"a");
    write(&src.join("d/keep"), b"k");
    let w = Watch::start(&src, s(&dst), &[], &state_env(td.path()));
    converge(&src, &dst, &nothing, LIMIT, &w);
    // `rm -rf gen && mkdir gen`, as build tools do: the new directory often gets the old
    // one's inode number back.
    for i in 0..5 {
        std::fs::remove_dir_all(src.join("gen")).unwrap();
        std::fs::create_dir(src.join("gen")).unwrap();
        w.flush();
        write(&src.join(format!("gen/f{i}")), b"made in the new directory");
        w.flush_and_check(&dst, &nothing);
    }
    // Moved away and back: still watched under its name.
    std::fs::rename(src.join("d"), src.join("x")).unwrap();
    std::fs::rename(src.join("x"), src.join("d")).unwrap();
    w.flush();
    write(&src.join("d/after"), b"written after the moves");
    w.flush_and_check(&dst, &nothing);
    assert_eq!(w.interrupt(), 0);
}

#[test]
fn a_flush_after_writes_to_ignored_files_returns_at_once() {
    let td = tempfile::tempdir().unwrap();
    let (src, dst) = (td.path().join("src"), td.path().join("dst"));
    write(&src.join(".gitignore"), b"*.log\n");
    write(&src.join("kept"), b"k");
    let w = Watch::start(&src, s(&dst), &[], &state_env(td.path()));
    converge(&src, &dst, &nothing, LIMIT, &w);
    for i in 0..5 {
        write(&src.join("server.log"), format!("line {i}\n").as_bytes());
        let mut c = crate::common::bin();
        c.args(["flush", s(&src), "--timeout", "10"]);
        for (k, v) in &state_env(td.path()) {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "flush {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(!dst.join("server.log").exists());
    assert_eq!(w.interrupt(), 0);
}

#[test]
fn a_root_emptied_while_disconnected_halts_instead_of_wiping_the_remote() {
    let td = tempfile::tempdir().unwrap();
    let home = td.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let state = td.path().join("serve-state");
    let mut serve = ServeProc::start(&state, "dbx_empty");
    let src = td.path().join("src");
    for i in 0..20 {
        write(&src.join(format!("f{i}")), b"precious");
    }
    let remote = state.join("homes/dbx_empty/proj");
    let env = serve_env(&serve, &home);
    let mut w = Watch::start(&src, "dbx_empty:proj", &[], &env);
    converge(&src, &remote, &nothing, LIMIT, &w);
    let (gw, api) = (serve.gateway, serve.api);
    kill(serve.child.id());
    let _ = serve.child.wait();
    w.wait_event("reconnecting", LIMIT);
    for i in 0..20 {
        std::fs::remove_file(src.join(format!("f{i}"))).unwrap();
    }
    let serve2 = ServeProc::start_on(&state, "dbx_empty", gw, api);
    let v = w.wait_event("halted", LIMIT);
    assert!(
        v["reason"]
            .as_str()
            .unwrap()
            .contains("lost all its entries"),
        "{v}"
    );
    assert_eq!(w.wait_exit(LIMIT), 26, "{}", w.diag());
    assert_eq!(std::fs::read_dir(&remote).unwrap().count(), 20);
    drop(serve2);
}

/// `watch --delete` with a directory it cannot read: its remote copy is kept (as `push
/// --delete` keeps it), not taken for deleted.
#[test]
fn an_unreadable_directory_is_not_taken_for_deleted() {
    use std::os::unix::fs::PermissionsExt;
    // Root reads everything; the check runs as nobody.
    if !require(
        rustix::process::geteuid().is_root(),
        "root, to run as nobody",
    ) {
        return;
    }
    let runuser = Path::new("/usr/sbin/runuser").exists() || Path::new("/sbin/runuser").exists();
    if !require(runuser, "runuser (util-linux), to run as nobody") {
        return;
    }
    let td = tempfile::Builder::new().tempdir_in("/tmp").unwrap();
    let d = td.path();
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (src, dst, state) = (d.join("src"), d.join("dst"), d.join("state"));
    write(&src.join("open/a"), b"a");
    write(&src.join("secret/kept"), b"remote copy");
    write(&dst.join("open/a"), b"a");
    write(&dst.join("secret/kept"), b"remote copy");
    std::fs::create_dir(&state).unwrap();
    let bin = d.join("devsync");
    std::fs::copy(BIN, &bin).unwrap();
    let chown = |p: &Path| {
        let ok = Command::new("chown")
            .args(["-R", "nobody"])
            .arg(p)
            .status()
            .unwrap()
            .success();
        assert!(ok);
    };
    for p in [&src, &dst, &state] {
        chown(p);
    }
    // Owned by root and closed: nobody cannot list it.
    let ok = Command::new("chown")
        .args(["root", s(&src.join("secret"))])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    std::fs::set_permissions(src.join("secret"), std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut child = Command::new("runuser")
        .args(["-u", "nobody", "--"])
        .arg(&bin)
        .args(["watch", "--json", "--delete", s(&src), s(&dst)])
        .env("DEVSYNC_STATE_DIR", &state)
        .env("HOME", d)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let t0 = Instant::now();
    loop {
        let line = lines
            .next()
            .expect("watch ended before it was ready")
            .unwrap();
        if line.contains("\"ready\"") {
            break;
        }
        assert!(t0.elapsed() < LIMIT, "never ready");
    }
    // Ctrl-C to the watch itself (runuser does not pass SIGINT on).
    for pid in descendants(child.id()) {
        if std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| c.windows(5).any(|w| w == b"watch"))
        {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_raw(pid as i32).unwrap(),
                rustix::process::Signal::INT,
            ); // ours; it may be ending
        }
    }
    let mut child = child;
    assert_eq!(wait_bounded_code(&mut child), Some(0));
    assert_eq!(
        std::fs::read(dst.join("secret/kept")).unwrap(),
        b"remote copy",
        "the remote copy of an unreadable directory was deleted"
    );
}

/// Waits at most [`LIMIT`] for `child`; kills it (ours) if it is still there.
fn wait_bounded_code(child: &mut std::process::Child) -> Option<i32> {
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code();
        }
        if t0.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("did not end within {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `rm -rf` of a big watched root takes a while: the deletions seen before the root itself
/// goes must not reach the remote (beyond the first hundred entries).
#[test]
fn a_root_deleted_slowly_halts_before_any_of_it_is_deleted_remotely() {
    let td = tempfile::tempdir().unwrap();
    let (src, dst) = (td.path().join("src"), td.path().join("dst"));
    for d in 0..30 {
        for f in 0..40 {
            write(&src.join(format!("d{d}/f{f}")), b"x");
        }
    }
    let mut w = Watch::start(&src, s(&dst), &[], &state_env(td.path()));
    converge(&src, &dst, &nothing, LIMIT, &w);
    // What `rm -rf src` does, at a pace that spans many batches (2 ms per file).
    for d in 0..30 {
        for f in 0..40 {
            std::fs::remove_file(src.join(format!("d{d}/f{f}"))).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        std::fs::remove_dir(src.join(format!("d{d}"))).unwrap();
    }
    std::fs::remove_dir(&src).unwrap();
    let v = w.wait_event("halted", LIMIT);
    assert!(v["reason"].as_str().unwrap().contains("deleted"), "{v}");
    assert_eq!(w.wait_exit(LIMIT), 26, "{}", w.diag());
    let left = walkdir::WalkDir::new(&dst)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .count();
    // Up to 100 entries may go before the deletions count as a mass deletion (then nothing
    // more goes until they pause, and the halt comes).
    assert!(
        left >= 1100,
        "the remote lost {} files before the halt",
        1200 - left
    );
}

/// A watch stopped by the user leaves a kept connection (as a push does), and the next watch
/// to that target starts its session through it: no TLS, SSH or helper start-up.
#[test]
fn a_watch_leaves_a_kept_connection_and_the_next_one_uses_it() {
    let td = tempfile::tempdir().unwrap();
    let home = td.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let state = td.path().join("serve-state");
    let serve = ServeProc::start(&state, "dbx_kw");
    let src = td.path().join("src");
    write(&src.join("a.txt"), b"first");
    let remote = state.join("homes/dbx_kw/proj");
    let mut env = serve_env(&serve, &home);
    env.push(("DEVSYNC_KEEP_CONNECTION".into(), "60".into()));
    env.push(("DEVSYNC_TRACE".into(), "1".into()));
    let kept = home.join(".local/state/devsync/kept");
    let w = Watch::start(&src, "dbx_kw:proj", &[], &env);
    converge(&src, &remote, &nothing, LIMIT, &w);
    assert!(
        crate::faults::live_keeper(&kept).is_none(),
        "a keeper while watching"
    );
    assert_eq!(w.interrupt(), 0);
    let keeper = crate::faults::wait_for_keeper(&kept);
    let w = Watch::start(&src, "dbx_kw:proj", &[], &env);
    write(&src.join("b.txt"), b"made in the second watch");
    converge(&src, &remote, &nothing, LIMIT, &w);
    w.flush_and_check(&remote, &nothing);
    let said = w.stderr.lock().unwrap().clone();
    assert!(
        said.contains(&format!(
            "reusing the kept connection (keeper pid {keeper})"
        )),
        "{said}"
    );
    assert_eq!(w.interrupt(), 0);
    // Still the same keeper, for whatever comes next.
    assert_eq!(crate::faults::live_keeper(&kept), Some(keeper));
    kill(keeper);
}
