//! The real binary against the embedded endpoint (`devsync serve` as a library, listeners bound
//! here on 127.0.0.1:0): devbox targets end to end through the key API, TLS gateway, SSH, the
//! helper bootstrap, and the failure paths.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use devsync::server::{self, Isolation, KeyFormat, Listeners, Running, ServeConfig, StateOptions};

use crate::common::*;

pub struct Endpoint {
    /// Runs the endpoint's tasks while the test thread waits on client processes.
    pub _rt: tokio::runtime::Runtime,
    pub running: Running,
    pub gateway: SocketAddr,
    pub api: SocketAddr,
    /// `http` or `https`.
    pub api_scheme: &'static str,
    pub state_dir: tempfile::TempDir,
    /// `HOME` of client processes (key cache, pins, devsync state).
    pub home: tempfile::TempDir,
}

/// How a test endpoint is set up.
pub struct Opts {
    pub devboxes: Vec<String>,
    pub upstream: Option<String>,
    pub user: String,
    pub key_format: KeyFormat,
    pub create_on_demand: bool,
    pub cert: Option<(PathBuf, PathBuf)>,
    /// Reuse a state directory (restart); default a fresh one.
    pub state_dir: Option<tempfile::TempDir>,
    /// Serve the API over TLS.
    pub api_tls: bool,
    pub isolation: Isolation,
    pub limits: devsync::server::Limits,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            devboxes: vec![],
            upstream: None,
            user: "user".into(),
            key_format: KeyFormat::Pkcs8,
            create_on_demand: false,
            cert: None,
            state_dir: None,
            api_tls: false,
            isolation: Isolation::SharedUser,
            limits: devsync::server::Limits::default(),
        }
    }
}

pub fn endpoint(
    devboxes: &[&str],
    upstream: Option<String>,
    user: &str,
    key_format: KeyFormat,
) -> Endpoint {
    endpoint_with(Opts {
        devboxes: devboxes.iter().map(|s| s.to_string()).collect(),
        upstream,
        user: user.into(),
        key_format,
        ..Opts::default()
    })
}

pub fn endpoint_with(o: Opts) -> Endpoint {
    devsync::transport::tls::install_crypto_provider();
    let rt = rt();
    let api_scheme = if o.api_tls { "https" } else { "http" };
    let state_dir = o.state_dir.unwrap_or_else(|| tempfile::tempdir().unwrap());
    let home = tempfile::tempdir().unwrap();
    let (running, gateway, api) = rt.block_on(async {
        let gw = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (ga, aa) = (gw.local_addr().unwrap(), api.local_addr().unwrap());
        let cfg = ServeConfig {
            state: StateOptions {
                dir: state_dir.path().to_path_buf(),
                domain: "devsync.test".into(),
                token: Some("test-token".into()),
                default_user: o.user,
                create_on_demand: o.create_on_demand,
                key_format: o.key_format,
                devboxes: o.devboxes,
                isolation: o.isolation,
            },
            cert: o.cert,
            gateway_names: vec![],
            upstream: o.upstream,
            auth_rejection: Duration::from_millis(10),
            api_tls: o.api_tls,
            exe: BIN.into(),
            limits: o.limits,
        };
        (
            server::start(Listeners { gateway: gw, api }, cfg).unwrap(),
            ga,
            aa,
        )
    });
    Endpoint {
        _rt: rt,
        running,
        gateway,
        api,
        api_scheme,
        state_dir,
        home,
    }
}

impl Endpoint {
    pub fn ca(&self) -> PathBuf {
        self.running.state.ca_path()
    }

    pub fn cmd(&self) -> Command {
        let mut c = crate::common::bin();
        c.env("HOME", self.home.path())
            .env(
                "RUNLOOP_BASE_URL",
                format!("{}://{}", self.api_scheme, self.api),
            )
            .env("RUNLOOP_SSH_GATEWAY", self.gateway.to_string())
            .env("RUNLOOP_API_KEY", "test-token")
            .env("DEVSYNC_TLS_CA", self.ca())
            .env_remove("SSH_AUTH_SOCK")
            .env_remove("DEVSYNC_STATE_DIR")
            .env_remove("XDG_STATE_HOME")
            .env_remove("DEVSYNC_REMOTE_DIR");
        c
    }

    /// Runs `devsync <args>` and returns (exit code, stdout json or null, stderr).
    pub fn run(
        &self,
        args: &[&str],
        tweak: impl FnOnce(&mut Command),
    ) -> (i32, serde_json::Value, String) {
        let mut c = self.cmd();
        c.args(args);
        tweak(&mut c);
        let out: Output = c.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        (out.status.code().unwrap_or(-1), json, stderr)
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `dir/src` holding one file `f` with `body`: the tree the connection tests push.
fn one_file_tree(dir: &Path, body: &[u8]) -> PathBuf {
    let src = dir.join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("f"), body).unwrap();
    src
}

#[test]
fn devbox_push_pull_with_bootstrap_then_reuse() {
    let ep = endpoint(&["dbx_one"], None, "user", KeyFormat::Pkcs8);
    let td = tempfile::tempdir().unwrap();
    let (src, back) = (td.path().join("src"), td.path().join("back"));
    let remote = td.path().join("remote dir");
    make_tree(
        &src,
        31,
        &TreeSpec {
            files: 150,
            max_size: 6 << 20,
            dirs: 15,
            links: 8,
        },
    );
    let dst = format!("dbx_one:{}", s(&remote));
    let (code, v, err) = ep.run(&["push", "--json", s(&src), &dst], |_| {});
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("installing the devsync helper"),
        "first run uploads: {err}"
    );
    assert!(err.contains("pinned the host key"), "{err}");
    assert_same_tree(&src, &remote);
    assert_eq!(num(&v, "files"), 150);
    // The key is cached where the official CLI keeps it, private.
    let key = ep.home.path().join(".runloop/ssh_keys/dbx_one.pem");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    // Second run: the cached key and the installed helper are reused; nothing to transfer.
    let (code, v, err) = ep.run(&["push", "--json", s(&src), &dst], |_| {});
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("installing"), "helper re-uploaded: {err}");
    assert_eq!(num(&v, "literal_bytes"), 0, "{v}");
    // Edit one big file: a delta over the network.
    let big = walkdir::WalkDir::new(&src)
        .into_iter()
        .filter_map(Result::ok)
        .find(|e| e.file_type().is_file() && e.metadata().unwrap().len() > 1 << 20)
        .unwrap()
        .into_path();
    let mut data = std::fs::read(&big).unwrap();
    data[500_000..500_100].fill(7);
    std::fs::write(&big, &data).unwrap();
    let (code, v, err) = ep.run(&["push", "--json", s(&src), &dst], |_| {});
    assert_eq!(code, 0, "{err}");
    assert!(num(&v, "bytes_sent") < 100_000, "{v}");
    assert_same_tree(&src, &remote);
    // Pull it back.
    let (code, _, err) = ep.run(&["pull", "--json", &dst, s(&back)], |_| {});
    assert_eq!(code, 0, "{err}");
    assert_same_tree(&remote, &back);
}

#[test]
fn compression_through_the_gateway_is_reported_and_can_be_turned_off() {
    let ep = endpoint(&["dbx_zip"], None, "user", KeyFormat::Pkcs8);
    let td = tempfile::tempdir().unwrap();
    let src = td.path().join("src");
    std::fs::create_dir(&src).unwrap();
    for i in 0..200 {
        let body: String = (0..150)
            .map(|l| format!("export function f{l}(x) {{ return x * {i} + {l}; }}\n"))
            .collect();
        std::fs::write(src.join(format!("m{i}.js")), body).unwrap();
    }
    std::fs::write(src.join("photo.jpg"), random_bytes(2 << 20, 4)).unwrap();
    let remote = td.path().join("remote");
    let dst = format!("dbx_zip:{}", s(&remote));
    let (code, v, err) = ep.run(&["push", "--json", "--compress=3", s(&src), &dst], |_| {});
    assert_eq!(code, 0, "{err}");
    assert_same_tree(&src, &remote);
    let (wire, raw) = (num(&v, "bytes_sent"), num(&v, "bytes_sent_uncompressed"));
    // The text shrinks many times over; the random "photo" goes as it is.
    assert!(raw > wire + (1 << 20), "{v}");
    assert!(wire > 2 << 20, "{v}");
    assert!(v["compression_ratio"].as_f64().unwrap() > 1.5, "{v}");
    // Off: nothing is compressed, the text summary says nothing about it.
    let remote2 = td.path().join("remote2");
    let dst2 = format!("dbx_zip:{}", s(&remote2));
    let (code, v, err) = ep.run(
        &["push", "--json", "--compress=off", s(&src), &dst2],
        |_| {},
    );
    assert_eq!(code, 0, "{err}");
    assert_same_tree(&src, &remote2);
    assert_eq!(
        num(&v, "bytes_sent"),
        num(&v, "bytes_sent_uncompressed"),
        "{v}"
    );
    assert!(v["compression_ratio"].is_null(), "{v}");
    // The text summary names both figures when it compressed.
    let back = td.path().join("back");
    let out = ep
        .cmd()
        .args(["pull", "--compress=19", &dst, s(&back)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("before compression"), "{text}");
    assert_same_tree(&src, &td.path().join("back"));
    // A setting that is not one is a usage error before anything connects.
    let (code, _, err) = ep.run(&["push", "--compress=fast", s(&src), &dst], |_| {});
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("auto, off or a zstd level"), "{err}");
}

#[test]
fn a_big_push_leaves_what_it_learned_about_the_link_for_the_next() {
    let ep = endpoint(&["dbx_memo"], None, "user", KeyFormat::Pkcs8);
    let td = tempfile::tempdir().unwrap();
    let src = td.path().join("src");
    std::fs::create_dir(&src).unwrap();
    // 23 MB of source-like text: past the 16 MiB a session must write to be remembered.
    for i in 0..64 {
        let body: String = (0..8_000)
            .map(|l| format!("fn f{l}_{i}(x: u64) -> u64 {{ x.wrapping_mul({l}) ^ {i} }}\n"))
            .collect();
        std::fs::write(src.join(format!("m{i}.rs")), body).unwrap();
    }
    let links = ep.home.path().join(".local/state/devsync/links");
    let small = td.path().join("small");
    std::fs::create_dir(&small).unwrap();
    std::fs::write(small.join("f"), b"tiny").unwrap();
    // A small push teaches nothing.
    let dst = |d: &str| format!("dbx_memo:{}", s(&td.path().join(d)));
    let (code, _, err) = ep.run(&["push", "--json", s(&small), &dst("r0")], |_| {});
    assert_eq!(code, 0, "{err}");
    assert!(!links.exists(), "a small push left a record");
    let (code, v, err) = ep.run(&["push", "--json", s(&src), &dst("r1")], |_| {});
    assert_eq!(code, 0, "{err}");
    assert!(num(&v, "bytes_sent_uncompressed") > 16 << 20, "{v}");
    let records: Vec<_> = std::fs::read_dir(&links).unwrap().collect();
    assert_eq!(records.len(), 1, "one record for the one host");
    let text = std::fs::read_to_string(records[0].as_ref().unwrap().path()).unwrap();
    let fields: Vec<u64> = text
        .split_whitespace()
        .map(|f| f.parse().unwrap())
        .collect();
    assert!(
        fields.len() == 2 && [0, 1, 3, 6, 9].contains(&fields[0]),
        "{text:?}"
    );
    // The next push to the same host starts there.
    let (code, _, err) = ep.run(&["push", "--json", s(&small), &dst("r2")], |c| {
        c.env("DEVSYNC_TRACE", "1");
    });
    assert_eq!(code, 0, "{err}");
    let said = format!("starting at level {} (remembered for this host", fields[0]);
    assert!(err.contains(&said), "{err}");
    assert_same_tree(&src, &td.path().join("r1"));
}

#[test]
fn devbox_key_formats_and_refetch_of_a_refused_cached_key() {
    let ep = endpoint(&["dbx_fmt"], None, "user", KeyFormat::OpenSsh);
    let td = tempfile::tempdir().unwrap();
    let src = one_file_tree(td.path(), b"x");
    let dst = format!("dbx_fmt:{}", s(&td.path().join("r")));
    let (code, _, err) = ep.run(&["push", s(&src), &dst], |_| {});
    assert_eq!(code, 0, "OpenSSH-format key: {err}");
    // Replace the cached key with a stranger's: refused, fetched again, sync goes through.
    let key = ep.home.path().join(".runloop/ssh_keys/dbx_fmt.pem");
    std::fs::write(&key, include_str!("../../fixtures/keys/p256-sec1.pem")).unwrap();
    let (code, _, err) = ep.run(&["push", s(&src), &dst], |_| {});
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("was refused; fetching a fresh one"), "{err}");
    assert_ne!(
        std::fs::read_to_string(&key).unwrap(),
        include_str!("../../fixtures/keys/p256-sec1.pem")
    );
    // A cached key readable by others is refused with the fix.
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let (code, _, err) = ep.run(&["push", s(&src), &dst], |_| {});
    assert_eq!(code, 1);
    assert!(err.contains("chmod 600"), "{err}");
}

#[test]
fn devbox_failures_are_clear() {
    let ep = endpoint(&["dbx_bad"], None, "user", KeyFormat::Pkcs8);
    let td = tempfile::tempdir().unwrap();
    let src = one_file_tree(td.path(), b"x");
    let remote = td.path().join("r");
    let dst = format!("dbx_bad:{}", s(&remote));
    let check = |code: i32, err: &str, want: &str| {
        assert_eq!(code, 1, "{want}: {err}");
        assert!(err.contains(want), "want {want:?} in: {err}");
        assert!(!err.contains("panicked"), "{err}");
    };
    let (code, _, err) = ep.run(&["push", s(&src), &dst], |c| {
        c.env("RUNLOOP_API_KEY", "wrong");
    });
    check(code, &err, "refused RUNLOOP_API_KEY (401");
    let (code, _, err) = ep.run(&["push", s(&src), "dbx_missing:/tmp/x"], |_| {});
    check(code, &err, "devbox dbx_missing not found (404");
    let (code, _, err) = ep.run(&["push", s(&src), &dst], |c| {
        c.env_remove("RUNLOOP_API_KEY");
    });
    check(code, &err, "RUNLOOP_API_KEY is not set");
    // Nothing listens on port 1.
    let (code, _, err) = ep.run(&["push", s(&src), &dst], |c| {
        c.env("RUNLOOP_SSH_GATEWAY", "127.0.0.1:1");
    });
    check(code, &err, "connecting to 127.0.0.1:1");
    // Without our CA the gateway's certificate is not trusted; --insecure-tls proceeds.
    let (code, _, err) = ep.run(&["push", s(&src), &dst], |c| {
        c.env_remove("DEVSYNC_TLS_CA");
    });
    check(code, &err, "--tls-ca");
    let (code, _, err) = ep.run(&["push", "--insecure-tls", s(&src), &dst], |c| {
        c.env_remove("DEVSYNC_TLS_CA");
    });
    assert_eq!(code, 0, "{err}");
    // A certificate for other names is refused (wrong CA of another endpoint here).
    let other = endpoint(&["dbx_bad"], None, "user", KeyFormat::Pkcs8);
    let (code, _, err) = ep.run(&["push", s(&src), &dst], |c| {
        c.env("DEVSYNC_TLS_CA", other.ca());
    });
    check(code, &err, "certificate");
    // Wrong login user: authentication fails even with a fresh key.
    let (code, _, err) = ep.run(&["push", s(&src), &format!("mallory@{dst}")], |_| {});
    check(
        code,
        &err,
        "SSH authentication as mallory on dbx_bad failed",
    );
    // States that will not become running.
    for state in ["failure", "shutdown", "suspended"] {
        ep.running.state.set_status("dbx_bad", state).unwrap();
        let (code, _, err) = ep.run(&["push", s(&src), &dst], |_| {});
        check(code, &err, &format!("devbox dbx_bad is {state}"));
    }
    // A devbox that is still starting is waited for, visibly: the status flips to running
    // only once the client has said it is waiting.
    ep.running
        .state
        .set_status("dbx_bad", "provisioning")
        .unwrap();
    let mut client = ep
        .cmd()
        .args(["push", s(&src), &dst])
        .env("DEVSYNC_POLL_INTERVAL_MS", "100")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(client.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        let n = std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
        assert!(n > 0, "the client ended without waiting: {seen}");
        seen.push_str(&line);
        if line.contains("devbox dbx_bad is provisioning; waiting") {
            break;
        }
    }
    ep.running.state.set_status("dbx_bad", "running").unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    let status = client.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{seen}{rest}");
    // Host key change: the pin no longer matches.
    let pins = ep.home.path().join(".local/state/devsync/known_hosts");
    let pinned = std::fs::read_to_string(&pins).unwrap();
    let other_key = other
        .running
        .state
        .host_key
        .public_key()
        .to_openssh()
        .unwrap();
    std::fs::write(&pins, format!("dbx_bad {other_key}\n")).unwrap();
    let (code, _, err) = ep.run(&["push", s(&src), &dst], |_| {});
    check(code, &err, "HOST KEY OF DEVBOX DBX_BAD CHANGED");
    assert!(
        err.contains("ssh-keygen -R"),
        "says how to clear the pin: {err}"
    );
    std::fs::write(&pins, pinned).unwrap();
    let (code, _, err) = ep.run(&["push", s(&src), &dst], |_| {});
    assert_eq!(code, 0, "{err}");
}

#[test]
fn helper_killed_mid_sync_leaves_no_partial_files() {
    let ep = endpoint(&["dbx_kill"], None, "user", KeyFormat::Pkcs8);
    let td = tempfile::tempdir().unwrap();
    let src = td.path().join("src");
    let remote = td.path().join("r");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("warmup"), b"x").unwrap();
    let dst = format!("dbx_kill:{}", s(&remote));
    let (code, _, err) = ep.run(&["push", s(&src), &dst], |_| {});
    assert_eq!(code, 0, "{err}");
    for i in 0..24u64 {
        std::fs::write(src.join(format!("big{i}")), random_bytes(16 << 20, i)).unwrap();
    }
    let child = ep
        .cmd()
        .args(["push", s(&src), &dst])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Kill the remote helper as soon as it is receiving.
    let helper_dir = ep.state_dir.path().join("homes/dbx_kill/.cache/devsync");
    let started = Instant::now();
    let mut killed = false;
    while started.elapsed() < Duration::from_secs(30) && !killed {
        for pid in processes_running_from(&helper_dir) {
            if remote.join("big0").exists()
                || remote.read_dir().map(|d| d.count() > 1).unwrap_or(false)
            {
                // Already gone is fine: the loop looks again.
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                killed = true;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(killed, "helper never seen");
    assert_ne!(out.status.code(), Some(0), "sync claimed success: {err}");
    assert!(err.contains("error"), "{err}");
    // Every file at a final path is complete.
    for e in std::fs::read_dir(&remote).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        assert!(!name.starts_with(".devsync-tmp"), "temp file left: {name}");
        assert_eq!(
            std::fs::read(e.path()).unwrap(),
            std::fs::read(src.join(&name)).unwrap(),
            "{name} is partial"
        );
    }
}

#[test]
fn serve_creates_on_demand_and_keeps_its_identity_across_restarts() {
    let ep = endpoint_with(Opts {
        create_on_demand: true,
        ..Opts::default()
    });
    let td = tempfile::tempdir().unwrap();
    let src = one_file_tree(td.path(), b"x");
    let dst = format!("dbx_fresh:{}", s(&td.path().join("r")));
    let (code, _, err) = ep.run(&["push", s(&src), &dst], |_| {});
    assert_eq!(code, 0, "created on first use: {err}");
    let key_before = ep
        .running
        .state
        .devbox("dbx_fresh")
        .unwrap()
        .public_key
        .clone();
    let host_before = ep.running.state.host_key.public_key().clone();
    let ca_before = std::fs::read(ep.ca()).unwrap();
    // Restart on the same state directory, same client home: same keys, pins still valid.
    let Endpoint {
        _rt,
        running,
        state_dir,
        home,
        ..
    } = ep;
    running.task.abort();
    drop(_rt);
    let ep2 = endpoint_with(Opts {
        state_dir: Some(state_dir),
        ..Opts::default()
    });
    assert_eq!(
        ep2.running.state.devbox("dbx_fresh").unwrap().public_key,
        key_before
    );
    assert_eq!(*ep2.running.state.host_key.public_key(), host_before);
    assert_eq!(
        std::fs::read(ep2.ca()).unwrap(),
        ca_before,
        "the CA clients trust is stable"
    );
    let (code, _, err) = ep2.run(&["push", s(&src), &dst], |c| {
        c.env("HOME", home.path());
    });
    assert_eq!(
        code, 0,
        "the pinned host key still matches after a restart: {err}"
    );
    assert!(!err.contains("installing"), "{err}");
    // Without on-demand creation, unknown devboxes are 404.
    let (code, _, err) = ep2.run(&["push", s(&src), "dbx_other:/tmp/x"], |_| {});
    assert_eq!(code, 1);
    assert!(err.contains("404"), "{err}");
}

#[test]
fn api_over_tls_is_verified_like_the_gateway() {
    let ep = endpoint_with(Opts {
        devboxes: vec!["dbx_tls".into()],
        api_tls: true,
        ..Opts::default()
    });
    let td = tempfile::tempdir().unwrap();
    let src = one_file_tree(td.path(), b"over https");
    let dst_dir = td.path().join("r");
    let dst = format!("dbx_tls:{}", s(&dst_dir));
    let (code, _, err) = ep.run(&["push", s(&src), &dst], |_| {});
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read(dst_dir.join("f")).unwrap(), b"over https");
    // Without the state's CA the API's certificate is refused, and the error names the stage.
    let (code, _, err) = ep.run(&["push", s(&src), &dst], |c| {
        c.env_remove("DEVSYNC_TLS_CA");
    });
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("devbox API") && err.contains("certificate"),
        "{err}"
    );
    assert!(
        err.contains("DEVSYNC_TLS_CA") && !err.contains("gave up"),
        "{err}"
    );
    // A client still speaking plain HTTP to it gets an error (at once), not a key.
    let (code, _, err) = ep.run(&["push", s(&src), &dst], |c| {
        c.env("RUNLOOP_BASE_URL", format!("http://{}", ep.api));
    });
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("https://") && !err.contains("gave up"),
        "{err}"
    );
}

/// The API hands out SSH keys: plain HTTP off loopback is refused before anything is bound.
#[test]
fn serve_refuses_a_plain_http_api_off_loopback() {
    let state = tempfile::tempdir().unwrap();
    let out = crate::common::bin()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--api-listen",
            "0.0.0.0:0",
            "--state",
        ])
        .arg(state.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--api-tls") && err.contains("plain HTTP"),
        "{err}"
    );
}

#[test]
fn serve_with_a_given_certificate() {
    // A CA and a gateway certificate of our own, as a self-hoster would bring.
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["*.devsync.test".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let td = tempfile::tempdir().unwrap();
    let (cert, key, ca_pem) = (
        td.path().join("gw.pem"),
        td.path().join("gw.key"),
        td.path().join("ca.pem"),
    );
    std::fs::write(&cert, leaf.pem()).unwrap();
    std::fs::write(&key, leaf_key.serialize_pem()).unwrap();
    std::fs::write(&ca_pem, ca.pem()).unwrap();
    let ep = endpoint_with(Opts {
        devboxes: vec!["dbx_cert".into()],
        cert: Some((cert, key)),
        ..Opts::default()
    });
    let src = one_file_tree(td.path(), b"x");
    let dst = format!("dbx_cert:{}", s(&td.path().join("r")));
    // The state's own CA does not vouch for this certificate; ours does.
    let (code, _, err) = ep.run(&["push", s(&src), &dst], |_| {});
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("certificate"), "{err}");
    let (code, _, err) = ep.run(&["push", "--tls-ca", s(&ca_pem), s(&src), &dst], |c| {
        c.env_remove("DEVSYNC_TLS_CA");
    });
    assert_eq!(code, 0, "{err}");
}

#[test]
fn helper_bootstrap_failures_are_clear() {
    let ep = endpoint(&["dbx_boot"], None, "user", KeyFormat::Pkcs8);
    let td = tempfile::tempdir().unwrap();
    let src = one_file_tree(td.path(), b"x");
    let dst = format!("dbx_boot:{}", s(&td.path().join("r")));
    let (code, _, err) = ep.run(
        &[
            "push",
            s(&src),
            &dst,
            "--remote-dir",
            "/proc/devsync-no-such-place",
        ],
        |_| {},
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("starting the helper on dbx_boot")
            && err.contains("/proc/devsync-no-such-place"),
        "{err}"
    );
    let (code, _, err) = ep.run(
        &["push", s(&src), &dst, "--remote-dir", "relative/dir"],
        |_| {},
    );
    assert_eq!(code, 1);
    assert!(err.contains("must be absolute or start with ~/"), "{err}");
    // A helper binary that is not devsync: it runs, says something, never greets.
    let fake = td.path().join("not-devsync");
    std::fs::write(&fake, "#!/bin/sh\necho 'this is not devsync' >&2\nexit 3\n").unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let helpers = td.path().join("h");
    let (code, _, err) = ep.run(
        &[
            "push",
            s(&src),
            &dst,
            "--helper-binary",
            s(&fake),
            "--remote-dir",
            s(&helpers),
        ],
        |_| {},
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("this is not devsync") && err.contains("exit status 3"),
        "remote stderr and status shown: {err}"
    );
}

/// Processes whose executable lies under `dir` (from /proc, so no procps is needed).
pub fn processes_running_from(dir: &Path) -> Vec<rustix::process::Pid> {
    let prefix = dir.as_os_str().as_encoded_bytes();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    rd.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| c.starts_with(prefix))
                .unwrap_or(false)
        })
        .filter_map(rustix::process::Pid::from_raw)
        .collect()
}

/// `--inplace` reaches the helper (push) and the client's own receiver (pull): both update the
/// old file's inode, and only the changed chunk travels.
#[test]
fn inplace_push_and_pull_through_the_gateway() {
    use std::os::unix::fs::MetadataExt;
    const CHUNK: usize = 4 << 20;
    let ep = endpoint(&["dbx_inpl"], None, "user", KeyFormat::Pkcs8);
    let td = tempfile::tempdir().unwrap();
    let (src, remote) = (td.path().join("src"), td.path().join("remote"));
    std::fs::create_dir(&src).unwrap();
    std::fs::create_dir(&remote).unwrap();
    let mut data = random_bytes(5 * CHUNK, 21);
    std::fs::write(remote.join("big"), &data).unwrap();
    data[2 * CHUNK..2 * CHUNK + 100].fill(7);
    std::fs::write(src.join("big"), &data).unwrap();
    let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
    let before = ino(&remote.join("big"));
    let dst = format!("dbx_inpl:{}", s(&remote));
    let args = ["push", "--json", "--inplace", "--compress=off"];
    let (code, v, err) = ep.run(&[&args[..], &[s(&src), &dst]].concat(), |_| {});
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read(remote.join("big")).unwrap(), data);
    assert_eq!(ino(&remote.join("big")), before, "pushed in place");
    assert!(num(&v, "bytes_sent") < 2 * CHUNK as u64, "{v}");

    // And back: the remote file changes, pull --inplace updates ours in place.
    data[4 * CHUNK + 9] ^= 0xff;
    std::fs::write(remote.join("big"), &data).unwrap();
    let mine = ino(&src.join("big"));
    let args = ["pull", "--json", "--inplace", "--compress=off"];
    let (code, v, err) = ep.run(&[&args[..], &[&dst, s(&src)]].concat(), |_| {});
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read(src.join("big")).unwrap(), data);
    assert_eq!(ino(&src.join("big")), mine, "pulled in place");
    assert!(num(&v, "bytes_received") < 2 * CHUNK as u64, "{v}");
}
