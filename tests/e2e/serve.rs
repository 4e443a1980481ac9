//! `devsync serve` as a host for several devboxes: sessions confined to their own devbox,
//! helpers that end with their client, connections that do nothing closed, a state directory
//! only its owner can read.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use devsync::server::{Isolation, Limits};

use crate::common::*;
use crate::remote::{Endpoint, Opts, endpoint_with};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs `command` on `devbox` through OpenSSH's own client, TLS-wrapped by `openssl s_client`
/// as the official CLI does it; returns (exit code, stdout, stderr).
fn openssh_exec(ep: &Endpoint, devbox: &str, command: &str) -> (i32, String, String) {
    let key = ep
        .home
        .path()
        .join(format!(".runloop/ssh_keys/{devbox}.pem"));
    assert!(key.exists(), "fetch the key first (a push does)");
    let proxy = format!(
        "openssl s_client -quiet -servername {devbox}.devsync.test -connect {} 2>/dev/null",
        ep.gateway
    );
    let out = Command::new("ssh")
        .args(["-F", "/dev/null", "-i", s(&key)])
        .args(["-o", &format!("ProxyCommand={proxy}")])
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
        ])
        .args(["-o", "BatchMode=yes", "-o", "LogLevel=ERROR"])
        .arg(format!("user@{devbox}"))
        .arg(command)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn devbox_sessions_cannot_reach_other_devboxes_or_the_state() {
    if !require(
        rustix::process::geteuid().is_root(),
        "root (devboxes run as their own users)",
    ) {
        return;
    }
    let ep = endpoint_with(Opts {
        devboxes: vec!["dbx_a".into(), "dbx_b".into()],
        isolation: Isolation::Users {
            base: 230_000,
            accounts: Default::default(),
        },
        ..Opts::default()
    });
    let td = tempfile::tempdir().unwrap();
    let src = td.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("secret-of-b"), b"b's data").unwrap();
    // Both devboxes work, home-relative, with their own files.
    for d in ["dbx_a", "dbx_b"] {
        let (code, _, err) = ep.run(&["push", s(&src), &format!("{d}:proj")], |_| {});
        assert_eq!(code, 0, "{d}: {err}");
    }
    let state = ep.state_dir.path();
    let b_home = state.join("homes/dbx_b");
    assert!(b_home.join("proj/secret-of-b").exists());
    use std::os::unix::fs::MetadataExt;
    let a_uid = std::fs::metadata(state.join("homes/dbx_a")).unwrap().uid();
    let b_uid = std::fs::metadata(&b_home).unwrap().uid();
    assert!(a_uid >= 230_000 && b_uid >= 230_000 && a_uid != b_uid);
    // A pull from each devbox reads back its own files.
    let back = td.path().join("back");
    let (code, _, err) = ep.run(&["pull", "dbx_a:proj", s(&back)], |_| {});
    assert_eq!(code, 0, "{err}");
    assert_same_entries(&src, &back);
    // From a session on dbx_a: who am I, and what can I not read.
    let (code, out, err) = openssh_exec(&ep, "dbx_a", "id -u");
    assert_eq!((code, out.trim()), (0, a_uid.to_string().as_str()), "{err}");
    for victim in [
        b_home.join("proj/secret-of-b"),
        state.join("devboxes/dbx_b/key.pem"),
        state.join("devboxes/dbx_a/key.pem"),
        state.join("ca-key.pem"),
        state.join("host_key.pem"),
        "/etc/shadow".into(),
    ] {
        let (code, out, err) = openssh_exec(&ep, "dbx_a", &format!("cat '{}'", victim.display()));
        assert_ne!(code, 0, "dbx_a read {victim:?}: {out}");
        assert!(err.contains("Permission denied"), "{victim:?}: {err}");
    }
    let (code, out, _) = openssh_exec(&ep, "dbx_a", &format!("ls '{}'", state.display()));
    assert_ne!(code, 0, "listed the state directory: {out}");
    // Nothing of the endpoint's environment reaches the session.
    let (_, env, _) = openssh_exec(&ep, "dbx_a", "env");
    assert!(!env.contains("RUNLOOP") && !env.contains("TOKEN"), "{env}");
    // SFTP runs with the same rights (OpenSSH's sftp client, in batch mode).
    let key = ep.home.path().join(".runloop/ssh_keys/dbx_a.pem");
    let proxy = format!(
        "ProxyCommand=openssl s_client -quiet -servername dbx_a.devsync.test -connect {} 2>/dev/null",
        ep.gateway
    );
    let batch = td.path().join("batch");
    std::fs::write(
        &batch,
        format!(
            "get /etc/shadow {0}/shadow\nget {1}/proj/secret-of-b {0}/stolen\n",
            td.path().display(),
            b_home.display()
        ),
    )
    .unwrap();
    let out = Command::new("sftp")
        .args(["-F", "/dev/null", "-i", s(&key), "-o", &proxy])
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
        ])
        .args(["-b", s(&batch), "user@dbx_a"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(!td.path().join("shadow").exists() && !td.path().join("stolen").exists());
}

#[test]
fn serve_refuses_two_devboxes_that_would_share_a_user() {
    let state = tempfile::tempdir().unwrap();
    let out = crate::common::bin()
        .args([
            "serve",
            "--no-isolation",
            "--print-env",
            "--devbox",
            "dbx_1",
        ])
        .args(["--devbox", "dbx_2", "--state", s(state.path())])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("more than one devbox as one user"), "{err}");
}

#[test]
fn state_is_private_whatever_the_umask_and_tokens_are_never_empty() {
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().join("st");
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "umask 000; exec {BIN} serve --no-isolation --print-env --devbox dbx_u --state {}",
            dir.display()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let env = String::from_utf8_lossy(&out.stdout);
    assert!(env.starts_with("export RUNLOOP_BASE_URL="), "{env}");
    // The printed line is meant for eval: a shell can run it.
    let check = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{env}\ntest -n \"$RUNLOOP_API_KEY\" && test -f \"$DEVSYNC_TLS_CA\""
        ))
        .status()
        .unwrap();
    assert!(check.success(), "{env}");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    for d in ["", "devboxes", "devboxes/dbx_u", "homes", "homes/dbx_u"] {
        assert_eq!(mode(&dir.join(d)), 0o700, "{d}");
    }
    for f in [
        "token",
        "host_key.pem",
        "ca-key.pem",
        "devboxes/dbx_u/key.pem",
    ] {
        assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
    }
    let token = std::fs::read_to_string(dir.join("token")).unwrap();
    assert_eq!(token.trim().len(), 48, "24 random bytes: {token}");
    for blank in ["", "  \t"] {
        let out = crate::common::bin()
            .args(["serve", "--print-env", "--token", blank, "--state", s(&dir)])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{blank:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--token must not be empty"),
            "{blank:?}: {err}"
        );
    }
}

/// An HTTP request to the endpoint's API; the status code.
fn http_status(api: std::net::SocketAddr, method: &str, path: &str) -> u16 {
    let mut c = TcpStream::connect(api).unwrap();
    write!(
        c,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer test-token\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    c.read_to_string(&mut resp).unwrap();
    resp.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn reading_a_devbox_never_creates_it() {
    let ep = endpoint_with(Opts {
        create_on_demand: true,
        ..Opts::default()
    });
    assert_eq!(http_status(ep.api, "GET", "/v1/devboxes/dbx_new"), 404);
    assert!(ep.running.state.devbox("dbx_new").is_none());
    assert_eq!(
        http_status(ep.api, "POST", "/v1/devboxes/dbx_new/create_ssh_key"),
        200
    );
    assert_eq!(http_status(ep.api, "GET", "/v1/devboxes/dbx_new"), 200);
    // Sessions share the serving user here: a second devbox is refused, not created.
    assert_eq!(
        http_status(ep.api, "POST", "/v1/devboxes/dbx_other/create_ssh_key"),
        403
    );
}

/// Waits (bounded) until the peer closes `c`; how long that took.
fn closed_within(c: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    c.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut b = [0u8; 256];
    while start.elapsed() < limit {
        match c.read(&mut b) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return Some(start.elapsed()),
        }
    }
    None
}

#[test]
fn idle_and_trickling_connections_are_closed_and_capped() {
    let limits = Limits {
        per_address: 30,
        first_bytes: Duration::from_millis(600),
        auth: Duration::from_millis(1500),
        api_connection: Duration::from_secs(3),
    };
    let ep = endpoint_with(Opts {
        devboxes: vec!["dbx_idle".into()],
        limits,
        ..Opts::default()
    });
    let bound = Duration::from_secs(5);
    // Idle API connections and gateway connections that never say hello.
    let mut idle: Vec<TcpStream> = (0..10)
        .flat_map(|_| {
            [
                TcpStream::connect(ep.api).unwrap(),
                TcpStream::connect(ep.gateway).unwrap(),
            ]
        })
        .collect();
    // One that trickles a header byte every 200 ms.
    let mut trickle = TcpStream::connect(ep.api).unwrap();
    let start = Instant::now();
    let trickler = std::thread::spawn(move || {
        for b in b"GET /v1/devboxes/dbx_idle HTTP/1.1\r\nHost: x\r\n".iter() {
            if trickle.write_all(&[*b]).is_err() {
                return start.elapsed();
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("a trickling client was served for {:?}", start.elapsed());
    });
    for c in &mut idle {
        let t = closed_within(c, bound).expect("an idle connection stayed open");
        assert!(t < bound, "{t:?}");
    }
    let t = trickler.join().unwrap();
    assert!(t < Duration::from_secs(4), "{t:?}");
    // TLS done, then nothing: closed after the first-bytes limit.
    let mut silent = tls_to_gateway(&ep, "dbx_idle");
    assert!(
        closed_within_tls(&mut silent, bound),
        "silent after TLS stayed open"
    );
    // More connections than an address may hold: the extra ones are closed at once, at the
    // gateway and at the API alike.
    for (what, addr) in [("gateway", ep.gateway), ("API", ep.api)] {
        let held: Vec<TcpStream> = (0..limits.per_address)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        // Let the server take them all before the one over the cap.
        std::thread::sleep(Duration::from_millis(100));
        let mut extra = TcpStream::connect(addr).unwrap();
        // At once: well before the first-bytes limit would close it anyway.
        let t = closed_within(&mut extra, Duration::from_millis(500));
        assert!(
            t.is_some_and(|t| t < limits.first_bytes / 2),
            "{what}: connection over the per-address cap was kept ({t:?})"
        );
        drop(held);
    }
}

fn tls_to_gateway(
    ep: &Endpoint,
    devbox: &str,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    devsync::transport::tls::install_crypto_provider();
    let policy = devsync::transport::tls::TlsPolicy {
        extra_ca: Some(ep.ca()),
        insecure: false,
    };
    let cfg = devsync::transport::tls::client_config(&policy, None).unwrap();
    let name = rustls::pki_types::ServerName::try_from(format!("{devbox}.devsync.test")).unwrap();
    let conn = rustls::ClientConnection::new(cfg, name).unwrap();
    let tcp = TcpStream::connect(ep.gateway).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).unwrap();
    }
    tls
}

fn closed_within_tls(
    tls: &mut rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    limit: Duration,
) -> bool {
    let start = Instant::now();
    tls.sock
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut b = [0u8; 512];
    while start.elapsed() < limit {
        match tls.read(&mut b) {
            Ok(0) => return true,
            // The server's SSH banner may come first; then the close.
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

/// Helpers whose client is SIGKILLed (while they receive, or while they send a pull) end
/// within seconds: the endpoint closes their stdio and signals them.
#[test]
fn helpers_end_when_their_client_is_killed() {
    let ep = endpoint_with(Opts {
        devboxes: vec!["dbx_orphan".into()],
        ..Opts::default()
    });
    let td = tempfile::tempdir().unwrap();
    let src = td.path().join("src");
    std::fs::create_dir(&src).unwrap();
    for i in 0..12u64 {
        std::fs::write(src.join(format!("f{i}")), random_bytes(8 << 20, i)).unwrap();
    }
    let remote = td.path().join("remote");
    let target = format!("dbx_orphan:{}", remote.display());
    let (code, _, err) = ep.run(&["push", s(&src), &target], |_| {});
    assert_eq!(code, 0, "{err}");
    let helpers = ep.state_dir.path().join("homes/dbx_orphan/.cache/devsync");
    let mut trials = 0;
    for (i, pull) in [false, true, false, true, false, true]
        .into_iter()
        .enumerate()
    {
        let back = td.path().join(format!("back{i}"));
        let fresh = td.path().join(format!("fresh{i}"));
        std::fs::create_dir(&fresh).unwrap();
        std::fs::write(fresh.join("x"), random_bytes(40 << 20, 99 + i as u64)).unwrap();
        let args: Vec<String> = if pull {
            vec!["pull".into(), target.clone(), s(&back).into()]
        } else {
            vec!["push".into(), s(&fresh).into(), format!("{target}{i}")]
        };
        let mut child = ep.cmd().args(&args).stderr(Stdio::null()).spawn().unwrap();
        // Kill the client once a helper is busy.
        let start = Instant::now();
        let mut seen = false;
        while start.elapsed() < Duration::from_secs(20) {
            let running = crate::remote::processes_running_from(&helpers);
            if let Some(&h) = running.first()
                && io_bytes(h.as_raw_nonzero().get() as u32).unwrap_or(0) > (2 << 20)
            {
                seen = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = child.kill(); // SIGKILL; it may have finished already
        let _ = child.wait();
        if !seen {
            continue;
        }
        trials += 1;
        let gone = Instant::now();
        while !crate::remote::processes_running_from(&helpers).is_empty() {
            assert!(
                gone.elapsed() < Duration::from_secs(10),
                "a helper outlived its client by 10 s (trial {i}, pull: {pull})"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "trial {i} (pull: {pull}): helper ended {:?} after its client",
            gone.elapsed()
        );
    }
    assert!(trials >= 4, "only {trials} trials caught a busy helper");
}

/// Failed logins are in the endpoint's log (with the user and key), as the README says.
#[test]
fn failed_logins_are_logged() {
    let td = tempfile::tempdir().unwrap();
    let serve = ServeProc::start(&td.path().join("state"), "dbx_log");
    let home = td.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let src = td.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("f"), b"x").unwrap();
    let mut c = crate::common::bin();
    serve.env(&mut c, &home);
    let target = format!("mallory@dbx_log:{}", td.path().join("r").display());
    let out = c.args(["push", s(&src), &target]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let start = Instant::now();
    loop {
        let log = serve.log.lock().unwrap().clone();
        if log.contains("AUTH FAILURE for user \"mallory\"") {
            assert!(log.contains("SHA256:"), "the key is named: {log}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "not logged: {log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An error's causes are printed once each (many messages name their cause, which their type
/// also hands on as its source; printed as a chain, it used to appear twice).
#[test]
fn an_error_names_its_cause_once() {
    let td = tempfile::tempdir().unwrap();
    let file = td.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let out = crate::common::bin()
        .args(["serve", "--no-isolation", "--print-env", "--state"])
        .arg(file.join("state"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("Not a directory").count(), 1, "{err}");
    assert!(err.starts_with("devsync: error: "), "{err}");
}
