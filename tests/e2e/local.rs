//! The real binary against local targets: `devsync push/pull SRC DST` where the far side is a
//! path, served by a spawned `devsync helper` (the same code path as over SSH).

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::common::*;

fn spec() -> TreeSpec {
    TreeSpec {
        files: 300,
        max_size: 300_000,
        dirs: 40,
        links: 20,
    }
}

#[test]
fn random_trees_push_then_resync_transfers_nothing() {
    for seed in [1u64, 2, 3] {
        let td = tempfile::tempdir().unwrap();
        let (src, dst) = (td.path().join("src"), td.path().join("dst"));
        make_tree(&src, seed, &spec());
        let first = sync_json("push", &src, &dst, &[], 0);
        assert_same_tree(&src, &dst);
        assert!(num(&first, "created") > 300, "{first}");
        let second = sync_json("push", &src, &dst, &[], 0);
        assert_same_tree(&src, &dst);
        for k in [
            "created",
            "updated",
            "metadata_only",
            "deleted",
            "literal_bytes",
            "matched_bytes",
        ] {
            assert_eq!(num(&second, k), 0, "{k} on resync: {second}");
        }
        // Only the file list crossed the wire.
        assert!(num(&second, "bytes_received") < 2000, "{second}");
    }
}

#[test]
fn random_trees_pull_and_modify() {
    let td = tempfile::tempdir().unwrap();
    let (remote, local) = (td.path().join("remote"), td.path().join("local"));
    make_tree(&remote, 7, &spec());
    sync_json("pull", &remote, &local, &[], 0);
    assert_same_tree(&remote, &local);
    // Change the remote side a little, pull again: only the change comes back.
    let victim = walkdir::WalkDir::new(&remote)
        .into_iter()
        .filter_map(Result::ok)
        .find(|e| e.file_type().is_file() && e.metadata().unwrap().len() > 50_000)
        .expect("a big file")
        .into_path();
    let mut data = fs::read(&victim).unwrap();
    data[1000] ^= 0xff;
    fs::write(&victim, &data).unwrap();
    fs::write(remote.join("brand new"), b"fresh").unwrap();
    let v = sync_json("pull", &remote, &local, &["--delete"], 0);
    assert_same_tree(&remote, &local);
    assert_eq!(num(&v, "created"), 1, "{v}");
    assert_eq!(num(&v, "updated"), 1, "{v}");
    assert!(
        num(&v, "literal_bytes") < 20_000,
        "delta should be small: {v}"
    );
}

#[test]
fn metadata_only_changes_move_no_data() {
    let td = tempfile::tempdir().unwrap();
    let (src, dst) = (td.path().join("src"), td.path().join("dst"));
    fs::create_dir(&src).unwrap();
    fs::write(src.join("small"), b"tiny").unwrap();
    fs::write(src.join("big"), random_bytes(200_000, 3)).unwrap();
    sync_json("push", &src, &dst, &[], 0);
    fs::set_permissions(src.join("small"), fs::Permissions::from_mode(0o600)).unwrap();
    // Same content, new mtime: the big file goes through the delta path and comes out
    // "identical", the small one is re-sent (it is below the delta threshold).
    let now = std::time::SystemTime::now();
    fs::File::options()
        .write(true)
        .open(src.join("big"))
        .unwrap()
        .set_modified(now)
        .unwrap();
    let v = sync_json("push", &src, &dst, &["-i"], 0);
    assert_same_tree(&src, &dst);
    assert_eq!(num(&v, "metadata_only"), 2, "{v}");
    assert_eq!(num(&v, "literal_bytes"), 0, "{v}");
}

#[test]
fn dry_run_changes_nothing() {
    let td = tempfile::tempdir().unwrap();
    let (src, dst) = (td.path().join("src"), td.path().join("dst"));
    make_tree(&src, 11, &spec());
    let v = sync_json("push", &src, &dst, &["-n", "-i"], 0);
    assert!(!dst.exists(), "dry run created the destination");
    assert!(num(&v, "created") > 300);
    assert!(
        v["changes"].as_array().unwrap().len() > 300,
        "itemized changes listed"
    );
    sync_json("push", &src, &dst, &[], 0);
    let before = snapshot(&dst);
    fs::remove_file(
        walkdir::WalkDir::new(&src)
            .into_iter()
            .filter_map(Result::ok)
            .find(|e| e.file_type().is_file())
            .unwrap()
            .path(),
    )
    .unwrap();
    fs::write(src.join("added"), b"x").unwrap();
    let v = sync_json("push", &src, &dst, &["-n", "--delete"], 0);
    assert_eq!(num(&v, "deleted"), 1, "{v}");
    assert_eq!(num(&v, "created"), 1, "{v}");
    assert_eq!(snapshot(&dst), before, "dry run modified the destination");
}

#[test]
fn delete_and_its_guard() {
    let td = tempfile::tempdir().unwrap();
    let (src, dst) = (td.path().join("src"), td.path().join("dst"));
    fs::create_dir_all(src.join("sub")).unwrap();
    for i in 0..10 {
        fs::write(src.join(format!("f{i}")), format!("{i}")).unwrap();
    }
    fs::write(src.join("sub/x"), b"x").unwrap();
    sync_json("push", &src, &dst, &[], 0);
    // Without --delete, extraneous files stay.
    fs::remove_file(src.join("f0")).unwrap();
    sync_json("push", &src, &dst, &[], 0);
    assert!(dst.join("f0").exists());
    // With --delete they go, directories included.
    fs::remove_dir_all(src.join("sub")).unwrap();
    let v = sync_json("push", &src, &dst, &["--delete", "-i"], 0);
    assert_eq!(num(&v, "deleted"), 3, "{v}");
    assert_same_tree(&src, &dst);
    // Deleting most of the destination is refused (exit 25), and nothing is deleted.
    for i in 1..9 {
        fs::remove_file(src.join(format!("f{i}"))).unwrap();
    }
    let before = snapshot(&dst);
    let v = sync_json("push", &src, &dst, &["--delete"], 25);
    assert!(v["delete_refused"].as_bool().unwrap());
    assert!(
        v["errors"][0].as_str().unwrap().contains("f1"),
        "refusal names victims: {v}"
    );
    assert_eq!(snapshot(&dst), before);
    // An empty source is refused even for a single file. The destination named through a
    // symlink is followed (as rsync does), and the refusal names the directory itself.
    let empty = td.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let via = td.path().join("via-link");
    std::os::unix::fs::symlink(&dst, &via).unwrap();
    let v = sync_json("push", &empty, &via, &["--delete"], 25);
    let real = fs::canonicalize(&dst).unwrap();
    assert!(
        v["errors"][0]
            .as_str()
            .unwrap()
            .contains(&format!("entries in {}", real.display())),
        "{v}"
    );
    assert_eq!(snapshot(&dst), before);
    // --force-delete goes ahead.
    sync_json("push", &src, &dst, &["--delete", "--force-delete"], 0);
    assert_same_tree(&src, &dst);
}

#[test]
fn gitignore_nested_negation_and_excludes_protect_receiver() {
    let td = tempfile::tempdir().unwrap();
    let (src, dst) = (td.path().join("src"), td.path().join("dst"));
    let w = |p: &str, c: &str| {
        let p = src.join(p);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, c).unwrap();
    };
    w(".gitignore", "*.log\n/build/\n!keep.log\n");
    w("a.log", "x");
    w("keep.log", "kept by negation");
    w("build/out.o", "x");
    w("sub/build/kept.txt", "anchored pattern does not match here");
    w("sub/.gitignore", "*.tmp\n");
    w("sub/x.tmp", "x");
    w("sub/y.txt", "y");
    w("other/x.tmp", "not ignored outside sub");
    w(".devsyncignore", "secret/\n");
    w("secret/key", "x");
    w("notes.md", "x");
    w(".git/HEAD", "ref: refs/heads/main\n");
    w(".git/info/exclude", "excluded-by-git-info\n");
    w("excluded-by-git-info", "x");
    sync_json("push", &src, &dst, &["--exclude", "*.md"], 0);
    let got: Vec<String> = snapshot(&dst)
        .keys()
        .map(|p| p.display().to_string())
        .collect();
    for must in [
        "keep.log",
        "sub/build/kept.txt",
        "sub/y.txt",
        "other/x.tmp",
        ".git/HEAD",
        ".gitignore",
    ] {
        assert!(got.iter().any(|g| g == must), "{must} missing: {got:?}");
    }
    for never in [
        "a.log",
        "build",
        "sub/x.tmp",
        "secret",
        "notes.md",
        "excluded-by-git-info",
    ] {
        assert!(!got.iter().any(|g| g == never), "{never} synced: {got:?}");
    }
    // Ignored files on the receiver survive --delete.
    fs::write(dst.join("remote-only.log"), b"build output on the box").unwrap();
    fs::create_dir_all(dst.join("build")).unwrap();
    fs::write(dst.join("build/artifact"), b"x").unwrap();
    fs::write(dst.join("stray"), b"x").unwrap();
    let v = sync_json("push", &src, &dst, &["--exclude", "*.md", "--delete"], 0);
    assert_eq!(num(&v, "deleted"), 1, "only the stray file goes: {v}");
    assert!(dst.join("remote-only.log").exists() && dst.join("build/artifact").exists());
    // --no-gitignore syncs what .gitignore hid; --exclude-vcs drops .git.
    let dst2 = td.path().join("dst2");
    sync_json("push", &src, &dst2, &["--no-gitignore", "--exclude-vcs"], 0);
    assert!(dst2.join("a.log").exists() && dst2.join("build/out.o").exists());
    assert!(!dst2.join(".git").exists());
    assert!(
        !dst2.join("secret").exists(),
        ".devsyncignore still applies"
    );
}

#[test]
fn awkward_names_roundtrip() {
    let td = tempfile::tempdir().unwrap();
    let (src, dst) = (td.path().join("-src dir"), td.path().join("--dst ünï"));
    fs::create_dir_all(&src).unwrap();
    for n in [
        "with space",
        "-dash",
        "--",
        "ünï",
        "new\nline",
        "tab\there",
        "\u{7f}del",
        "a:b",
    ] {
        fs::write(src.join(n), n).unwrap();
    }
    fs::write(
        src.join(OsStr::from_bytes_checked(b"bad\xffutf8")),
        b"raw bytes",
    )
    .unwrap();
    // Leading dashes in positional arguments are taken as paths.
    sync_json("push", &src, &dst, &[], 0);
    assert_same_tree(&src, &dst);
}

trait FromBytes {
    fn from_bytes_checked(b: &[u8]) -> &OsStr;
}
impl FromBytes for OsStr {
    fn from_bytes_checked(b: &[u8]) -> &OsStr {
        std::os::unix::ffi::OsStrExt::from_bytes(b)
    }
}

#[test]
fn big_file_edits_travel_as_small_deltas() {
    let td = tempfile::tempdir().unwrap();
    let (src, dst) = (td.path().join("src"), td.path().join("dst"));
    fs::create_dir(&src).unwrap();
    let size = 64 << 20;
    let mut data = random_bytes(size, 5);
    fs::write(src.join("big.bin"), &data).unwrap();
    sync_json("push", &src, &dst, &[], 0);
    let wire = |v: &serde_json::Value| num(v, "bytes_sent") + num(v, "bytes_received");

    // Three in-place 4 KiB edits.
    for (i, at) in [1_000_000usize, 30_000_000, 60_000_000]
        .into_iter()
        .enumerate()
    {
        data[at..at + 4096].copy_from_slice(&random_bytes(4096, 100 + i as u64));
    }
    fs::write(src.join("big.bin"), &data).unwrap();
    let v = sync_json("push", &src, &dst, &[], 0);
    assert_same_tree(&src, &dst);
    assert!(
        wire(&v) < 200_000,
        "3 edits in 64 MiB cost {} bytes",
        wire(&v)
    );

    // Insertion in the middle: everything after shifts.
    data.splice(32_000_123..32_000_123, random_bytes(1000, 7));
    fs::write(src.join("big.bin"), &data).unwrap();
    let v = sync_json("push", &src, &dst, &[], 0);
    assert_same_tree(&src, &dst);
    assert!(wire(&v) < 200_000, "insertion cost {} bytes: {v}", wire(&v));
    assert!(num(&v, "literal_bytes") < 40_000, "{v}");

    // Deletion in the middle, pulled this time (roles swap, same protocol).
    data.drain(10_000_000..10_003_000);
    fs::write(src.join("big.bin"), &data).unwrap();
    let v = sync_json("pull", &src, &dst, &[], 0);
    assert_same_tree(&src, &dst);
    assert!(wire(&v) < 200_000, "deletion cost {} bytes: {v}", wire(&v));
    assert!(num(&v, "literal_bytes") < 40_000, "{v}");
}

#[test]
fn cli_errors_are_clear_and_nonzero() {
    let td = tempfile::tempdir().unwrap();
    let missing = td.path().join("nope");
    let out = devsync(&[
        OsStr::new("push"),
        missing.as_os_str(),
        td.path().join("d").as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no such file or directory") && err.contains("nope"),
        "{err}"
    );
    assert!(!td.path().join("d").exists(), "nothing created on failure");

    let src = td.path().join("src");
    fs::create_dir(&src).unwrap();
    let file = td.path().join("file");
    fs::write(&file, b"x").unwrap();
    let out = devsync(&[OsStr::new("push"), src.as_os_str(), file.as_os_str()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a directory"), "{err}");
    assert_eq!(fs::read(&file).unwrap(), b"x");

    let out = devsync(&[OsStr::new("pull"), src.as_os_str(), file.as_os_str()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a directory"));

    let out = devsync(&[OsStr::new("push"), file.as_os_str(), src.as_os_str()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a directory"));

    let out = devsync(&[
        OsStr::new("push"),
        OsStr::new("--bogus"),
        src.as_os_str(),
        src.as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(2));

    let out = devsync(&[
        OsStr::new("push"),
        OsStr::new("--exclude"),
        OsStr::new("a{"),
        src.as_os_str(),
        file.as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--exclude"));
}

#[test]
fn unreadable_source_files_fail_alone() {
    if rustix::process::geteuid().is_root() {
        // Root reads everything; drop to nobody for this check.
        let runuser =
            Path::new("/usr/sbin/runuser").exists() || Path::new("/sbin/runuser").exists();
        if require(runuser, "runuser (util-linux), to run as nobody") {
            unreadable_as_nobody();
        }
        return;
    }
    let td = tempfile::tempdir().unwrap();
    let (src, dst) = (td.path().join("src"), td.path().join("dst"));
    fs::create_dir(&src).unwrap();
    fs::write(src.join("ok"), b"fine").unwrap();
    fs::write(src.join("secret"), b"x").unwrap();
    fs::set_permissions(src.join("secret"), fs::Permissions::from_mode(0o000)).unwrap();
    let v = sync_json("push", &src, &dst, &[], 23);
    assert!(v["errors"][0].as_str().unwrap().contains("secret"), "{v}");
    assert_eq!(fs::read(dst.join("ok")).unwrap(), b"fine");
    assert!(!dst.join("secret").exists());
}

fn unreadable_as_nobody() {
    let td = tempfile::Builder::new().tempdir_in("/tmp").unwrap();
    fs::set_permissions(td.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let (src, dst) = (td.path().join("src"), td.path().join("dst"));
    fs::create_dir(&src).unwrap();
    fs::write(src.join("ok"), b"fine").unwrap();
    fs::write(src.join("secret"), b"x").unwrap();
    fs::set_permissions(&src, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(src.join("ok"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::set_permissions(src.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    let bin = td.path().join("devsync");
    fs::copy(BIN, &bin).unwrap();
    let out = std::process::Command::new("runuser")
        .args(["-u", "nobody", "--"])
        .arg(&bin)
        .args(["push", "--json"])
        .arg(&src)
        .arg(&dst)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(23),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["errors"][0].as_str().unwrap().contains("secret"), "{v}");
    assert_eq!(fs::read(dst.join("ok")).unwrap(), b"fine");
    assert!(!dst.join("secret").exists());
}

#[test]
fn kind_changes_and_symlinks_are_never_followed() {
    let td = tempfile::tempdir().unwrap();
    let (src, dst) = (td.path().join("src"), td.path().join("dst"));
    let outside = td.path().join("outside");
    fs::create_dir_all(&outside).unwrap();
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("d/f"), b"in dir").unwrap();
    fs::write(src.join("becomes_dir"), b"file").unwrap();
    sync_json("push", &src, &dst, &[], 0);
    // The receiver's "d" becomes a symlink to a directory outside; the sender still has a dir
    // there: the link is replaced by a real directory, nothing is written outside.
    fs::remove_dir_all(dst.join("d")).unwrap();
    std::os::unix::fs::symlink(&outside, dst.join("d")).unwrap();
    fs::remove_file(src.join("becomes_dir")).unwrap();
    fs::create_dir(src.join("becomes_dir")).unwrap();
    fs::write(src.join("becomes_dir/inner"), b"x").unwrap();
    fs::write(src.join("d/f"), b"changed").unwrap();
    sync_json("push", &src, &dst, &[], 0);
    assert_same_tree(&src, &dst);
    assert_eq!(
        fs::read_dir(&outside).unwrap().count(),
        0,
        "wrote through a symlink"
    );
    // A directory where the source now has a file needs --delete.
    fs::remove_dir_all(src.join("becomes_dir")).unwrap();
    fs::write(src.join("becomes_dir"), b"file again").unwrap();
    let v = sync_json("push", &src, &dst, &[], 23);
    assert!(v["errors"][0].as_str().unwrap().contains("--delete"), "{v}");
    sync_json("push", &src, &dst, &["--delete"], 0);
    assert_same_tree(&src, &dst);
}

#[test]
fn checksum_mode_catches_same_size_same_mtime_changes() {
    let td = tempfile::tempdir().unwrap();
    let (src, dst) = (td.path().join("src"), td.path().join("dst"));
    fs::create_dir(&src).unwrap();
    fs::write(src.join("a"), b"version one").unwrap();
    fs::write(src.join("big"), random_bytes(300_000, 1)).unwrap();
    sync_json("push", &src, &dst, &[], 0);
    // Same size, same mtime, different content: the quick check cannot see it.
    let sneak = |p: &Path, data: &[u8]| {
        let t = fs::metadata(p).unwrap().modified().unwrap();
        fs::write(p, data).unwrap();
        fs::File::options()
            .write(true)
            .open(p)
            .unwrap()
            .set_modified(t)
            .unwrap();
    };
    sneak(&src.join("a"), b"version two");
    let mut big = random_bytes(300_000, 1);
    big[123_456] ^= 1;
    sneak(&src.join("big"), &big);
    let v = sync_json("push", &src, &dst, &[], 0);
    assert_eq!(num(&v, "updated"), 0, "quick check: {v}");
    assert_eq!(fs::read(dst.join("a")).unwrap(), b"version one");
    let v = sync_json("push", &src, &dst, &["-c", "-i"], 0);
    assert_eq!(num(&v, "updated"), 2, "{v}");
    assert!(
        num(&v, "literal_bytes") < 20_000,
        "the big one went as a delta: {v}"
    );
    assert_same_tree(&src, &dst);
    let v = sync_json("push", &src, &dst, &["-c"], 0);
    assert_eq!(num(&v, "updated") + num(&v, "metadata_only"), 0, "{v}");
}

/// A destination filesystem that fills up: a clear error, non-zero exit, nothing half-written.
#[test]
fn no_space_is_a_clear_error() {
    let td = tempfile::tempdir().unwrap();
    let small = td.path().join("small");
    fs::create_dir(&small).unwrap();
    let guard = Tmpfs::mount(&small, "4m", "devsync-test");
    if !require(guard.is_some(), "root, to mount a small tmpfs") {
        return;
    }
    let src = td.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("fits"), random_bytes(1 << 20, 1)).unwrap();
    fs::write(src.join("too big"), random_bytes(6 << 20, 2)).unwrap();
    let dst = small.join("dst");
    let out = devsync(&[OsStr::new("push"), src.as_os_str(), dst.as_os_str()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("no space left"), "{err}");
    if let Ok(got) = fs::read(dst.join("too big")) {
        panic!("partial file at final path ({} bytes)", got.len());
    }
    // Whatever did land is complete.
    if let Ok(got) = fs::read(dst.join("fits")) {
        assert_eq!(got, random_bytes(1 << 20, 1));
    }
    let leftovers: Vec<_> = fs::read_dir(&dst)
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        leftovers
            .iter()
            .all(|n| !n.to_string_lossy().starts_with(".devsync-tmp")),
        "{leftovers:?}"
    );
}

/// Empty `DEVSYNC_*` variables count as unset (as the `RUNLOOP_*` ones do), not as options
/// given without a value.
#[test]
fn empty_environment_variables_count_as_unset() {
    let td = tempfile::tempdir().unwrap();
    let (src, dst) = (td.path().join("src"), td.path().join("dst"));
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), b"x").unwrap();
    let run = || {
        crate::common::bin()
            .args([OsStr::new("push"), OsStr::new("-q")])
            .args([src.as_os_str(), dst.as_os_str()])
            .env("DEVSYNC_TLS_CA", "")
            .env("DEVSYNC_REMOTE_DIR", "")
            .output()
            .unwrap()
    };
    let out = run();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_tree(&src, &dst);
}

/// Names with terminal escapes or newlines cannot reach the terminal raw through `-i`, and
/// `--json` keeps them exact. Errors name their path once.
#[test]
fn hostile_names_are_escaped_in_human_output() {
    let td = tempfile::tempdir().unwrap();
    let (src, dst) = (td.path().join("src"), td.path().join("dst"));
    fs::create_dir(&src).unwrap();
    let evil = "evil\u{1b}]0;pwned\u{7}\u{1b}[31mred\nfake line";
    fs::write(src.join(evil), b"x").unwrap();
    let out = devsync(&[
        OsStr::new("push"),
        OsStr::new("-i"),
        src.as_os_str(),
        dst.as_os_str(),
    ]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        !text.contains('\u{1b}') && !text.contains('\u{7}'),
        "{text:?}"
    );
    assert!(
        text.lines()
            .any(|l| l == "<f+++++++++ evil\\#033]0;pwned\\#007\\#033[31mred\\#012fake line"),
        "{text:?}"
    );
    assert_eq!(
        text.lines().count(),
        2,
        "one change line and the summary: {text:?}"
    );
    fs::remove_dir_all(&dst).unwrap();
    let v = sync_json("push", &src, &dst, &["-i"], 0);
    assert_eq!(
        v["changes"][0].as_str().unwrap(),
        format!("<f+++++++++ {evil}")
    );
    // A per-file error says its path once.
    let bad = td.path().join("bad");
    fs::create_dir_all(bad.join("f")).unwrap();
    fs::write(bad.join("f/inside"), b"x").unwrap();
    fs::create_dir(td.path().join("src2")).unwrap();
    fs::write(td.path().join("src2/f"), b"a file where a directory is").unwrap();
    let out = devsync(&[
        OsStr::new("push"),
        td.path().join("src2").as_os_str(),
        bad.as_os_str(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(23), "{err}");
    assert!(err.contains("devsync: error: f: "), "{err}");
    assert!(!err.contains("f: f:"), "the path twice: {err}");
}

/// A sparse file stays sparse: its holes do not travel and are holes again on arrival, for a
/// first copy and for a delta.
#[test]
fn sparse_files_arrive_sparse() {
    use std::os::unix::fs::{FileExt, MetadataExt};
    let td = tempfile::tempdir().unwrap();
    let (src, dst, back) = (
        td.path().join("src"),
        td.path().join("dst"),
        td.path().join("back"),
    );
    fs::create_dir(&src).unwrap();
    let f = fs::File::create(src.join("disk.img")).unwrap();
    let size: u64 = 1 << 30;
    f.set_len(size).unwrap();
    for (i, at) in [0u64, 300 << 20, size - (1 << 20)].into_iter().enumerate() {
        f.write_all_at(&random_bytes(1 << 20, i as u64), at)
            .unwrap();
    }
    drop(f);
    let allocated = |p: &Path| fs::metadata(p).unwrap().blocks() * 512;
    assert!(
        allocated(&src.join("disk.img")) < 8 << 20,
        "the source is sparse"
    );
    let v = sync_json("push", &src, &dst, &[], 0);
    assert_same_tree(&src, &dst);
    let wire = num(&v, "bytes_sent") + num(&v, "bytes_received");
    assert!(wire < 16 << 20, "holes travelled: {wire} bytes on the wire");
    assert!(
        allocated(&dst.join("disk.img")) < 16 << 20,
        "arrived dense: {} bytes allocated",
        allocated(&dst.join("disk.img"))
    );
    // An edit in a hole: a delta, and the copy stays sparse.
    let f = fs::OpenOptions::new()
        .write(true)
        .open(src.join("disk.img"))
        .unwrap();
    f.write_all_at(b"written into a hole", 700 << 20).unwrap();
    drop(f);
    let v = sync_json("push", &src, &dst, &[], 0);
    assert_same_tree(&src, &dst);
    assert!(num(&v, "literal_bytes") < 8 << 20, "{v}");
    assert!(allocated(&dst.join("disk.img")) < 16 << 20);
    // And pulled back.
    sync_json("pull", &dst, &back, &[], 0);
    assert_same_tree(&src, &back);
    assert!(allocated(&back.join("disk.img")) < 16 << 20);
}

/// A mistyped flag is a usage error with a suggestion, never a path; a path that starts with
/// `-` goes after `--` or as `./-name`.
#[test]
fn mistyped_flags_are_not_paths() {
    let td = tempfile::tempdir().unwrap();
    let src = td.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), b"x").unwrap();
    let run = |args: &[&str]| {
        let out = crate::common::bin()
            .args(args)
            .current_dir(td.path())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for args in [
        &["push", "src", "--dleete"][..],
        &["push", "--delte", "src", "dst"],
        &["push", "src", "dst", "--delte"],
    ] {
        let (code, err) = run(args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains("unexpected argument '--d"), "{args:?}: {err}");
        assert!(
            err.contains("a similar argument exists: '--delete'"),
            "{args:?}: {err}"
        );
    }
    assert!(!td.path().join("--dleete").exists());
    assert!(!td.path().join("dst").exists());
    // Names that start with a dash, written so that they cannot be flags.
    fs::rename(&src, td.path().join("-src")).unwrap();
    let (code, err) = run(&["push", "-q", "--", "-src", "-dst"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(td.path().join("-dst/f").exists());
    let (code, err) = run(&["push", "-q", "./-src", "./-dst2"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(td.path().join("-dst2/f").exists());
}

/// A pull that fails before it starts creates nothing; `--json` reports every failure as a
/// JSON object (error, stage, exit code).
#[test]
fn failures_create_nothing_and_speak_json() {
    let td = tempfile::tempdir().unwrap();
    let fresh = td.path().join("fresh/dest");
    let json = |args: &[&str], env: &[(&str, &str)]| {
        let mut c = crate::common::bin();
        c.args(args).env_remove("RUNLOOP_API_KEY");
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{args:?}: not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        (out.status.code(), v)
    };
    let f = fresh.to_str().unwrap();
    let (code, v) = json(&["pull", "--json", "dbx_nope:/x", f], &[]);
    assert_eq!(code, Some(1));
    assert_eq!(v["stage"], "api", "{v}");
    assert_eq!(v["exit_code"], 1);
    assert!(
        v["error"].as_str().unwrap().contains("RUNLOOP_API_KEY"),
        "{v}"
    );
    assert!(
        !fresh.exists() && !td.path().join("fresh").exists(),
        "created on failure"
    );
    let missing = td.path().join("no such dir");
    let (code, v) = json(&["pull", "--json", missing.to_str().unwrap(), f], &[]);
    assert_eq!(code, Some(1));
    assert_eq!(v["stage"], "sync", "{v}");
    assert!(!fresh.exists(), "created on failure");
    let (code, v) = json(&["push", "--json", missing.to_str().unwrap(), f], &[]);
    assert_eq!(
        (code, v["stage"].as_str()),
        (Some(1), Some("source")),
        "{v}"
    );
    let (code, v) = json(&["push", "--json", "--dleete", "a", "b"], &[]);
    assert_eq!((code, v["stage"].as_str()), (Some(2), Some("usage")), "{v}");
    assert_eq!(v["exit_code"], 2);
    let (code, v) = json(
        &["push", "--json", td.path().to_str().unwrap(), "dbx_x:/p"],
        &[
            ("RUNLOOP_API_KEY", "k"),
            ("RUNLOOP_BASE_URL", "http://127.0.0.1:9"),
        ],
    );
    assert_eq!((code, v["stage"].as_str()), (Some(1), Some("api")), "{v}");
}

/// The summary is one short line that says what happened, with plurals right and no
/// meaningless ratio; `-v` adds the detail.
#[test]
fn the_summary_is_short_and_true() {
    let td = tempfile::tempdir().unwrap();
    let (src, dst) = (td.path().join("src"), td.path().join("dst"));
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), b"x").unwrap();
    let line = |extra: &[&str]| {
        let mut args = vec![OsStr::new("push"), src.as_os_str(), dst.as_os_str()];
        args.extend(extra.iter().map(OsStr::new));
        let out = devsync(&args);
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let first = line(&[]);
    assert!(
        first.starts_with("changed 1 of 1 entry (1 new); "),
        "{first}"
    );
    assert!(
        first.trim_end().ends_with('s') && first.len() < 100,
        "{first}"
    );
    assert!(
        !first.contains("speedup") && !first.contains("1 files"),
        "{first}"
    );
    let again = line(&[]);
    assert!(
        again.starts_with("up to date: 1 entry checked, "),
        "{again}"
    );
    let verbose = line(&["-v"]);
    assert!(
        verbose.contains("\n  source: 1 file, 0 directories, 0 symlinks; 1 B"),
        "{verbose}"
    );
    assert!(
        !verbose.contains("speedup"),
        "nothing moved: no ratio: {verbose}"
    );
}

/// Completions for the usual shells, and `-v` tracing both ends.
#[test]
fn completions_and_verbose_tracing() {
    for shell in ["bash", "zsh", "fish"] {
        let out = devsync(&[OsStr::new("completions"), OsStr::new(shell)]);
        assert!(out.status.success(), "{shell}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(
            text.contains("push") && text.contains("--delete"),
            "{shell}: {text}"
        );
    }
    let td = tempfile::tempdir().unwrap();
    let (src, dst) = (td.path().join("src"), td.path().join("dst"));
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), b"x").unwrap();
    let out = devsync(&[
        OsStr::new("push"),
        OsStr::new("-v"),
        src.as_os_str(),
        dst.as_os_str(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // The client's own milestones and the helper's (the receiver here).
    assert!(err.contains("[client] helper ready"), "{err}");
    assert!(err.contains("[recv] all 1 entries planned"), "{err}");
    assert!(!err.contains('\u{1b}'), "no colours into a pipe: {err}");
}

#[test]
fn a_push_waits_for_another_session_writing_into_the_same_directory() {
    let td = tempfile::tempdir().unwrap();
    let (src, dst) = (td.path().join("src"), td.path().join("dst"));
    make_tree(&src, 77, &spec());
    fs::create_dir(&dst).unwrap();
    // Another session's lock on the destination (as a helper finishing what its vanished
    // client sent holds it), let go after a while.
    let held = fs::File::open(&dst).unwrap();
    rustix::fs::flock(&held, rustix::fs::FlockOperation::LockExclusive).unwrap();
    let release = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(700));
        drop(held);
    });
    let out = devsync(&[OsStr::new("push"), src.as_os_str(), dst.as_os_str()]);
    release.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("another devsync session is writing here; waiting"),
        "{err}"
    );
    assert_same_tree(&src, &dst);
}
