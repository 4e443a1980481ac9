//! `devsync cp` in every direction: local↔`devsync serve`, local↔OpenSSH, devbox→devbox and
//! local→local; a delta onto an existing file (bytes on the wire asserted), attributes kept,
//! and every error a user meets (message and exit code asserted, nothing half-written).

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use devsync::server::KeyFormat;

use crate::common::*;
use crate::remote::{Opts, endpoint, endpoint_with};
use devsync::server::state::Isolation;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs `cp --json args…` through `cmd`: (exit code, summary or error JSON, stderr).
fn cp(mut cmd: Command, args: &[&str]) -> (i32, serde_json::Value, String) {
    let out = cmd.arg("cp").arg("--json").args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let v = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.code().unwrap_or(-1), v, err)
}

fn same_file(a: &Path, b: &Path) {
    let (ma, mb) = (fs::metadata(a).unwrap(), fs::metadata(b).unwrap());
    assert!(
        fs::read(a).unwrap() == fs::read(b).unwrap(),
        "{a:?} and {b:?} differ"
    );
    assert_eq!(ma.mode() & 0o7777, mb.mode() & 0o7777, "mode of {b:?}");
    assert_eq!(
        (ma.mtime(), ma.mtime_nsec()),
        (mb.mtime(), mb.mtime_nsec()),
        "mtime of {b:?}"
    );
}

/// Three 4 KiB edits in place.
fn edit(p: &Path) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = fs::OpenOptions::new().write(true).open(p).unwrap();
    let len = f.metadata().unwrap().len();
    for (i, at) in [len / 5, len / 2, len - 10_000].into_iter().enumerate() {
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(&random_bytes(4096, 100 + i as u64)).unwrap();
    }
}

/// Up and back to a remote `dir` (written as `remote(path)`), then a delta onto the copy.
fn round_trip(cmd: &dyn Fn() -> Command, remote: &dyn Fn(&Path) -> String, work: &Path) {
    let (local, there, back) = (work.join("local"), work.join("there"), work.join("back"));
    for d in [&local, &there, &back] {
        fs::create_dir_all(d).unwrap();
    }
    let big = local.join("big.bin");
    fs::write(&big, random_bytes(16 << 20, 1)).unwrap();
    fs::set_permissions(&big, fs::Permissions::from_mode(0o640)).unwrap();
    fs::write(local.join("small.txt"), b"small").unwrap();
    // Several files into a directory.
    let (code, v, err) = cp(
        cmd(),
        &[s(&big), s(&local.join("small.txt")), &remote(&there)],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(num(&v, "created"), 2, "{v}");
    same_file(&big, &there.join("big.bin"));
    same_file(&local.join("small.txt"), &there.join("small.txt"));
    // Back, under another name.
    let (code, _, err) = cp(
        cmd(),
        &[&remote(&there.join("big.bin")), s(&back.join("copy.bin"))],
    );
    assert_eq!(code, 0, "{err}");
    same_file(&big, &back.join("copy.bin"));
    // An edited file onto the existing copy: only the change travels, both ways.
    edit(&big);
    let (code, v, err) = cp(cmd(), &[s(&big), &remote(&there)]);
    assert_eq!(code, 0, "{err}");
    let wire = num(&v, "bytes_sent") + num(&v, "bytes_received");
    assert!(
        wire < 512 << 10,
        "{wire} bytes on the wire for three 4 KiB edits: {v}"
    );
    same_file(&big, &there.join("big.bin"));
    let (code, v, err) = cp(
        cmd(),
        &[&remote(&there.join("big.bin")), s(&back.join("copy.bin"))],
    );
    assert_eq!(code, 0, "{err}");
    let wire = num(&v, "bytes_sent") + num(&v, "bytes_received");
    assert!(
        wire < 512 << 10,
        "{wire} bytes on the wire pulling three edits: {v}"
    );
    same_file(&big, &back.join("copy.bin"));
    // A directory with -r: into an existing directory by name, and as a new name.
    let tree = work.join("tree");
    make_tree(
        &tree,
        21,
        &TreeSpec {
            files: 40,
            max_size: 100_000,
            dirs: 6,
            links: 3,
        },
    );
    let (code, _, err) = cp(cmd(), &["-r", s(&tree), &remote(&there)]);
    assert_eq!(code, 0, "{err}");
    assert_same_tree(&tree, &there.join("tree"));
    let (code, _, err) = cp(
        cmd(),
        &["-r", &remote(&there.join("tree")), s(&back.join("t2"))],
    );
    assert_eq!(code, 0, "{err}");
    assert_same_tree(&tree, &back.join("t2"));
    assert!(own_files(&there).is_empty() && own_files(&back).is_empty());
}

#[test]
fn cp_both_ways_through_serve() {
    let ep = endpoint(&["dbx_cp"], None, "user", KeyFormat::Pkcs8);
    let td = tempfile::tempdir().unwrap();
    round_trip(&|| ep.cmd(), &|p| format!("dbx_cp:{}", s(p)), td.path());
}

#[test]
fn cp_both_ways_through_openssh() {
    let Some(sshd) = crate::openssh::sshd() else {
        return;
    };
    let home = tempfile::tempdir().unwrap();
    let key = sshd.client_key.clone();
    let port = sshd.addr.port();
    let td = tempfile::tempdir().unwrap();
    let helpers = td.path().join("helpers");
    let cmd = || {
        let mut c = crate::common::bin();
        c.env("HOME", home.path())
            .env_remove("SSH_AUTH_SOCK")
            .env("DEVSYNC_REMOTE_DIR", &helpers);
        c
    };
    let with_key = |args: &[&str]| {
        let mut v: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        v.push("-I".into());
        v.push(s(&key).into());
        v
    };
    let remote = |p: &Path| format!("root@127.0.0.1:{port}:{}", s(p));
    let work = td.path().join("work");
    let (local, there) = (work.join("local"), work.join("there"));
    fs::create_dir_all(&local).unwrap();
    fs::create_dir_all(&there).unwrap();
    let f = local.join("f.bin");
    fs::write(&f, random_bytes(8 << 20, 4)).unwrap();
    let run = |args: Vec<String>| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        cp(cmd(), &refs)
    };
    let (code, _, err) = run(with_key(&[s(&f), &remote(&there)]));
    assert_eq!(code, 0, "{err}");
    same_file(&f, &there.join("f.bin"));
    edit(&f);
    let (code, v, err) = run(with_key(&[s(&f), &remote(&there)]));
    assert_eq!(code, 0, "{err}");
    assert!(num(&v, "bytes_sent") < 512 << 10, "{v}");
    same_file(&f, &there.join("f.bin"));
    let back = work.join("back.bin");
    let (code, _, err) = run(with_key(&[&remote(&there.join("f.bin")), s(&back)]));
    assert_eq!(code, 0, "{err}");
    same_file(&f, &back);
}

#[test]
fn cp_from_one_devbox_to_another_through_the_client() {
    // Two devboxes on one endpoint: each its own Unix user.
    if !require(
        rustix::process::geteuid().is_root(),
        "root, for an endpoint serving two devboxes",
    ) {
        return;
    }
    let ep = endpoint_with(Opts {
        devboxes: vec!["dbx_from".into(), "dbx_to".into()],
        isolation: Isolation::Users {
            base: 232_000,
            accounts: Default::default(),
        },
        ..Opts::default()
    });
    let homes = ep.state_dir.path().join("homes");
    let td = tempfile::tempdir().unwrap();
    let f = td.path().join("data.bin");
    fs::write(&f, random_bytes(12 << 20, 8)).unwrap();
    let (code, _, err) = cp(ep.cmd(), &[s(&f), "dbx_from:"]);
    assert_eq!(code, 0, "{err}");
    let (code, v, err) = cp(ep.cmd(), &["dbx_from:data.bin", "dbx_to:"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(num(&v, "created"), 1, "{v}");
    same_file(&f, &homes.join("dbx_to/data.bin"));
    // Again after an edit: a delta between the two helpers.
    edit(&f);
    let (code, _, err) = cp(ep.cmd(), &[s(&f), "dbx_from:"]);
    assert_eq!(code, 0, "{err}");
    let (code, v, err) = cp(ep.cmd(), &["dbx_from:data.bin", "dbx_to:copy.bin"]);
    assert_eq!(code, 0, "{err}");
    let (code, v2, err) = cp(ep.cmd(), &["dbx_from:data.bin", "dbx_to:"]);
    assert_eq!(code, 0, "{err}");
    let wire = num(&v2, "bytes_sent") + num(&v2, "bytes_received");
    assert!(wire < 512 << 10, "{wire} bytes for three edits: {v2}");
    assert!(
        num(&v, "bytes_sent") > 12 << 20,
        "a new name gets everything: {v}"
    );
    same_file(&f, &homes.join("dbx_to/data.bin"));
    same_file(&f, &homes.join("dbx_to/copy.bin"));
    // A directory too.
    let tree = td.path().join("tree");
    make_tree(
        &tree,
        4,
        &TreeSpec {
            files: 30,
            max_size: 300_000,
            dirs: 5,
            links: 2,
        },
    );
    let (code, _, err) = cp(ep.cmd(), &["-r", s(&tree), "dbx_from:"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = cp(ep.cmd(), &["-r", "dbx_from:tree", "dbx_to:t"]);
    assert_eq!(code, 0, "{err}");
    assert_same_tree(&tree, &homes.join("dbx_to/t"));
}

#[test]
fn cp_errors_say_what_to_do_and_change_nothing() {
    let ep = endpoint(&["dbx_err"], None, "user", KeyFormat::Pkcs8);
    let td = tempfile::tempdir().unwrap();
    let d = td.path();
    fs::create_dir(d.join("dir")).unwrap();
    fs::write(d.join("a"), b"a").unwrap();
    fs::write(d.join("b"), b"b").unwrap();
    fs::write(d.join("keep"), b"old").unwrap();
    let r = |p: &str| format!("dbx_err:{}", s(&d.join(p)));
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![s(&d.join("missing")).into(), r("dir")],
            "No such file or directory",
        ),
        (
            vec![r("missing"), s(&d.join("dir")).into()],
            "no such file or directory",
        ),
        (
            vec![s(&d.join("dir")).into(), r("x")],
            "is a directory (copy directories with -r)",
        ),
        (
            vec![r("dir"), s(&d.join("x")).into()],
            "is a directory (copy directories with -r)",
        ),
        (
            vec![s(&d.join("a")).into(), s(&d.join("b")).into(), r("keep")],
            "is not a directory: copying several files needs a directory",
        ),
        (
            vec![s(&d.join("a")).into(), r("no/such/dir/x")],
            "no such directory",
        ),
        (vec![r("a"), r("b")], ""), // remote to remote, same devbox: works
    ];
    for (args, want) in cases {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, v, err) = cp(ep.cmd(), &refs);
        if want.is_empty() {
            assert_eq!(code, 0, "{args:?}: {err}");
            continue;
        }
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(v["exit_code"], 1, "{args:?}: {v}");
    }
    assert_eq!(fs::read(d.join("keep")).unwrap(), b"old");
    assert_eq!(fs::read(d.join("b")).unwrap(), b"a");
    assert!(!d.join("x").exists());
    assert!(own_files(d).is_empty(), "{:?}", own_files(d));
    // Sources on two machines in one command.
    let (code, _, err) = cp(ep.cmd(), &[s(&d.join("a")), &r("b"), s(&d.join("dir"))]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("every source must be on the same machine"),
        "{err}"
    );
}

#[test]
fn cp_locally_and_without_permission() {
    let td = tempfile::Builder::new().tempdir_in("/tmp").unwrap();
    let d = td.path();
    fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(d.join("a"), b"content").unwrap();
    fs::set_permissions(d.join("a"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::create_dir(d.join("out")).unwrap();
    // Local to local (through a local helper, as every other direction).
    let (code, _, err) = cp(crate::common::bin(), &[s(&d.join("a")), s(&d.join("out"))]);
    assert_eq!(code, 0, "{err}");
    same_file(&d.join("a"), &d.join("out/a"));
    // The permission check needs another user to copy as.
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
    // nobody may read the file but not write into root's directory.
    let bin = d.join("devsync");
    fs::copy(BIN, &bin).unwrap();
    let mut c = Command::new("runuser");
    c.args(["-u", "nobody", "--"]).arg(&bin).env("HOME", d);
    let (code, _, err) = cp(c, &[s(&d.join("a")), s(&d.join("out/b"))]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("Permission denied"), "{err}");
    assert!(!d.join("out/b").exists());
}

#[test]
fn cp_path_rules_and_a_user_at_a_devbox() {
    let ep = endpoint(&["dbx_rules"], None, "user", KeyFormat::Pkcs8);
    let td = tempfile::tempdir().unwrap();
    let d = td.path();
    // `./a:b` is a local file named `a:b`, not host `./a`.
    fs::write(d.join("a:b"), b"colon").unwrap();
    fs::create_dir(d.join("there")).unwrap();
    let mut c = ep.cmd();
    c.current_dir(d);
    let (code, _, err) = cp(
        c,
        &["./a:b", &format!("user@dbx_rules:{}", s(&d.join("there")))],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(fs::read(d.join("there/a:b")).unwrap(), b"colon");
    // A wrong user is refused by the devbox, with the stage named.
    let (code, v, err) = cp(
        ep.cmd(),
        &[s(&d.join("a:b")), &format!("nobody@dbx_rules:{}", s(d))],
    );
    assert_eq!(code, 1, "{err}");
    assert_eq!(v["stage"], "auth", "{v}");
}

#[test]
fn cp_onto_a_full_disk_fails_clearly_and_keeps_the_old_file() {
    let td = tempfile::tempdir().unwrap();
    let small = td.path().join("small");
    fs::create_dir(&small).unwrap();
    let guard = Tmpfs::mount(&small, "4m", "devsync-cp-test");
    if !require(guard.is_some(), "root, to mount a small tmpfs") {
        return;
    }
    fs::write(small.join("big"), b"the old copy").unwrap();
    let big = td.path().join("big");
    fs::write(&big, random_bytes(6 << 20, 3)).unwrap();
    let ep = endpoint(&["dbx_full"], None, "user", KeyFormat::Pkcs8);
    let (code, _, err) = cp(ep.cmd(), &[s(&big), &format!("dbx_full:{}", s(&small))]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("no space left"), "{err}");
    assert_eq!(fs::read(small.join("big")).unwrap(), b"the old copy");
    assert!(own_files(&small).is_empty(), "{:?}", own_files(&small));
}

#[test]
fn cp_sources_from_two_directories_links_and_a_directory_onto_a_file() {
    let ep = endpoint(&["dbx_more"], None, "user", KeyFormat::Pkcs8);
    let td = tempfile::tempdir().unwrap();
    let d = td.path();
    for p in ["one/a", "two/b", "tree/f"] {
        fs::create_dir_all(d.join(p).parent().unwrap()).unwrap();
        fs::write(d.join(p), p.as_bytes()).unwrap();
    }
    fs::create_dir(d.join("into")).unwrap();
    let r = |p: &str| format!("dbx_more:{}", s(&d.join(p)));
    // Two source directories: two sessions, one destination directory.
    let (code, v, err) = cp(
        ep.cmd(),
        &[s(&d.join("one/a")), s(&d.join("two/b")), &r("into")],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(num(&v, "created"), 2, "{v}");
    assert_eq!(fs::read(d.join("into/a")).unwrap(), b"one/a");
    assert_eq!(fs::read(d.join("into/b")).unwrap(), b"two/b");
    // A destination that is a symlink to a file is written through, as cp does.
    fs::write(d.join("target"), b"old").unwrap();
    std::os::unix::fs::symlink("target", d.join("link")).unwrap();
    let (code, _, err) = cp(ep.cmd(), &[s(&d.join("one/a")), &r("link")]);
    assert_eq!(code, 0, "{err}");
    assert!(
        fs::symlink_metadata(d.join("link"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(fs::read(d.join("target")).unwrap(), b"one/a");
    // A directory onto a file is refused, the file kept.
    fs::write(d.join("notes"), b"keep me").unwrap();
    let (code, _, err) = cp(ep.cmd(), &["-r", s(&d.join("tree")), &r("notes")]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("cannot overwrite a non-directory with a directory"),
        "{err}"
    );
    assert_eq!(fs::read(d.join("notes")).unwrap(), b"keep me");
    fs::create_dir(d.join("holder")).unwrap();
    fs::write(d.join("holder/tree"), b"a file named tree").unwrap();
    let (code, _, err) = cp(ep.cmd(), &["-r", s(&d.join("tree")), &r("holder")]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        fs::read(d.join("holder/tree")).unwrap(),
        b"a file named tree"
    );
    // Two copies into one directory at once: both land (copies take no lock on it).
    let (c1, c2) = (ep.cmd(), ep.cmd());
    let (a, b, into) = (d.join("one/a"), d.join("two/b"), d.join("into2"));
    fs::create_dir(&into).unwrap();
    let into_r = format!("dbx_more:{}", s(&into));
    let (x, y) = std::thread::scope(|sc| {
        let h1 = sc.spawn(|| cp(c1, &[s(&a), &into_r]));
        let h2 = sc.spawn(|| cp(c2, &[s(&b), &into_r]));
        (h1.join().unwrap(), h2.join().unwrap())
    });
    assert_eq!((x.0, y.0), (0, 0), "{} {}", x.2, y.2);
    assert!(into.join("a").exists() && into.join("b").exists());
}
