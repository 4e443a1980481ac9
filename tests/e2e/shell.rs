//! `devsync ssh` (commands and terminals), `devsync ssh --config-only` and `devsync proxy`:
//! against `devsync serve` and real OpenSSH, and with OpenSSH's own client (ssh, scp,
//! rsync -e ssh) using nothing but the printed config block. Terminal sessions are driven in
//! tmux.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use devsync::server::KeyFormat;

use crate::common::*;
use crate::remote::{Endpoint, endpoint};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn has(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `devsync ssh TARGET -- sh -c '…'`-style runs: (exit code, stdout, stderr).
fn ssh_run(c: Command, target: &str, line: &str, stdin: &[u8]) -> (i32, Vec<u8>, String) {
    ssh_run_with(c, &[], target, line, stdin)
}

fn ssh_run_with(
    mut c: Command,
    flags: &[String],
    target: &str,
    line: &str,
    stdin: &[u8],
) -> (i32, Vec<u8>, String) {
    c.args(["ssh", "-T", target])
        .args(flags)
        .args(["--", line])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = input.write_all(&data); // the command may not read it all
    });
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    (
        out.status.code().unwrap_or(-1),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Exit statuses, both output streams and stdin, exactly.
fn commands_come_back_exactly(cmd: &dyn Fn() -> Command, target: &str, flags: &[String]) {
    let ssh_run = |c: Command, target: &str, line: &str, stdin: &[u8]| {
        ssh_run_with(c, flags, target, line, stdin)
    };
    let (code, out, err) = ssh_run(cmd(), target, "echo out; echo err >&2", b"");
    assert_eq!((code, &out[..]), (0, &b"out\n"[..]), "{err}");
    assert!(err.ends_with("err\n"), "{err:?}");
    for want in [1, 42] {
        let (code, _, err) = ssh_run(cmd(), target, &format!("exit {want}"), b"");
        assert_eq!(code, want, "{err}");
    }
    let (code, _, err) = ssh_run(cmd(), target, "kill -9 $$", b"");
    assert_eq!(code, 137, "{err}");
    assert!(err.contains("killed by signal KILL"), "{err}");
    // stdin streams through, and its end is the command's EOF.
    let input = random_bytes(3 << 20, 5);
    let (code, out, err) = ssh_run(cmd(), target, "wc -c; echo end", &input);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        String::from_utf8_lossy(&out).trim(),
        format!("{}\nend", 3 << 20)
    );
    let (code, out, _) = ssh_run(cmd(), target, "cat", &input);
    assert_eq!(code, 0);
    assert!(out == input, "cat changed {} bytes of input", input.len());
    // Output is streamed as it comes, not held until the end.
    let mut c = cmd();
    c.args(["ssh", "-T", target])
        .args(flags)
        .args(["--", "echo first; sleep 3; echo second"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let t0 = Instant::now();
    let mut child = c.spawn().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 6];
    stdout.read_exact(&mut first).unwrap();
    let took = t0.elapsed();
    assert_eq!(&first, b"first\n");
    assert!(
        took < Duration::from_millis(2500),
        "first line only after {took:?}"
    );
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

#[test]
fn ssh_commands_through_serve() {
    let ep = endpoint(&["dbx_sh"], None, "user", KeyFormat::Pkcs8);
    commands_come_back_exactly(&|| ep.cmd(), "dbx_sh", &[]);
    // A target's path is where the command starts.
    let td = tempfile::tempdir().unwrap();
    let (code, out, err) = ssh_run(ep.cmd(), &format!("dbx_sh:{}", s(td.path())), "pwd", b"");
    assert_eq!(code, 0, "{err}");
    assert_eq!(String::from_utf8_lossy(&out).trim(), s(td.path()));
    // devsync's own failure is 255, not a command's status.
    let (code, _, err) = ssh_run(ep.cmd(), "dbx_nope", "true", b"");
    assert_eq!(code, 255, "{err}");
    assert!(err.contains("dbx_nope"), "{err}");
}

/// `devsync ssh` through a kept connection: the first command leaves a keeper, and every
/// case of [`commands_come_back_exactly`] then runs on a channel the keeper opens (exit
/// codes, signals, stderr, stdin to its end, streaming), as a push reuses it.
#[test]
fn ssh_commands_through_a_kept_connection() {
    let ep = endpoint(&["dbx_ksh"], None, "user", KeyFormat::Pkcs8);
    let kept = || {
        let mut c = ep.cmd();
        c.env("DEVSYNC_KEEP_CONNECTION", "60");
        c
    };
    let (code, out, err) = ssh_run(kept(), "dbx_ksh", "echo one", b"");
    assert_eq!((code, &out[..]), (0, &b"one\n"[..]), "{err}");
    let dir = ep.home.path().join(".local/state/devsync/kept");
    let pid = crate::faults::wait_for_keeper(&dir);
    let mut traced = kept();
    traced.env("DEVSYNC_TRACE", "1");
    let (code, out, err) = ssh_run(traced, "dbx_ksh", "echo two", b"");
    assert_eq!((code, &out[..]), (0, &b"two\n"[..]), "{err}");
    assert!(
        err.contains(&format!("reusing the kept connection (keeper pid {pid})")),
        "{err}"
    );
    commands_come_back_exactly(&kept, "dbx_ksh", &[]);
    // A client killed while output pours out: the keeper closes the channel, and the remote
    // command ends with it (as it would with the client's own connection gone).
    let td = tempfile::tempdir().unwrap();
    let pidfile = td.path().join("pid");
    let mut c = kept();
    c.args(["ssh", "-T", "dbx_ksh", "--"])
        .arg(format!("echo $$ > {}; exec yes", s(&pidfile)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = c.spawn().unwrap();
    let mut some = [0u8; 4096];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut some)
        .unwrap();
    let remote: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    child.kill().unwrap(); // ours
    child.wait().unwrap();
    let t0 = Instant::now();
    while Path::new(&format!("/proc/{remote}")).exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the remote command outlived its client"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Still that keeper: none of them needed a connection of its own.
    assert_eq!(crate::faults::live_keeper(&dir), Some(pid));
    crate::faults::stop_keeper(&dir);
}

#[test]
fn ssh_commands_through_openssh() {
    let Some(sshd) = crate::openssh::sshd() else {
        return;
    };
    let home = tempfile::tempdir().unwrap();
    let key = sshd.client_key.clone();
    let cmd = || {
        let mut c = crate::common::bin();
        c.env("HOME", home.path()).env_remove("SSH_AUTH_SOCK");
        c
    };
    commands_come_back_exactly(
        &cmd,
        &format!("root@127.0.0.1:{}:", sshd.addr.port()),
        &["-I".into(), s(&key).into()],
    );
}

/// `devsync ssh --config-only` for `ep`'s devbox `id`, written to a file for `ssh -F`.
fn config_file(ep: &Endpoint, id: &str, dir: &Path) -> PathBuf {
    let (code, _, err) = ep.run(&["ssh", id, "--config-only"], |_| {});
    assert_eq!(code, 0, "{err}");
    let out = ep
        .cmd()
        .args(["ssh", id, "--config-only"])
        .output()
        .unwrap();
    let block = String::from_utf8(out.stdout).unwrap();
    assert!(block.starts_with(&format!("Host {id}\n")), "{block}");
    assert!(block.contains("StrictHostKeyChecking yes"), "{block}");
    assert!(block.contains(" proxy --gateway "), "{block}");
    let f = dir.join("ssh_config");
    std::fs::write(&f, block).unwrap();
    f
}

/// OpenSSH's `ssh`, `scp` and `rsync -e ssh` with nothing but the config block: no RUNLOOP_*
/// variables, no devsync state besides the key and the pinned host key.
fn openssh_tools_work_with_the_block(ep: &Endpoint, id: &str) {
    if !require(
        has("ssh") && has("scp") && has("rsync"),
        "ssh, scp and rsync",
    ) {
        return;
    }
    let td = tempfile::tempdir().unwrap();
    let cfg = config_file(ep, id, td.path());
    let plain = |prog: &str| {
        let mut c = Command::new(prog);
        c.env("HOME", ep.home.path())
            .env_remove("RUNLOOP_API_KEY")
            .env_remove("RUNLOOP_BASE_URL")
            .env_remove("RUNLOOP_SSH_GATEWAY")
            .env_remove("DEVSYNC_TLS_CA")
            .env_remove("SSH_AUTH_SOCK")
            .stdin(Stdio::null());
        c
    };
    let out = plain("ssh")
        .args(["-F", s(&cfg), id, "echo hi; exit 7"])
        .output()
        .unwrap();
    assert_eq!(
        (out.status.code(), &out.stdout[..]),
        (Some(7), &b"hi\n"[..]),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // 64 MiB each way with scp (the sftp subsystem reports its exit status: scp exits 0).
    let big = td.path().join("big");
    std::fs::write(&big, random_bytes(64 << 20, 9)).unwrap();
    let there = td.path().join("there");
    let back = td.path().join("back");
    for (from, to) in [
        (s(&big).to_string(), format!("{id}:{}", s(&there))),
        (format!("{id}:{}", s(&there)), s(&back).to_string()),
    ] {
        let out = plain("scp")
            .args(["-q", "-F", s(&cfg), &from, &to])
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "scp {from} {to}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(std::fs::read(&back).unwrap() == std::fs::read(&big).unwrap());
    let (src, dst) = (td.path().join("tree"), td.path().join("tree-copy"));
    make_tree(
        &src,
        12,
        &TreeSpec {
            files: 40,
            max_size: 200_000,
            dirs: 5,
            links: 0,
        },
    );
    let out = plain("rsync")
        .args(["-a", "-e", &format!("ssh -F {}", s(&cfg))])
        .arg(format!("{}/", s(&src)))
        .arg(format!("{id}:{}/", s(&dst)))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_entries(&src, &dst);
}

#[test]
fn openssh_client_tools_reach_serve_through_the_proxy() {
    let ep = endpoint(&["dbx_cfg"], None, "user", KeyFormat::Pkcs8);
    openssh_tools_work_with_the_block(&ep, "dbx_cfg");
}

#[test]
fn openssh_client_tools_reach_upstream_openssh_through_the_proxy() {
    let Some(sshd) = crate::openssh::sshd() else {
        return;
    };
    let ep = endpoint(
        &["dbx_cfgup"],
        Some(sshd.addr.to_string()),
        "root",
        KeyFormat::Pkcs8,
    );
    crate::openssh::authorize_devbox(&sshd, &ep, "dbx_cfgup");
    openssh_tools_work_with_the_block(&ep, "dbx_cfgup");
}

#[test]
fn config_only_is_for_devboxes_and_refuses_a_plain_host() {
    let out = crate::common::bin()
        .args(["ssh", "me@example.invalid", "--config-only"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(255));
    assert!(out.stdout.is_empty());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--config-only is for devboxes"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A TLS echo server on loopback with a certificate for `name`; returns its address and CA.
fn tls_echo(dir: &Path, name: &str) -> std::net::SocketAddr {
    use std::sync::Arc;
    let ck = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
    std::fs::write(dir.join("ca.pem"), ck.cert.pem()).unwrap();
    let cert = ck.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
    devsync::transport::tls::install_crypto_provider();
    let cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = rt();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(listener).unwrap();
            // One connection: echo until the client's close_notify, then close.
            let (tcp, _) = l.accept().await.unwrap();
            // A client that refuses our certificate ends it here (the test expects that).
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let (mut r, mut w) = tokio::io::split(tls);
            tokio::io::copy(&mut r, &mut w).await.unwrap();
            tokio::io::AsyncWriteExt::shutdown(&mut w).await.unwrap();
        });
    });
    addr
}

#[test]
fn the_proxy_relays_16k_writes_whole_and_half_closes() {
    let td = tempfile::tempdir().unwrap();
    let addr = tls_echo(td.path(), "gw.devsync.test");
    let mut child = crate::common::bin()
        .args(["proxy", "--gateway", &format!("localhost:{}", addr.port())])
        .arg("--tls-ca")
        .arg(td.path().join("ca.pem"))
        .arg("gw.devsync.test")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let data = random_bytes(16384 * 64, 3);
    let sent = data.clone();
    let writer = std::thread::spawn(move || {
        // Exactly 16,384 bytes per write: the size openssl s_client 3.3–3.6.2 loses data at.
        for chunk in sent.chunks(16384) {
            input.write_all(chunk).unwrap();
            input.flush().unwrap();
        }
        // Dropping stdin: the proxy half-closes; the echo ends; the proxy exits.
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout == data,
        "{} of {} bytes came back",
        out.stdout.len(),
        data.len()
    );
}

#[test]
fn the_proxy_refuses_an_untrusted_gateway() {
    let td = tempfile::tempdir().unwrap();
    let addr = tls_echo(td.path(), "gw.devsync.test");
    let out = crate::common::bin()
        .args(["proxy", "--gateway", &format!("localhost:{}", addr.port())])
        .arg("gw.devsync.test")
        .env_remove("DEVSYNC_TLS_CA")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(255));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--tls-ca"), "{err}");
}

/// A tmux session running `command`, for driving a terminal program.
struct Tmux {
    name: String,
}

impl Tmux {
    fn start(name: &str, command: &str) -> Tmux {
        let ok = Command::new("tmux")
            .args([
                "new-session",
                "-d",
                "-s",
                name,
                "-x",
                "100",
                "-y",
                "30",
                command,
            ])
            .status()
            .unwrap()
            .success();
        assert!(ok, "tmux new-session failed");
        Tmux { name: name.into() }
    }

    fn keys(&self, keys: &str) {
        let ok = Command::new("tmux")
            .args(["send-keys", "-t", &self.name, keys, "Enter"])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    fn screen(&self) -> String {
        let out = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", &self.name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Whether the screen shows `what` within `limit`.
    fn try_wait_for(&self, what: &str, limit: Duration) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if self.screen().contains(what) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Waits (bounded) until the screen shows `what`.
    fn wait_for(&self, what: &str) -> String {
        let t0 = Instant::now();
        loop {
            let screen = self.screen();
            if screen.contains(what) {
                return screen;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "{what:?} never appeared:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn resize(&self, cols: u32, rows: u32) {
        let ok = Command::new("tmux")
            .args(["resize-window", "-t", &self.name])
            .args(["-x", &cols.to_string(), "-y", &rows.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.name])
            .status(); // already gone with its command: fine
    }
}

#[test]
fn an_interactive_shell_on_a_terminal_resizes_and_returns_its_status() {
    if !require(has("tmux"), "tmux") {
        return;
    }
    let ep = endpoint(&["dbx_tty"], None, "user", KeyFormat::Pkcs8);
    // On a connection of its own, which it leaves kept; then through that keeper.
    terminal_session(&ep, "fresh");
    let dir = ep.home.path().join(".local/state/devsync/kept");
    let pid = crate::faults::wait_for_keeper(&dir);
    terminal_session(&ep, "kept");
    assert_eq!(
        crate::faults::live_keeper(&dir),
        Some(pid),
        "a second keeper"
    );
    crate::faults::stop_keeper(&dir);
}

/// One interactive `devsync ssh` in tmux: a terminal, a resize, exit status 3, cooked mode
/// after.
fn terminal_session(ep: &Endpoint, what: &str) {
    let mut c = ep.cmd();
    c.env("DEVSYNC_KEEP_CONNECTION", "60");
    if what == "kept" {
        c.env("DEVSYNC_TRACE", "1"); // to see that it says so
    }
    // The tmux server has its own environment: set and unset exactly what `ep.cmd()` does.
    let env: Vec<String> = c
        .get_envs()
        .filter_map(|(k, v)| match v {
            Some(v) => Some(format!("{}={}", k.to_str()?, v.to_str()?)),
            None => Some(format!("-u {}", k.to_str()?)),
        })
        .collect();
    let mut env = env;
    env.sort_by_key(|e| !e.starts_with("-u ")); // env's options before its assignments
    let td = tempfile::tempdir().unwrap();
    let status = td.path().join("status");
    let name = format!("devsync-tty-{what}-{}", std::process::id());
    let t = Tmux::start(
        &name,
        &format!(
            "env {} {BIN} ssh dbx_tty; echo $? > {}; stty -a > {}.stty; sleep 60",
            env.join(" "),
            s(&status),
            s(&status)
        ),
    );
    if what == "kept" {
        t.wait_for("reusing the kept connection");
    }
    t.keys("echo M$((6*7)); tty");
    // Both lines, however the output was cut into packets.
    let screen = t.wait_for("/dev/pts/");
    assert!(screen.contains("M42"), "{screen}");
    t.keys("stty size");
    t.wait_for("30 100");
    t.resize(120, 40);
    // The new size travels as a window-change request: ask until the remote side has it.
    let t0 = Instant::now();
    loop {
        t.keys("stty size");
        if t.try_wait_for("40 120", Duration::from_millis(500)) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "{}", t.screen());
    }
    t.keys("exit 3");
    let t0 = Instant::now();
    while std::fs::read_to_string(&status).map_or(true, |s| s.trim().is_empty()) {
        assert!(t0.elapsed() < Duration::from_secs(20), "{}", t.screen());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(std::fs::read_to_string(&status).unwrap().trim(), "3");
    // The local terminal is back in cooked mode (the shell writes what stty says next).
    let stty_file = format!("{}.stty", s(&status));
    let t0 = Instant::now();
    let stty = loop {
        let got = std::fs::read_to_string(&stty_file).unwrap_or_default();
        if got.contains("icanon") {
            break got;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no stty output: {got:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        stty.contains(" icanon") && stty.contains(" echo "),
        "{stty}"
    );
}

#[test]
fn openssh_ssh_t_gets_a_terminal_from_serve() {
    if !require(has("tmux") && has("ssh"), "tmux and ssh") {
        return;
    }
    let ep = endpoint(&["dbx_sshtty"], None, "user", KeyFormat::Pkcs8);
    let td = tempfile::tempdir().unwrap();
    let cfg = config_file(&ep, "dbx_sshtty", td.path());
    let status = td.path().join("status");
    let name = format!("devsync-sshtty-{}", std::process::id());
    let t = Tmux::start(
        &name,
        &format!(
            "env HOME={} ssh -F {} -t dbx_sshtty; echo $? > {}; sleep 60",
            s(ep.home.path()),
            s(&cfg),
            s(&status)
        ),
    );
    t.keys("stty size; echo ready");
    t.wait_for("30 100");
    t.keys("exit 4");
    let t0 = Instant::now();
    while std::fs::read_to_string(&status).map_or(true, |s| s.trim().is_empty()) {
        assert!(t0.elapsed() < Duration::from_secs(20), "{}", t.screen());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(std::fs::read_to_string(&status).unwrap().trim(), "4");
}

/// A client that vanishes ends its terminal session on `devsync serve`: the shell and its
/// background jobs (in process groups of their own) are hung up.
#[test]
fn a_vanished_client_hangs_up_its_terminal_session() {
    let ep = endpoint(&["dbx_hup"], None, "user", KeyFormat::Pkcs8);
    let mut c = ep.cmd();
    c.args([
        "ssh",
        "-t",
        "dbx_hup",
        "--",
        "set -m; sleep 1000 & echo PID=$!; wait",
    ])
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    let mut child = c.spawn().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let t0 = Instant::now();
    let pid = loop {
        let mut b = [0u8; 256];
        let n = stdout.read(&mut b).unwrap();
        assert!(n > 0 && t0.elapsed() < Duration::from_secs(20), "{seen:?}");
        seen.extend_from_slice(&b[..n]);
        let text = String::from_utf8_lossy(&seen).into_owned();
        if let Some(rest) = text.split("PID=").nth(1)
            && let Some(end) = rest.find(['\r', '\n'])
        {
            break rest[..end].trim().parse::<u32>().unwrap();
        }
    };
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    child.kill().unwrap(); // ours
    child.wait().unwrap();
    let t0 = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
    {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the background job {pid} outlived its terminal"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
