//! Interop with real OpenSSH: `sshd` (inetd mode, one process per connection accepted on a
//! listener bound here, so no port races) with a generated config and keys. Push and pull
//! over plain SSH and over TLS (`devsync serve --upstream`), the helper bootstrapped through
//! OpenSSH's own sftp-server. `.ci/run` installs openssh-server; without it (or without root,
//! which sshd needs) these tests say so and do nothing, except under `CI=true`, where that is
//! a failure.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use devsync::server::KeyFormat;

use crate::common::*;
use crate::remote::endpoint;

const SSHD: &str = "/usr/sbin/sshd";

pub struct Sshd {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub client_key: PathBuf,
}

fn keygen(path: &Path) {
    keygen_as(path, &["-t", "ed25519"]);
}

/// `ssh-keygen` with `kind` (its `-t` and maybe `-b`), no passphrase, into `path`.
fn keygen_as(path: &Path, kind: &[&str]) {
    let ok = Command::new("ssh-keygen")
        .arg("-q")
        .args(kind)
        .args(["-N", "", "-C", "devsync-test", "-f"])
        .arg(path)
        .status()
        .unwrap()
        .success();
    assert!(ok, "ssh-keygen {kind:?} failed");
}

/// Adds `public` (an OpenSSH public-key line) to what `sshd` lets in.
fn authorize(sshd: &Sshd, public: &str) {
    let auth = sshd.dir.path().join("authorized_keys");
    let mut keys = std::fs::read_to_string(&auth).unwrap();
    keys.push_str(public.trim_end());
    keys.push('\n');
    std::fs::write(&auth, keys).unwrap();
}

/// Lets devbox `id` of endpoint `ep` log in to `sshd` (an upstream behind `serve --upstream`).
pub fn authorize_devbox(sshd: &Sshd, ep: &crate::remote::Endpoint, id: &str) {
    let devbox_pub = ep
        .running
        .state
        .devbox(id)
        .unwrap()
        .public_key
        .to_openssh()
        .unwrap();
    authorize(sshd, &devbox_pub);
}

pub fn sshd() -> Option<Sshd> {
    let ok = Path::new(SSHD).exists() && rustix::process::geteuid().is_root();
    if !require(
        ok,
        &format!("{SSHD} and root for the OpenSSH interop tests"),
    ) {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    keygen(&d.join("host_ed25519"));
    keygen(&d.join("client"));
    std::fs::copy(d.join("client.pub"), d.join("authorized_keys")).unwrap();
    let sftp = [
        "/usr/lib/openssh/sftp-server",
        "/usr/libexec/openssh/sftp-server",
        "/usr/libexec/sftp-server",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .expect("sftp-server");
    std::fs::write(
        d.join("sshd_config"),
        format!(
            "HostKey {d}/host_ed25519\nAuthorizedKeysFile {d}/authorized_keys\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nUsePAM no\nPermitRootLogin prohibit-password\nStrictModes no\n\
             Subsystem sftp {sftp}\nPidFile none\nLogLevel VERBOSE\n",
            d = d.display()
        ),
    )
    .unwrap();
    std::fs::create_dir_all("/run/sshd").unwrap(); // privilege separation directory
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (cfg, log) = (d.join("sshd_config"), d.join("sshd.log"));
    std::thread::spawn(move || {
        // Bounded: no test opens anywhere near this many connections.
        for stream in listener.incoming().take(200) {
            let Ok(stream) = stream else { continue };
            let fd: OwnedFd = stream.into();
            let Ok(fd2) = fd.try_clone() else { continue };
            let child = Command::new(SSHD)
                .arg("-i")
                .arg("-f")
                .arg(&cfg)
                .arg("-E")
                .arg(&log)
                .stdin(Stdio::from(fd))
                .stdout(Stdio::from(fd2))
                .stderr(Stdio::null())
                .spawn();
            if let Ok(mut c) = child {
                std::thread::spawn(move || c.wait());
            }
        }
    });
    let client_key = d.join("client");
    Some(Sshd {
        dir,
        addr,
        client_key,
    })
}

fn run(home: &Path, args: &[&str]) -> (i32, String) {
    let out = crate::common::bin()
        .args(args)
        .env("HOME", home)
        .env_remove("SSH_AUTH_SOCK")
        .env_remove("DEVSYNC_STATE_DIR")
        .env_remove("XDG_STATE_HOME")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Pushes a one-file tree (`x`, holding `content`) from under `td` to `root@` this sshd, as a
/// user whose home is `home`, with `extra` arguments. Returns the exit code, stderr and the
/// remote directory.
fn push_one_file(
    sshd: &Sshd,
    td: &Path,
    home: &Path,
    content: &[u8],
    extra: &[&str],
) -> (i32, String, PathBuf) {
    let (src, remote) = (td.join("src"), td.join("remote"));
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("x"), content).unwrap();
    let dst = format!("root@127.0.0.1:{}:{}", sshd.addr.port(), s(&remote));
    let helpers = td.join("h");
    let mut args = vec!["push", s(&src), &dst, "--remote-dir", s(&helpers)];
    args.extend_from_slice(extra);
    let (code, err) = run(home, &args);
    (code, err, remote)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn push_and_pull_over_plain_openssh() {
    let Some(sshd) = sshd() else { return };
    let td = tempfile::tempdir().unwrap();
    let home = td.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let (src, remote, back) = (
        td.path().join("src"),
        td.path().join("remote"),
        td.path().join("back"),
    );
    let helpers = td.path().join("helpers");
    make_tree(
        &src,
        41,
        &TreeSpec {
            files: 120,
            max_size: 5 << 20,
            dirs: 12,
            links: 6,
        },
    );
    let dst = format!("root@127.0.0.1:{}:{}", sshd.addr.port(), s(&remote));
    let common = ["-I", s(&sshd.client_key), "--remote-dir", s(&helpers)];
    let push = |extra: &[&str]| {
        let mut a = vec!["push", s(&src), &dst];
        a.extend_from_slice(&common);
        a.extend_from_slice(extra);
        run(&home, &a)
    };
    let (code, err) = push(&[]);
    assert_eq!(
        code,
        0,
        "{err}\nsshd log: {}",
        std::fs::read_to_string(sshd.dir.path().join("sshd.log")).unwrap_or_default()
    );
    assert!(err.contains("installing the devsync helper"), "{err}");
    assert_same_tree(&src, &remote);
    let known = std::fs::read_to_string(home.join(".ssh/known_hosts")).unwrap();
    assert!(
        known.contains(&format!("[127.0.0.1]:{}", sshd.addr.port())),
        "{known}"
    );
    // Second run reuses the helper.
    let (code, err) = push(&[]);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("installing"), "{err}");
    // Pull back.
    let mut a = vec!["pull", &dst, s(&back)];
    a.extend_from_slice(&common);
    let (code, err) = run(&home, &a);
    assert_eq!(code, 0, "{err}");
    assert_same_tree(&remote, &back);
    // A changed host key is refused with the fix.
    let original = std::fs::read_to_string(home.join(".ssh/known_hosts")).unwrap();
    let other = td.path().join("otherhost");
    keygen(&other);
    let other_pub = std::fs::read_to_string(other.with_extension("pub")).unwrap();
    std::fs::write(
        home.join(".ssh/known_hosts"),
        format!("[127.0.0.1]:{} {}", sshd.addr.port(), other_pub),
    )
    .unwrap();
    let (code, err) = push(&[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("CHANGED") && err.contains("ssh-keygen -R"),
        "{err}"
    );
    std::fs::write(home.join(".ssh/known_hosts"), original).unwrap();
    // Unknown host with --strict-host-keys: refused.
    let fresh_home = td.path().join("fresh");
    std::fs::create_dir(&fresh_home).unwrap();
    let mut a = vec!["push", s(&src), &dst, "--strict-host-keys"];
    a.extend_from_slice(&common);
    let (code, err) = run(&fresh_home, &a);
    assert_eq!(code, 1);
    assert!(err.contains("--strict-host-keys"), "{err}");
    // Wrong key: a clear authentication error naming what was tried.
    let stranger = td.path().join("stranger");
    keygen(&stranger);
    let (code, err) = run(
        &home,
        &[
            "push",
            s(&src),
            &dst,
            "-I",
            s(&stranger),
            "--remote-dir",
            s(&helpers),
        ],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("SSH authentication as root") && err.contains("stranger"),
        "{err}"
    );
    // A key the server refuses is followed by the next one: keys are offered signed, without
    // asking first (our russh patch), so the refusal comes to the signed request itself.
    std::fs::write(src.join("after-refusal"), b"second key").unwrap();
    let (code, err) = run(
        &home,
        &[
            "push",
            s(&src),
            &dst,
            "-I",
            s(&stranger),
            "-I",
            s(&sshd.client_key),
            "--remote-dir",
            s(&helpers),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        std::fs::read(remote.join("after-refusal")).unwrap(),
        b"second key"
    );
}

#[test]
fn ssh_config_aliases_are_honoured() {
    let Some(sshd) = sshd() else { return };
    let td = tempfile::tempdir().unwrap();
    let home = td.path().join("home");
    std::fs::create_dir_all(home.join(".ssh")).unwrap();
    std::fs::write(
        home.join(".ssh/config"),
        format!(
            "Host devbox-alias\n  HostName 127.0.0.1\n  Port {}\n  User root\n  IdentityFile {}\n",
            sshd.addr.port(),
            sshd.client_key.display()
        ),
    )
    .unwrap();
    let (src, remote) = (td.path().join("src"), td.path().join("remote"));
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("hello"), b"via an alias").unwrap();
    let helpers = td.path().join("helpers");
    let (code, err) = run(
        &home,
        &[
            "push",
            s(&src),
            &format!("devbox-alias:{}", s(&remote)),
            "--remote-dir",
            s(&helpers),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        std::fs::read(remote.join("hello")).unwrap(),
        b"via an alias"
    );
}

#[test]
fn devbox_over_tls_to_an_upstream_openssh() {
    let Some(sshd) = sshd() else { return };
    let ep = endpoint(
        &["dbx_up"],
        Some(sshd.addr.to_string()),
        "root",
        KeyFormat::Pkcs8,
    );
    // The upstream sshd must accept the devbox key.
    authorize_devbox(&sshd, &ep, "dbx_up");
    let td = tempfile::tempdir().unwrap();
    let (src, remote, back) = (
        td.path().join("src"),
        td.path().join("remote"),
        td.path().join("back"),
    );
    make_tree(
        &src,
        43,
        &TreeSpec {
            files: 80,
            max_size: 3 << 20,
            dirs: 8,
            links: 4,
        },
    );
    let helpers = td.path().join("helpers");
    let dst = format!("dbx_up:{}", s(&remote));
    let (code, _, err) = ep.run(
        &["push", s(&src), &dst, "--remote-dir", s(&helpers)],
        |_| {},
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("installing the devsync helper"), "{err}");
    assert_same_tree(&src, &remote);
    let (code, _, err) = ep.run(
        &["pull", &dst, s(&back), "--remote-dir", s(&helpers)],
        |_| {},
    );
    assert_eq!(code, 0, "{err}");
    assert_same_tree(&remote, &back);
}

/// Pushes a one-file tree to `sshd` with only an ssh-agent holding `key` to sign with.
/// Returns the exit code, stderr and the file as it arrived.
fn push_with_agent_key(sshd: &Sshd, key: &Path) -> (Option<i32>, String, Option<Vec<u8>>) {
    let td = tempfile::tempdir().unwrap();
    let sock = td.path().join("agent.sock");
    let mut agent = Command::new("ssh-agent")
        .args(["-D", "-a"])
        .arg(&sock)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !sock.exists() && t0.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let added = Command::new("ssh-add")
        .arg(key)
        .env("SSH_AUTH_SOCK", &sock)
        .output()
        .unwrap();
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    let home = td.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let (src, remote) = (td.path().join("src"), td.path().join("remote"));
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("hello"), b"signed by the agent").unwrap();
    let out = crate::common::bin()
        .args([
            "push",
            s(&src),
            &format!("root@127.0.0.1:{}:{}", sshd.addr.port(), s(&remote)),
        ])
        .args(["--remote-dir", s(&td.path().join("helpers"))])
        .env("HOME", &home)
        .env("SSH_AUTH_SOCK", &sock)
        .output()
        .unwrap();
    let _ = agent.kill();
    let _ = agent.wait();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        std::fs::read(remote.join("hello")).ok(),
    )
}

#[test]
fn ssh_agent_keys_are_used() {
    let Some(sshd) = sshd() else { return };
    let (code, err, got) = push_with_agent_key(&sshd, &sshd.client_key);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(got.as_deref(), Some(&b"signed by the agent"[..]));
}

/// The agent signs RSA keys itself, so they work there; they must ask it for an
/// `rsa-sha2-*` signature: OpenSSH >= 8.8 refuses SHA-1 (`ssh-rsa`) ones by default.
#[test]
fn rsa_keys_in_the_agent_sign_with_sha2() {
    let Some(sshd) = sshd() else { return };
    let td = tempfile::tempdir().unwrap();
    let rsa = td.path().join("rsa");
    keygen_as(&rsa, &["-t", "rsa", "-b", "2048"]);
    authorize(
        &sshd,
        &std::fs::read_to_string(rsa.with_extension("pub")).unwrap(),
    );
    let (code, err, got) = push_with_agent_key(&sshd, &rsa);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(got.as_deref(), Some(&b"signed by the agent"[..]));
    let log = std::fs::read_to_string(sshd.dir.path().join("sshd.log")).unwrap();
    assert!(
        log.contains("Accepted publickey") && log.contains("RSA SHA256:"),
        "{log}"
    );
}

#[test]
fn default_identity_files_are_tried() {
    let Some(sshd) = sshd() else { return };
    let td = tempfile::tempdir().unwrap();
    let home = td.path().join("home");
    std::fs::create_dir_all(home.join(".ssh")).unwrap();
    std::fs::copy(&sshd.client_key, home.join(".ssh/id_ed25519")).unwrap();
    std::fs::set_permissions(
        home.join(".ssh/id_ed25519"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let (code, err, remote) = push_one_file(&sshd, td.path(), &home, b"default key", &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read(remote.join("x")).unwrap(), b"default key");
}

/// An RSA key, which this build cannot sign with, is refused up front with what to do
/// (it used to load, then fail at signing, which closed the connection).
#[test]
fn rsa_keys_are_refused_with_the_fix() {
    let Some(sshd) = sshd() else { return };
    let td = tempfile::tempdir().unwrap();
    let home = td.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let rsa = td.path().join("rsa");
    keygen_as(&rsa, &["-t", "rsa", "-b", "2048"]);
    // Known to the server, so only devsync's refusal can be why it is not used.
    authorize(
        &sshd,
        &std::fs::read_to_string(rsa.with_extension("pub")).unwrap(),
    );
    let (code, err, remote) = push_one_file(&sshd, td.path(), &home, b"rsa key", &["-I", s(&rsa)]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("is an `ssh-rsa` key") && err.contains("ssh-keygen -t ed25519"),
        "{err}"
    );
    assert!(!remote.exists());
}
