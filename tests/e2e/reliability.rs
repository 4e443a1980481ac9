//! Nothing lost, nothing mixed: files rewritten while they are sent, devsync's own temp names
//! against a user's look-alikes, leftovers of killed sessions, resumed big transfers.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::common::*;

const BLOCK: usize = 64 << 10;

/// How a test's writer behaves.
#[derive(Debug, Clone, Copy)]
enum Writer {
    /// Pass after pass, pausing this long between them (zero: it never holds still).
    Pausing(Duration),
    /// This many passes, then quiet.
    Burst(u32),
    /// Appends a little every millisecond (a busy log): it never holds still either.
    Appending,
}

/// Writes pass after pass over `path` in place, block by block; each block holds its pass
/// number. Returns the number of passes written.
fn rewriter(path: &Path, blocks: usize, how: Writer, stop: Arc<AtomicBool>) -> u32 {
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    if let Writer::Appending = how {
        let mut lines = 0;
        while !stop.load(Ordering::Relaxed) {
            let end = f.metadata().unwrap().len();
            f.write_all_at(&[b'x'; 4096], end).unwrap();
            lines += 1;
            std::thread::sleep(Duration::from_millis(1));
        }
        return lines;
    }
    let mut pass = 1u32;
    let mut buf = vec![0u8; BLOCK];
    while !stop.load(Ordering::Relaxed) {
        if let Writer::Burst(n) = how
            && pass > n
        {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        for b in 0..blocks {
            buf[..4].copy_from_slice(&pass.to_le_bytes());
            buf[4..8].copy_from_slice(&(b as u32).to_le_bytes());
            f.write_all_at(&buf, (b * BLOCK) as u64).unwrap();
        }
        pass += 1;
        if let Writer::Pausing(p) = how
            && !p.is_zero()
        {
            std::thread::sleep(p);
        }
    }
    pass - 1
}

/// The passes a copy's blocks carry; a version that existed is pass `p` up to some block
/// and pass `p - 1` after it (a read at one instant of a file being rewritten in order).
fn passes(data: &[u8]) -> Vec<u32> {
    data.chunks(BLOCK)
        .map(|b| u32::from_le_bytes(b[..4].try_into().unwrap()))
        .collect()
}

fn existed(p: &[u32]) -> bool {
    let Some(&first) = p.first() else {
        return true;
    };
    let split = p.iter().position(|&x| x != first).unwrap_or(p.len());
    p[split..].iter().all(|&x| x + 1 == first)
}

/// One push of a file that is being rewritten in place; returns the exit code.
fn push_while_rewriting(
    run: &dyn Fn(&Path) -> (i32, String),
    src: &Path,
    dst_file: &Path,
    how: Writer,
    fresh: bool,
) -> i32 {
    if fresh {
        // No old copy: the file travels whole.
        let _ = fs::remove_file(dst_file);
    }
    let big = src.join("big");
    let blocks = 256; // 16 MiB: chunked, delta-sized
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (big, stop) = (big.clone(), stop.clone());
        std::thread::spawn(move || rewriter(&big, blocks, how, stop))
    };
    // The first pass is under way when the push starts.
    std::thread::sleep(Duration::from_millis(5));
    let before = fs::read(dst_file).ok();
    let (code, err) = run(src);
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().unwrap();
    assert!(written >= 1, "the writer ran");
    let after = fs::read(dst_file).ok();
    match code {
        // A read that happened to fall between two writes (a starved writer) is a real
        // version: fine, as long as it is one.
        0 if matches!(how, Writer::Appending) => {
            let data = after.unwrap_or_default();
            let tail = data.get(blocks * BLOCK..).unwrap_or_default();
            assert!(
                tail.len() % 4096 == 0 && tail.iter().all(|&b| b == b'x'),
                "a version that never existed arrived: {} bytes",
                data.len()
            );
        }
        0 => {
            let p = passes(after.as_deref().unwrap_or_default());
            assert!(
                existed(&p),
                "a version that never existed arrived: passes {p:?}"
            );
        }
        23 => {
            assert!(err.contains("changed while being sent"), "{err}");
            assert_eq!(after, before, "the old copy (or none) must stay");
        }
        other => panic!("exit {other}: {err}"),
    }
    code
}

fn rewritten_file_tests(run: &dyn Fn(&Path) -> (i32, String), dst_file: &Path, src: &Path) {
    // An old copy on the receiving side first, so deltas are in play too.
    let (code, err) = run(src);
    assert_eq!(code, 0, "{err}");
    let mut codes = Vec::new();
    let ms = Duration::from_millis;
    for how in [
        Writer::Pausing(ms(0)),
        Writer::Pausing(ms(0)),
        Writer::Pausing(ms(30)),
    ] {
        for fresh in [true, false] {
            let code = push_while_rewriting(run, src, dst_file, how, fresh);
            codes.push((how, fresh, code));
        }
    }
    // A writer that stops soon is waited out: the sync succeeds with its last version.
    let how = Writer::Burst(2);
    let code = push_while_rewriting(run, src, dst_file, how, false);
    codes.push((how, false, code));
    assert_eq!(code, 0, "{codes:?}");
    // A file that never holds still is reported (exit 23) and not updated, never sent as
    // whatever was read: written over pass after pass, or appended to all along.
    for fresh in [true, false] {
        let code = push_while_rewriting(run, src, dst_file, Writer::Appending, fresh);
        codes.push((Writer::Appending, fresh, code));
    }
    eprintln!("exit codes while rewriting: {codes:?}");
    // Each kind of writer that never holds still is caught (one run of each at least: a run
    // whose writer was starved long enough may read a real version, checked above).
    let caught = |kind: &dyn Fn(&Writer) -> bool| {
        codes.iter().any(|(how, _, code)| kind(how) && *code == 23)
    };
    assert!(
        caught(&|h| matches!(h, Writer::Pausing(p) if p.is_zero())),
        "{codes:?}"
    );
    assert!(caught(&|h| matches!(h, Writer::Appending)), "{codes:?}");
    assert!(own_files(dst_file.parent().unwrap()).is_empty());
}

fn sixteen_mib_source(dir: &Path) -> std::path::PathBuf {
    let src = dir.join("src");
    fs::create_dir(&src).unwrap();
    let mut data = vec![0u8; 256 * BLOCK];
    for (b, block) in data.chunks_mut(BLOCK).enumerate() {
        block[4..8].copy_from_slice(&(b as u32).to_le_bytes());
    }
    fs::write(src.join("big"), data).unwrap();
    fs::write(src.join("small"), b"small").unwrap();
    src
}

#[test]
fn files_rewritten_while_pushed_arrive_whole_or_not_at_all() {
    let td = tempfile::tempdir().unwrap();
    let src = sixteen_mib_source(td.path());
    let dst = td.path().join("dst");
    let run = |src: &Path| {
        let out = devsync(&[OsStr::new("push"), src.as_os_str(), dst.as_os_str()]);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    rewritten_file_tests(&run, &dst.join("big"), &src);
}

/// The same from the other side: the file is rewritten where a pull reads it.
#[test]
fn files_rewritten_while_pulled_arrive_whole_or_not_at_all() {
    let td = tempfile::tempdir().unwrap();
    let src = sixteen_mib_source(td.path());
    let dst = td.path().join("dst");
    let run = |src: &Path| {
        let out = devsync(&[OsStr::new("pull"), src.as_os_str(), dst.as_os_str()]);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    rewritten_file_tests(&run, &dst.join("big"), &src);
}

#[test]
fn files_rewritten_while_pushed_to_a_devbox_arrive_whole_or_not_at_all() {
    let ep = crate::remote::endpoint(&["dbx_rw"], None, "user", devsync::server::KeyFormat::Pkcs8);
    let td = tempfile::tempdir().unwrap();
    let src = sixteen_mib_source(td.path());
    let dst = td.path().join("dst");
    let target = format!("dbx_rw:{}", dst.display());
    let run = |src: &Path| {
        let (code, _, err) = ep.run(&["push", src.to_str().unwrap(), &target], |_| {});
        (code, err)
    };
    rewritten_file_tests(&run, &dst.join("big"), &src);
}

/// A user's own `.devsync-tmp.*` files are data like any other; devsync's own leftovers are
/// recognised (by their check hash and a free lock) and swept.
#[test]
fn look_alike_names_are_synced_and_real_leftovers_swept() {
    let td = tempfile::tempdir().unwrap();
    let (src, dst, back) = (
        td.path().join("src"),
        td.path().join("dst"),
        td.path().join("back"),
    );
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join(".devsync-tmp.notes"), b"mine").unwrap();
    fs::write(src.join("d/.devsync-tmp.123.abc.4"), b"also mine").unwrap();
    fs::write(src.join("d/f"), b"v1").unwrap();
    sync_json("push", &src, &dst, &[], 0);
    assert_same_tree(&src, &dst);
    sync_json("pull", &dst, &back, &[], 0);
    assert_same_tree(&src, &back);
    // Leftovers as a killed session leaves them: real temp names, nobody holding them.
    let leftover = |dir: &Path, n: u64| {
        let name = String::from_utf8(devsync::engine::tempname::temp_name(n)).unwrap();
        fs::write(dir.join(&name), b"junk").unwrap();
        dir.join(name)
    };
    let in_d = leftover(&dst.join("d"), 1);
    let in_root = leftover(&dst, 2);
    // One held by a live session (a lock on it) is left alone.
    let live = leftover(&dst.join("d"), 3);
    let held = fs::File::open(&live).unwrap();
    rustix::fs::flock(&held, rustix::fs::FlockOperation::LockExclusive).unwrap();
    // They are never synced back, and a pull does not drop the user's look-alikes.
    let back2 = td.path().join("back2");
    let out = devsync(&[OsStr::new("pull"), dst.as_os_str(), back2.as_os_str()]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{said}");
    // Each one of ours is left out with a word (a warning, not an error: not user data).
    assert_eq!(
        said.matches("not sent: a devsync temp").count(),
        3,
        "{said}"
    );
    let theirs = |p: &Path| {
        devsync::engine::tempname::ours(p.file_name().unwrap().as_encoded_bytes()).is_some()
    };
    assert_eq!(
        snapshot_filtered(&dst, &theirs),
        snapshot(&back2),
        "pulled exactly the user's entries"
    );
    // Replacing a file in `d` sweeps `d`. Nothing is replaced in the root, but writing the
    // leftover there left its mtime off the sender's: that is enough to sweep it too.
    fs::write(src.join("d/f"), b"v2").unwrap();
    sync_json("push", &src, &dst, &[], 0);
    assert!(!in_d.exists(), "leftover in d survived");
    assert!(live.exists(), "a live session's temp was removed");
    assert!(!in_root.exists(), "leftover in the root survived");
    // In a directory whose mtime was put back (nothing says a session wrote there), only
    // --delete's scan of the whole destination finds a leftover.
    let hidden = leftover(&dst.join("d"), 4);
    let t = std::fs::metadata(src.join("d"))
        .unwrap()
        .modified()
        .unwrap();
    fs::File::open(dst.join("d"))
        .unwrap()
        .set_modified(t)
        .unwrap();
    sync_json("push", &src, &dst, &[], 0);
    assert!(hidden.exists(), "swept although nothing pointed at it");
    sync_json("push", &src, &dst, &["--delete"], 0);
    assert!(!hidden.exists(), "leftover in d survived --delete");
    assert!(live.exists());
    drop(held);
    fs::remove_file(&live).unwrap();
    sync_json("push", &src, &dst, &[], 0);
    assert_same_tree(&src, &dst);
}

/// A big upload cut off halfway resumes from what arrived: the rerun moves only the rest.
#[test]
fn an_interrupted_big_upload_resumes_from_its_partial() {
    let td = tempfile::tempdir().unwrap();
    let (src, dst) = (td.path().join("src"), td.path().join("dst"));
    fs::create_dir(&src).unwrap();
    // Big enough that a kill meant for the middle lands before the end even when this test
    // thread is starved for a while under the parallel suite.
    let size = 96usize << 20;
    fs::write(src.join("big.img"), random_bytes(size, 77)).unwrap();
    let mut killed = false;
    for attempt in 0..5 {
        let child = crate::common::bin()
            .args([OsStr::new("push"), src.as_os_str(), dst.as_os_str()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The helper is the receiver here; kill it once it has written about half.
        let start = Instant::now();
        let helper = loop {
            if let Some(&h) = descendants(child.id()).first() {
                break Some(h);
            }
            if start.elapsed() > Duration::from_secs(10) {
                break None;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let helper = helper.expect("helper started");
        // It reads each byte from the pipe and writes it to the file: 3/4 of the data moved
        // is about 1.5 × `size`, much of it read but not yet written.
        killed = kill_after_bytes(helper, size as u64 * 3 / 2, Duration::from_secs(30));
        let out = child.wait_with_output().unwrap();
        if killed {
            assert_ne!(out.status.code(), Some(0), "attempt {attempt}");
            break;
        }
        fs::remove_dir_all(&dst).unwrap();
    }
    assert!(killed, "the helper finished before it could be interrupted");
    assert!(
        !dst.join("big.img").exists(),
        "a partial file at the final path"
    );
    assert_eq!(own_files(&dst).len(), 1, "the partial is kept for resuming");
    let v = sync_json("push", &src, &dst, &[], 0);
    assert_same_tree(&src, &dst);
    assert!(own_files(&dst).is_empty(), "the partial was used up");
    let (literal, resumed) = (num(&v, "literal_bytes"), num(&v, "matched_bytes"));
    assert_eq!(literal + resumed, size as u64, "{v}");
    assert!(
        resumed >= size as u64 / 4,
        "resumed: only the rest travels ({literal} of {size} bytes literal): {v}"
    );
}

/// The destination root's own mode and mtime end up as the source root's.
#[test]
fn the_root_directory_itself_is_mirrored() {
    let td = tempfile::tempdir().unwrap();
    let (src, dst) = (td.path().join("src"), td.path().join("dst"));
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), b"x").unwrap();
    fs::set_permissions(&src, std::os::unix::fs::PermissionsExt::from_mode(0o750)).unwrap();
    let t = filetime_of(&src);
    sync_json("push", &src, &dst, &[], 0);
    assert_same_tree(&src, &dst);
    assert_eq!(filetime_of(&dst), t);
    // A read-only source root: the receiver still fills it, and mirrors it at the end.
    fs::write(src.join("g"), b"y").unwrap();
    fs::set_permissions(&src, std::os::unix::fs::PermissionsExt::from_mode(0o555)).unwrap();
    sync_json("push", &src, &dst, &[], 0);
    assert_same_tree(&src, &dst);
    sync_json("push", &src, &dst, &[], 0);
    fs::set_permissions(&src, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    fs::set_permissions(&dst, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

fn filetime_of(p: &Path) -> (i64, i64) {
    use std::os::unix::fs::MetadataExt;
    let md = fs::metadata(p).unwrap();
    (md.mtime(), md.mtime_nsec())
}
