//! Kept connections: after a push, a keeper holds the connection and a started helper; the
//! next push to the same target reuses it; a killed keeper, another build's keeper and another
//! user's socket all fall back to a fresh connection, visibly only in the trace.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use devsync::server::KeyFormat;

use crate::common::*;
use crate::remote::{Endpoint, endpoint};

fn kept_dir(ep: &Endpoint) -> PathBuf {
    ep.home.path().join(".local/state/devsync/kept")
}

/// The keeper's socket in `ep`'s state directory.
fn kept_socket(ep: &Endpoint) -> PathBuf {
    std::fs::read_dir(kept_dir(ep))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "sock"))
        .unwrap()
}

/// A stand-in keeper listening on `sock` (the real one must be gone), private as a real one.
fn fake_keeper(sock: &Path) -> std::os::unix::net::UnixListener {
    let _ = std::fs::remove_file(sock);
    let fake = std::os::unix::net::UnixListener::bind(sock).unwrap();
    std::fs::set_permissions(sock, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    fake
}

/// What the keepers of `ep` wrote to their logs (for a failing assertion's message).
fn keeper_logs(ep: &Endpoint) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(kept_dir(ep))
        .into_iter()
        .flatten()
        .flatten()
    {
        if e.path().extension().is_some_and(|x| x == "log") {
            out += &std::fs::read_to_string(e.path()).unwrap_or_default();
        }
    }
    out
}

/// Runs a traced push with connections kept; returns (exit code, stderr).
fn push(ep: &Endpoint, src: &Path, dst: &str) -> (i32, String) {
    push_with(ep, src, dst, |_| {})
}

/// [`push`], with the command changed by `tweak` too.
fn push_with(
    ep: &Endpoint,
    src: &Path,
    dst: &str,
    tweak: impl FnOnce(&mut std::process::Command),
) -> (i32, String) {
    let (code, _, err) = ep.run(&["push", src.to_str().unwrap(), dst], |c| {
        c.env("DEVSYNC_KEEP_CONNECTION", "60")
            .env("DEVSYNC_TRACE", "1");
        tweak(c);
    });
    (code, err)
}

/// The running keeper's pid, once its socket is up (bounded wait).
fn keeper_pid(ep: &Endpoint) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let found = std::fs::read_dir(kept_dir(ep)).ok().and_then(|d| {
            let mut pid = None;
            let mut sock = false;
            for e in d.filter_map(Result::ok) {
                let n = e.file_name().to_string_lossy().to_string();
                sock |= n.ends_with(".sock");
                if n.ends_with(".pid") {
                    pid = std::fs::read_to_string(e.path()).ok()?.trim().parse().ok();
                }
            }
            pid.filter(|_| sock)
        });
        if let Some(p) = found {
            return p;
        }
        assert!(Instant::now() < deadline, "no keeper came up");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn kill(pid: u32) {
    if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL); // ours
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Kill(u32);
impl Drop for Kill {
    fn drop(&mut self) {
        kill(self.0);
    }
}

#[test]
fn a_kept_connection_is_reused_and_falls_back_when_it_cannot_be() {
    let ep = endpoint(&["dbx_keep"], None, "user", KeyFormat::Pkcs8);
    let td = tempfile::tempdir().unwrap();
    let src = td.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("a"), "one").unwrap();
    let remote = td.path().join("remote");
    let dst = format!("dbx_keep:{}", remote.display());
    // First push: fresh, and leaves a keeper behind.
    let (code, err) = push(&ep, &src, &dst);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("keeping the connection"), "{err}");
    let pid = keeper_pid(&ep);
    let _guard = Kill(pid);
    // The socket and its directory are private.
    let dir = kept_dir(&ep);
    let mode = |p: &Path| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions())
            & 0o777
    };
    assert_eq!(mode(&dir), 0o700);
    let sock = kept_socket(&ep);
    assert_eq!(mode(&sock), 0o600);
    // Second and third pushes go through it (the keeper starts a helper for each).
    for body in ["two", "three"] {
        std::fs::write(src.join("a"), body).unwrap();
        let (code, err) = push(&ep, &src, &dst);
        assert_eq!(code, 0, "{err}");
        assert!(
            err.contains(&format!("reusing the kept connection (keeper pid {pid})")),
            "{err}"
        );
        assert!(!err.contains("TLS up"), "no handshake when reusing: {err}");
        assert_same_tree(&src, &remote);
    }
    // Another user cannot use it: the keeper checks the peer, even if the socket were open.
    std::fs::set_permissions(&sock, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // Only the test's own home and what is under it (never /tmp itself).
    for d in [".", ".local", ".local/state", ".local/state/devsync"] {
        let d = ep.home.path().join(d);
        std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let probe = format!(
        "import socket\ns=socket.socket(socket.AF_UNIX); s.connect('{}')\ntry:\n  \
         s.sendall(b'DEVSYNC-KEEP 1 x y\\n'); print(repr(s.recv(100)))\n\
         except (ConnectionResetError, BrokenPipeError):\n  print(repr(b''))",
        sock.display()
    );
    let out = std::process::Command::new("runuser")
        .args(["-u", "nobody", "--", "python3", "-c", &probe])
        .output()
        .unwrap();
    if require(
        out.status.success() || !out.stderr.is_empty(),
        "runuser and python3",
    ) {
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "b''",
            "{out:?}"
        );
    }
    // And a client that finds the socket open to others does not use it.
    std::fs::write(src.join("a"), "four").unwrap();
    let (code, err) = push(&ep, &src, &dst);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("not reusing a connection") && err.contains("open to other users"),
        "{err}"
    );
    assert_same_tree(&src, &remote);
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    std::fs::set_permissions(&sock, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    // The keeper that push started finds this one holding the lock and exits: wait for
    // that, or it could take over once this one is killed below.
    wait_for_no_keeper_but(&ep, pid);
    // A killed keeper: a fresh connection, and a new keeper.
    kill(pid);
    std::fs::write(src.join("a"), "five").unwrap();
    let (code, err) = push(&ep, &src, &dst);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("not reusing a connection: the keeper is gone"),
        "{err}"
    );
    assert_same_tree(&src, &remote);
    let pid2 = keeper_pid_other_than(&ep, pid);
    let _guard2 = Kill(pid2);
    // Another build's keeper: it says so, the client connects afresh.
    kill(pid2);
    let fake = fake_keeper(&sock);
    let server = std::thread::spawn(move || {
        use std::io::{BufRead, Write};
        let (s, _) = fake.accept().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(&s).read_line(&mut line).unwrap();
        (&s).write_all(b"ERR the kept connection is from devsync 0.0.1-old\n")
            .unwrap();
        line
    });
    std::fs::write(src.join("a"), "six").unwrap();
    let (code, err) = push(&ep, &src, &dst);
    let asked = server.join().unwrap();
    assert!(asked.starts_with("DEVSYNC-KEEP 1 "), "{asked}");
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("not reusing a connection: the kept connection is from devsync 0.0.1-old"),
        "{err}"
    );
    assert_same_tree(&src, &remote);
    // The new keeper goes with the endpoint (its connection closes), or now.
    let pid3 = keeper_pid_other_than(&ep, pid2);
    let _guard3 = Kill(pid3);
    // The same devbox id through another gateway address (another service, as far as the
    // client can tell) does not reuse it.
    let gw = ep.gateway.to_string().replace("127.0.0.1", "localhost");
    let (code, err) = push_with(&ep, &src, &dst, |c| {
        c.env("RUNLOOP_SSH_GATEWAY", gw);
    });
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("not reusing a connection"), "{err}");
    assert!(err.contains("TLS up"), "{err}");
}

/// Waits (bounded) until no `devsync __keep` of this endpoint's HOME runs but `pid`.
fn wait_for_no_keeper_but(ep: &Endpoint, pid: u32) {
    let home = format!("HOME={}", ep.home.path().display());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let others = std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&p| p != pid)
            .filter(|p| {
                let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
                let env = std::fs::read(format!("/proc/{p}/environ")).unwrap_or_default();
                cmd.split(|&b| b == 0).any(|a| a == b"__keep")
                    && env.split(|&b| b == 0).any(|v| v == home.as_bytes())
            })
            .count();
        if others == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "another keeper stays up");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn keeper_pid_other_than(ep: &Endpoint, old: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let p = keeper_pid(ep);
        if p != old && Path::new(&format!("/proc/{p}")).exists() {
            return p;
        }
        assert!(Instant::now() < deadline, "no new keeper");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Spare helpers give up on a client that never comes after the keepalive limit, both at
/// once (they were started together), well inside a keeper's idle time. The next push must
/// still go through the keeper, on a freshly started helper, not retire it.
#[test]
fn spares_that_died_waiting_are_replaced_not_the_keeper() {
    let ep = endpoint(&["dbx_spares"], None, "user", KeyFormat::Pkcs8);
    let td = tempfile::tempdir().unwrap();
    let (src, helpers) = (td.path().join("src"), td.path().join("helpers"));
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("a"), "one").unwrap();
    let remote = td.path().join("remote");
    let dst = format!("dbx_spares:{}", remote.display());
    let with_dir = |c: &mut std::process::Command| {
        c.arg("--remote-dir").arg(&helpers);
    };
    let (code, err) = push_with(&ep, &src, &dst, with_dir);
    assert_eq!(code, 0, "{err}");
    let pid = keeper_pid(&ep);
    let _guard = Kill(pid);
    // Both spares up (bounded wait), then gone, as after the helpers' own timeout.
    let deadline = Instant::now() + Duration::from_secs(20);
    while helpers_in(&helpers).len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the keeper did not start two spares"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in helpers_in(&helpers) {
        kill(p);
    }
    std::fs::write(src.join("a"), "two").unwrap();
    let (code, err) = push_with(&ep, &src, &dst, with_dir);
    let err = format!("{err}\nkeeper log:\n{}", keeper_logs(&ep));
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(&format!("reusing the kept connection (keeper pid {pid})")),
        "{err}"
    );
    // Whether a spare died while starting, or after it greeted but before the keeper heard,
    // the keeper hides it: the client does not fall back to a connection of its own.
    assert!(!err.contains("connecting afresh"), "{err}");
    assert_same_tree(&src, &remote);
    assert_eq!(keeper_pid(&ep), pid, "the keeper was replaced");
}

/// A keeper that greets for a helper and then hangs up before the helper answers (it lost its
/// helper and found no other, or died): the helper did nothing, so the client runs the sync
/// again on a fresh connection instead of failing.
#[test]
fn a_keeper_that_hangs_up_before_the_helper_answers_means_a_fresh_connection() {
    let ep = endpoint(&["dbx_hangup"], None, "user", KeyFormat::Pkcs8);
    let td = tempfile::tempdir().unwrap();
    let src = td.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("a"), "one").unwrap();
    let remote = td.path().join("remote");
    let dst = format!("dbx_hangup:{}", remote.display());
    let (code, err) = push(&ep, &src, &dst);
    assert_eq!(code, 0, "{err}");
    let pid = keeper_pid(&ep);
    let _guard = Kill(pid);
    let sock = kept_socket(&ep);
    kill(pid);
    let fake = fake_keeper(&sock);
    let server = std::thread::spawn(move || {
        use std::io::{BufRead, Read, Write};
        let (s, _) = fake.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = std::io::BufReader::new(&s);
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let mut hello = b"OK 4242\n".to_vec();
        hello.extend_from_slice(devsync::proto::handshake::HELPER_MAGIC);
        hello.extend_from_slice(&devsync::proto::PROTOCOL_VERSION.to_be_bytes());
        (&s).write_all(&hello).unwrap();
        // The client's Hello arrives; the "helper" is gone before it answers.
        let mut got = [0u8; 64];
        let n = r.read(&mut got).unwrap_or(0);
        (line, n)
    });
    std::fs::write(src.join("a"), "two").unwrap();
    let (code, err) = push(&ep, &src, &dst);
    let (asked, hello_bytes) = server.join().unwrap();
    assert!(asked.starts_with("DEVSYNC-KEEP 1 "), "{asked}");
    assert!(hello_bytes > 0, "the client sent no Hello");
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("reusing the kept connection (keeper pid 4242)")
            && err.contains("the kept helper ended before answering; connecting afresh")
            && err.contains("TLS up"),
        "{err}"
    );
    // The scan made for the kept session is the one the fresh connection sends: the tree
    // is walked once (and its warnings said once).
    assert_eq!(err.matches("[send] scanning").count(), 1, "{err}");
    assert_same_tree(&src, &remote);
    // The fresh connection leaves a keeper of its own.
    let pid2 = keeper_pid_other_than(&ep, pid);
    let _guard2 = Kill(pid2);
}
