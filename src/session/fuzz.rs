//! Structure-aware fuzzing of whole message sequences against the real receiver and sender.
//!
//! A fake peer plays the other role from a small model of the session (which ids were listed,
//! which the real side asked for, what it would expect next) and, steered by seeded random
//! bytes (`arbitrary`), answers correctly, lies (wrong lengths, digests, chunk indices, delta
//! windows, counts), repeats itself, answers what nobody asked, sends hostile paths, arbitrary
//! messages and broken frames, and hangs up anywhere. Each case must end (under a time limit)
//! without a panic, and nothing may change outside the receiver's root, however hostile the
//! sequence. `DEVSYNC_FUZZ_CASES` sets how many cases run; under `CI=true` a million against
//! the receiver and a hundred thousand against the sender, else a twentieth of that.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::VecDeque;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use rand::{RngCore, SeedableRng};
use tokio::io::AsyncWriteExt;

use super::{Silent, conn, receiver, sender};
use crate::engine::delta::SigParams;
use crate::engine::hash::{self, CHUNK};
use crate::engine::{Entry, EntryKind, Mtime, RelPath};
use crate::proto::frame::encode;
use crate::proto::{FileId, FrameReader, FrameWriter, Msg, Stamp, SyncOptions, WholeItem};

/// How receiver cases ended, to see that the fuzzer gets past the first message: sessions that
/// completed, files committed, protocol violations caught, other errors.
static ENDS: [std::sync::atomic::AtomicU64; 4] =
    [const { std::sync::atomic::AtomicU64::new(0) }; 4];

/// Counts what the receiver reports in a case.
struct Counting;
impl super::Observer for Counting {
    fn event(&self, ev: crate::proto::Event) {
        if let crate::proto::Event::Change(_) = ev {
            ENDS[1].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// A case that has not ended by then is a hang.
const CASE_LIMIT: Duration = Duration::from_secs(10);

/// How many cases to run: `DEVSYNC_FUZZ_CASES`, else `ci` under `CI=true`, else `dev`.
fn cases(dev: u64, ci: u64) -> u64 {
    let on_ci = std::env::var("CI").is_ok_and(|v| v == "true");
    std::env::var("DEVSYNC_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if on_ci { ci } else { dev })
}

/// Names the fake sender lists, some colliding with what the receiver has.
const NAMES: &[&[u8]] = &[
    b"f0",
    b"f1",
    b"f2",
    b"d0",
    b"d0/f3",
    b"d0/d1",
    b"d0/d1/f4",
    b"base.bin",
    b"big.bin",
    b"link",
    b".devsync-tmp.x",
];

/// Hostile names (the protocol must refuse them, or the receiver must not follow them).
const HOSTILE: &[&[u8]] = &[
    b"link/escape",
    b"../escape",
    b"/abs",
    b"a//b",
    b"./x",
    b"d0/..",
    b"",
];

fn stamp(u: &mut Unstructured<'_>, honest: bool) -> Stamp {
    let odd = |u: &mut Unstructured<'_>, n: u32| !honest && u.ratio(1, n).unwrap_or(false);
    Stamp {
        mode: if odd(u, 20) {
            u.arbitrary().unwrap_or(0)
        } else {
            0o644
        },
        mtime: Mtime {
            sec: 1_700_000_000 + i64::from(u.arbitrary::<u8>().unwrap_or(0)),
            nsec: if odd(u, 30) {
                2_000_000_000
            } else {
                u.int_in_range(0..=999_999_999).unwrap_or(0)
            },
        },
    }
}

/// The receiver's requests, as seen by the fake sender.
#[derive(Debug, Clone)]
enum Ask {
    Whole(FileId),
    Sig(FileId),
    Hashes(FileId),
    Chunks(FileId),
}

/// What the fake sender knows: the list so far and its (claimed) file sizes.
#[derive(Default)]
struct Model {
    listed: Vec<(Vec<u8>, u64, bool)>,
    ended: bool,
    /// Generations begun; whether one is under way.
    gens: u64,
    in_gen: bool,
    /// A mostly well-behaved sender (it still lies now and then): these cases get deep into
    /// the receiver (transfers, deltas, commits, deletions) before anything odd happens.
    honest: bool,
}

/// What the fake sender has heard from the receiver.
#[derive(Default)]
struct Heard {
    asks: VecDeque<Ask>,
    /// The receiver said `Done`: a sender would say `Bye` now.
    done: bool,
}

fn entry(name: &[u8], kind: EntryKind, st: Stamp) -> Entry {
    // Hostile names travel unchecked, as a hostile peer would send them.
    let path: RelPath =
        postcard::from_bytes(&postcard::to_stdvec(&serde_bytes::Bytes::new(name)).unwrap())
            .unwrap();
    Entry {
        path,
        kind,
        mode: st.mode,
        mtime: st.mtime,
    }
}

/// One step of a hostile sender: frames to write, or `None` to hang up.
fn sender_step(u: &mut Unstructured<'_>, m: &mut Model, heard: &mut Heard) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut frame = |msg: &Msg, payload: &[u8]| {
        // Some messages cannot be encoded (too big): skipping them is fine.
        let _ = encode(msg, payload, &mut out);
    };
    if !m.in_gen && (m.honest || u.ratio(9, 10).ok()?) {
        // A generation begins (again, after `Done`), sometimes with renames and scopes.
        m.in_gen = true;
        m.listed.clear();
        m.ended = false;
        heard.asks.clear();
        heard.done = false;
        let generation = if !m.honest && u.ratio(1, 20).ok()? {
            0
        } else {
            m.gens
        };
        m.gens += 1;
        frame(
            &Msg::GenStart {
                generation,
                whole: u.ratio(2, 3).ok()?,
                replace_dirs: u.arbitrary().ok()?,
            },
            &[],
        );
        if u.ratio(1, 3).ok()? {
            let park = |k: u64| RelPath::unchecked(crate::engine::tempname::move_name(m.gens, k));
            let name = |u: &mut Unstructured<'_>| -> Option<RelPath> {
                let n = if !m.honest && u.ratio(1, 10).ok()? {
                    *u.choose(HOSTILE).ok()?
                } else {
                    *u.choose(NAMES).ok()?
                };
                Some(entry(n, EntryKind::Dir, stamp(u, true)).path)
            };
            let n = u.int_in_range(1..=3).ok()?;
            let mut stash = Vec::new();
            let mut place = Vec::new();
            for k in 0..n {
                stash.push((name(u)?, park(k)));
                place.push((park(k), name(u)?));
            }
            if !m.honest && u.ratio(1, 5).ok()? {
                std::mem::swap(&mut stash, &mut place); // parking names on the wrong side
            }
            frame(&Msg::Stash { moves: stash }, &[]);
            frame(&Msg::Place { moves: place }, &[]);
        }
        if u.ratio(1, 3).ok()? {
            let paths = (0..u.int_in_range(0..=2).ok()?)
                .map(|_| {
                    u.choose(NAMES)
                        .map(|n| entry(n, EntryKind::Dir, stamp(u, true)).path)
                })
                .collect::<Result<Vec<_>, _>>()
                .ok()?;
            frame(
                &Msg::Scope {
                    root: u.arbitrary().ok()?,
                    paths,
                },
                &[],
            );
        }
        return Some(out);
    }
    let choice: u8 = if heard.done && u.ratio(9, 10).ok()? {
        if u.ratio(1, 3).ok()? {
            m.in_gen = false; // another generation, next step
            return Some(out);
        }
        85 // `Bye`, as a real sender answers `Done`
    } else if !heard.asks.is_empty() && u.ratio(1, 2).ok()? {
        50 // answer what was asked
    } else if m.honest {
        // Listing, ending the list, answering (or waiting to be asked); never the random or
        // broken kinds.
        match u.int_in_range(0..=9).ok()? {
            _ if m.ended => 50,
            0..=6 => 0,
            _ => 25,
        }
    } else {
        u.int_in_range(0..=99).ok()?
    };
    let asks = &mut heard.asks;
    match choice {
        // List entries, usually with the right first id.
        0..=24 if !m.ended => {
            let n = u.int_in_range(1..=4).ok()?;
            let first = if !m.honest && u.ratio(1, 20).ok()? {
                u.arbitrary().ok()?
            } else {
                m.listed.len() as FileId
            };
            let mut entries = Vec::new();
            for _ in 0..n {
                let name = if !m.honest && u.ratio(1, 25).ok()? {
                    *u.choose(HOSTILE).ok()?
                } else {
                    *u.choose(NAMES).ok()?
                };
                if m.honest {
                    // Parents first, as the protocol requires of an honest sender.
                    for (i, _) in name.iter().enumerate().filter(|(_, c)| **c == b'/') {
                        let parent = &name[..i];
                        if !m.listed.iter().any(|l| l.0 == parent) {
                            m.listed.push((parent.to_vec(), 0, false));
                            entries.push(entry(parent, EntryKind::Dir, stamp(u, true)));
                        }
                    }
                    if m.listed.iter().any(|l| l.0 == name) {
                        continue; // listed once
                    }
                }
                let st = stamp(u, m.honest);
                let (kind, size, is_file) = match u.int_in_range(0..=9).ok()? {
                    0..=5 => {
                        let size = match u.int_in_range(0..=19).ok()? {
                            0 => 9 << 20,
                            1 => u64::from(u.arbitrary::<u32>().ok()?),
                            _ => u64::from(u.int_in_range(0..=5000u32).ok()?),
                        };
                        (EntryKind::File { size, digest: None }, size, true)
                    }
                    6..=7 => (EntryKind::Dir, 0, false),
                    _ => (
                        EntryKind::Symlink {
                            target: if u.ratio(1, 4).ok()? {
                                b"../../outside".to_vec()
                            } else {
                                b"f0".to_vec()
                            },
                        },
                        0,
                        false,
                    ),
                };
                m.listed.push((name.to_vec(), size, is_file));
                entries.push(entry(name, kind, st));
            }
            frame(
                &Msg::Entries {
                    first_id: first,
                    entries,
                    changed: u.arbitrary().ok()?,
                },
                &[],
            );
        }
        25..=32 => {
            m.ended = true;
            let count = if u.ratio(1, 10).ok()? {
                u.arbitrary().ok()?
            } else {
                m.listed.len() as u32
            };
            let honest = m.honest;
            let root = u.ratio(1, 2).ok()?.then(|| stamp(u, honest));
            frame(
                &Msg::EndOfList {
                    count,
                    scan_errors: u.int_in_range(0..=1).ok()?,
                    root,
                },
                &[],
            );
        }
        // Answer (or mis-answer) what the receiver asked for.
        33..=74 => {
            let Some(ask) = asks.pop_front() else {
                return Some(out);
            };
            let id = match &ask {
                Ask::Whole(id) | Ask::Sig(id) | Ask::Hashes(id) | Ask::Chunks(id) => *id,
            };
            let lie_id = |u: &mut Unstructured<'_>| -> Option<FileId> {
                Some(if u.ratio(1, 15).ok()? {
                    u.arbitrary().ok()?
                } else {
                    id
                })
            };
            let size = m
                .listed
                .get(id as usize)
                .map_or(0, |l| l.1)
                .min(3 * CHUNK + 17);
            // Mostly what was listed (more than a chunk only now and then: it costs time).
            let cap = if u.ratio(1, 10).ok()? {
                3 * CHUNK + 17
            } else {
                CHUNK + 17
            };
            let len = if u.ratio(1, 10).ok()? {
                u.int_in_range(0..=cap as u32).ok()? as u64
            } else {
                size.min(cap)
            };
            let mut data = vec![0u8; len as usize];
            let fill: u8 = u.arbitrary().ok()?;
            data.iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = fill ^ i as u8);
            let digest = if u.ratio(1, 8).ok()? {
                u.arbitrary().ok()?
            } else {
                *blake3::hash(&data).as_bytes()
            };
            let st = stamp(u, m.honest);
            match (ask, u.int_in_range(0..=9).ok()?) {
                (Ask::Whole(_), 0..=4) if len <= CHUNK => {
                    let mut files = vec![WholeItem {
                        id: lie_id(u)?,
                        len: len as u32,
                        digest,
                        stamp: st,
                    }];
                    if u.ratio(1, 10).ok()? {
                        files.push(files[0].clone()); // the same file twice
                    }
                    let payload: Vec<u8> = files.iter().flat_map(|_| data.clone()).collect();
                    frame(&Msg::WholeFiles { files }, &payload);
                }
                (_, 5) => frame(
                    &Msg::SendFailed {
                        id: lie_id(u)?,
                        message: "nope".into(),
                        transient: u.arbitrary().ok()?,
                    },
                    &[],
                ),
                (_, 6) => frame(&Msg::Restart { id: lie_id(u)? }, &[]),
                (Ask::Sig(_), 7) => frame(
                    &Msg::Identical {
                        id: lie_id(u)?,
                        stamp: st,
                    },
                    &[],
                ),
                (Ask::Hashes(_), _) => {
                    let n = hash::chunk_count(len) as usize;
                    let cvs = (0..n)
                        .map(|k| {
                            let s = hash::chunk_span(len, k as u64);
                            hash::chunk_cv(k as u64, &data[s.0 as usize..s.0 as usize + s.1])
                        })
                        .collect();
                    frame(
                        &Msg::NewHashes {
                            id: lie_id(u)?,
                            len,
                            cvs,
                            stamp: st,
                        },
                        &[],
                    );
                }
                (ask, _) => {
                    // Chunks (literal, copies, deltas), then the end.
                    for k in 0..hash::chunk_count(len).min(4) {
                        let (off, n) = hash::chunk_span(len, k);
                        let piece = &data[off as usize..off as usize + n];
                        let chunk = if u.ratio(1, 15).ok()? {
                            u.arbitrary().ok()?
                        } else {
                            k as u32
                        };
                        match (&ask, u.int_in_range(0..=3).ok()?) {
                            (Ask::Sig(_) | Ask::Chunks(_), 0) => {
                                frame(&Msg::Copy { id, chunk }, &[])
                            }
                            (Ask::Sig(_) | Ask::Chunks(_), 1) => {
                                let window_start = u.int_in_range(0..=3).ok()?;
                                let window_len = u.int_in_range(0..=3).ok()?;
                                let delta = if u.ratio(1, 2).ok()? {
                                    crate::engine::delta::literal(piece)
                                } else {
                                    u.arbitrary::<Vec<u8>>().ok()?
                                };
                                frame(
                                    &Msg::Delta {
                                        id,
                                        chunk,
                                        window_start,
                                        window_len,
                                        len: n as u32,
                                    },
                                    &delta,
                                );
                            }
                            _ => frame(&Msg::Data { id, chunk }, piece),
                        }
                    }
                    frame(
                        &Msg::FileEnd {
                            id: lie_id(u)?,
                            len,
                            digest,
                            stamp: st,
                        },
                        &[],
                    );
                }
            }
        }
        // Anything at all, well-formed.
        75..=84 => {
            let msg = Msg::arbitrary(u).ok()?;
            let payload: Vec<u8> = if u.ratio(1, 3).ok()? {
                u.arbitrary().ok()?
            } else {
                Vec::new()
            };
            frame(&msg, &payload);
        }
        85..=88 => frame(&Msg::Bye, &[]),
        89..=90 => {
            frame(
                &Msg::Done {
                    stats: Default::default(),
                    unsynced: Vec::new(),
                    overflow: false,
                },
                &[],
            );
        }
        // A frame cut short or garbage: the stream is broken from here.
        91..=92 => {
            let mut f = Vec::new();
            let _ = encode(&Msg::Ping, &[], &mut f);
            out.extend_from_slice(&f[..f.len() / 2]);
            out.extend(u.arbitrary::<Vec<u8>>().ok()?);
        }
        93..=94 => frame(&Msg::Ping, &[]),
        _ => return None,
    }
    Some(out)
}

/// A receiving root with a small and a big base file and a symlink out of it, next to a
/// directory nothing may touch.
struct Arena {
    dir: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
    /// The outside directory's and its file's (mtime, size), to see that nothing changed.
    untouched: [(i64, i64, u64); 2],
}

impl Arena {
    fn new() -> Arena {
        let base = if Path::new("/dev/shm").is_dir() {
            tempfile::tempdir_in("/dev/shm").unwrap()
        } else {
            tempfile::tempdir().unwrap()
        };
        let root = base.path().join("root");
        let outside = base.path().join("outside");
        std::fs::create_dir_all(root.join("d0")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("victim"), b"must not change").unwrap();
        let look = |p: &Path| {
            let m = Self::stat(p);
            (m.mtime(), m.mtime_nsec(), m.len())
        };
        let untouched = [look(&outside), look(&outside.join("victim"))];
        // Pristine copies of the base files, outside the root, hard-linked back in after a
        // case replaced or deleted them (a link costs nothing; rewriting 9 MiB per case did).
        let fresh = |p: &Path, len: usize, seed: u64| {
            let mut d = vec![0u8; len];
            rand_chacha::ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut d);
            std::fs::write(p, d).unwrap();
        };
        fresh(&base.path().join("base.bin"), 8192, 1);
        fresh(&base.path().join("big.bin"), 9 << 20, 2);
        let mut a = Arena {
            dir: base,
            root,
            outside,
            untouched,
        };
        a.restore();
        a
    }

    fn stat(p: &Path) -> std::fs::Metadata {
        std::fs::symlink_metadata(p).unwrap()
    }

    /// Puts the root back the way it was (only what a case changed), and checks the outside.
    fn restore(&mut self) {
        let look = |p: &Path| {
            let m = Self::stat(p);
            (m.mtime(), m.mtime_nsec(), m.len())
        };
        let now = [look(&self.outside), look(&self.outside.join("victim"))];
        assert_eq!(now, self.untouched, "something outside the root changed");
        assert_eq!(
            std::fs::read_dir(&self.outside).unwrap().count(),
            1,
            "something was created outside the root"
        );
        // The root's parent too: where `../x` or an absolute-looking path would land.
        let mut beside: Vec<_> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        beside.sort();
        assert_eq!(
            beside,
            ["base.bin", "big.bin", "outside", "root"],
            "something was created beside the root"
        );
        let relink = |name: &str| {
            let (p, pristine) = (self.root.join(name), self.dir.path().join(name));
            let want = Self::stat(&pristine);
            let same = std::fs::symlink_metadata(&p).is_ok_and(|m| m.ino() == want.ino());
            if !same {
                let _ = std::fs::remove_dir_all(&p);
                let _ = std::fs::remove_file(&p);
                std::fs::hard_link(&pristine, &p).unwrap();
            }
            // Attributes may have been set on the shared inode: put them back.
            std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o644))
                .unwrap();
            std::fs::File::options()
                .write(true)
                .open(&p)
                .unwrap()
                .set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1_600_000_000))
                .unwrap();
        };
        for entry in std::fs::read_dir(&self.root).unwrap() {
            let e = entry.unwrap();
            let name = e.file_name();
            let keep = matches!(name.to_str(), Some("base.bin" | "big.bin" | "link" | "d0"));
            let p = e.path();
            if !keep {
                let ft = e.file_type().unwrap();
                if ft.is_dir() {
                    let _ = std::fs::set_permissions(
                        &p,
                        std::os::unix::fs::PermissionsExt::from_mode(0o700),
                    );
                    std::fs::remove_dir_all(&p).unwrap();
                } else {
                    std::fs::remove_file(&p).unwrap();
                }
            }
        }
        relink("base.bin");
        relink("big.bin");
        let link = self.root.join("link");
        if std::fs::read_link(&link).map_or(true, |t| t != Path::new("../outside")) {
            let _ = std::fs::remove_dir_all(&link);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink("../outside", &link).unwrap();
        }
        let d0 = self.root.join("d0");
        if !std::fs::symlink_metadata(&d0).is_ok_and(|m| m.is_dir()) {
            let _ = std::fs::remove_file(&d0);
            std::fs::create_dir(&d0).unwrap();
        }
        std::fs::set_permissions(&d0, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        for e in std::fs::read_dir(&d0).unwrap() {
            let p = e.unwrap().path();
            if Self::stat(&p).is_dir() {
                let _ = std::fs::set_permissions(
                    &p,
                    std::os::unix::fs::PermissionsExt::from_mode(0o700),
                );
                std::fs::remove_dir_all(&p).unwrap();
            } else {
                std::fs::remove_file(&p).unwrap();
            }
        }
        std::fs::set_permissions(
            &self.root,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
    }
}

/// One case against the real receiver: a hostile sender's frames, interleaved with reading
/// what the receiver asks for.
async fn receiver_case(root: &Path, bytes: &[u8], opts: SyncOptions) {
    let mut u = Unstructured::new(bytes);
    let (ours, theirs) = tokio::io::duplex(1 << 20);
    let (their_r, their_w) = tokio::io::split(theirs);
    let (mut our_r, mut our_w) = tokio::io::split(ours);
    let (out, pending) = conn::channel();
    let writer = pending.start(FrameWriter::new(their_w));
    let root = root.to_path_buf();
    let recv = tokio::spawn(async move {
        let mut reader = FrameReader::new(their_r);
        let r = receiver::run(&mut reader, out, root, opts, Arc::new(Counting)).await;
        drop(reader);
        let end = match &r {
            Ok(_) => 0,
            Err(super::SessionError::Violation(_) | super::SessionError::Proto(_)) => 2,
            Err(_) => 3,
        };
        ENDS[end].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        r
    });
    // What the receiver asks for, as it asks.
    let heard = Arc::new(Mutex::new(Heard::default()));
    let seen = heard.clone();
    let listener = tokio::spawn(async move {
        let mut r = FrameReader::new(&mut our_r);
        while let Ok(Some((msg, _))) = r.next().await {
            let mut h = seen.lock().unwrap();
            let a = &mut h.asks;
            match msg {
                Msg::NeedWhole { ids } => a.extend(ids.into_iter().map(Ask::Whole)),
                Msg::Signature { id, .. } => a.push_back(Ask::Sig(id)),
                Msg::NeedDelta { id, .. } => a.push_back(Ask::Hashes(id)),
                Msg::DeltaRequest { id, .. } | Msg::NeedChunks { id, .. } => {
                    a.push_back(Ask::Chunks(id))
                }
                Msg::Done { .. } => h.done = true,
                _ => {}
            }
        }
    });
    let mut model = Model {
        honest: u.ratio(1, 3).unwrap_or(false),
        ..Model::default()
    };
    for _ in 0..64 {
        let step = {
            let mut h = heard.lock().unwrap();
            sender_step(&mut u, &mut model, &mut h)
        };
        let Some(frames) = step else { break };
        if our_w.write_all(&frames).await.is_err() {
            break;
        }
        // Let the receiver react (and ask) before the next step.
        tokio::task::yield_now().await;
        if recv.is_finished() {
            break;
        }
    }
    // Hang up (the read half stays with the listener, so say it explicitly).
    let _ = our_w.shutdown().await;
    drop(our_w);
    // Any error the peer caused is a fine end; our own bookkeeping breaking is not (checked
    // through `INTERNAL_ERRORS` after each case: it may not be the error the session ends with).
    let _ = recv.await.expect("the receiver panicked");
    let _ = writer.await.expect("the writer panicked");
    listener.abort();
}

fn run_cases<F>(name: &str, n: u64, threads: u64, case: F)
where
    F: Fn(&mut Arena, &[u8], &tokio::runtime::Runtime) + Sync,
{
    let t0 = std::time::Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let case = &case;
            s.spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let mut arena = Arena::new();
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0xf022 + t);
                let mut bytes = vec![0u8; 4096];
                for i in (t..n).step_by(threads as usize) {
                    rng.fill_bytes(&mut bytes);
                    let len = 16 + (rng.next_u32() as usize % (bytes.len() - 16));
                    let std_t = std::time::Instant::now();
                    case(&mut arena, &bytes[..len], &rt);
                    assert!(
                        std_t.elapsed() < CASE_LIMIT,
                        "{name} case {i} took {:?}",
                        std_t.elapsed()
                    );
                    arena.restore();
                    no_internal_errors(&format!("{name} case {i}"));
                }
            });
        }
    });
    eprintln!("{name}: {n} cases in {:.1} s", t0.elapsed().as_secs_f64());
    // Work a case's pool left running may end after it: checked once more at the end.
    std::thread::sleep(Duration::from_millis(100));
    no_internal_errors(name);
}

fn no_internal_errors(what: &str) {
    assert_eq!(
        super::INTERNAL_ERRORS.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "{what}: our own bookkeeping broke (an internal error)"
    );
}

#[test]
fn hostile_senders_never_panic_hang_or_escape_the_root() {
    let n = cases(50_000, 1_000_000);
    run_cases("receiver", n, 2, |arena, bytes, rt| {
        let opts = SyncOptions {
            delete: bytes[0] & 1 == 1,
            force_delete: bytes[0] & 2 == 2,
            checksum: false,
            ..SyncOptions::default()
        };
        let root = arena.root.clone();
        rt.block_on(async {
            tokio::time::timeout(CASE_LIMIT, receiver_case(&root, &bytes[1..], opts))
                .await
                .expect("a receiver case hung")
        });
    });
    let e: Vec<u64> = ENDS
        .iter()
        .map(|a| a.load(std::sync::atomic::Ordering::Relaxed))
        .collect();
    eprintln!(
        "receiver: {} sessions completed, {} changes applied, {} protocol violations caught, \
         {} other ends (peer gone, fatal)",
        e[0], e[1], e[2], e[3]
    );
    assert!(
        e[0] > 0 && e[1] > 0 && e[2] > 0,
        "the fuzzer does not get deep: {e:?}"
    );
}

/// One case against the real sender: it lists a small tree, then a hostile receiver asks for
/// anything, lies about its copies and hangs up anywhere.
async fn sender_case(root: &Path, bytes: &[u8]) {
    let mut u = Unstructured::new(bytes);
    let (ours, theirs) = tokio::io::duplex(1 << 20);
    let (their_r, their_w) = tokio::io::split(theirs);
    let (mut our_r, mut our_w) = tokio::io::split(ours);
    let (out, pending) = conn::channel();
    let writer = pending.start(FrameWriter::new(their_w));
    let root = root.to_path_buf();
    let send = tokio::spawn(async move {
        let mut reader = FrameReader::new(their_r);
        sender::run(
            &mut reader,
            out,
            root,
            SyncOptions::default(),
            Arc::new(Silent),
        )
        .await
    });
    // Drain what the sender says (the list, data) so it is never stuck writing.
    let listed = Arc::new(Mutex::new(0u32));
    let count = listed.clone();
    let drain = tokio::spawn(async move {
        let mut r = FrameReader::new(&mut our_r);
        while let Ok(Some((msg, _))) = r.next().await {
            if let Msg::Entries { entries, .. } = msg {
                *count.lock().unwrap() += entries.len() as u32;
            }
        }
    });
    for _ in 0..48 {
        let n = *listed.lock().unwrap();
        let id = |u: &mut Unstructured<'_>| -> Option<FileId> {
            Some(if n > 0 && !u.ratio(1, 10).ok()? {
                u.int_in_range(0..=n - 1).ok()?
            } else {
                u.arbitrary().ok()?
            })
        };
        let params = |u: &mut Unstructured<'_>| -> Option<SigParams> {
            Some(if u.ratio(1, 5).ok()? {
                SigParams::arbitrary(u).ok()?
            } else {
                SigParams::for_len(u.int_in_range(0..=(20u64 << 20)).ok()?)
            })
        };
        let mut out = Vec::new();
        let Some(choice) = u.int_in_range(0..=99u8).ok() else {
            break;
        };
        let msg = match choice {
            0..=24 => Msg::NeedWhole {
                ids: (0..u.int_in_range(1..=3).unwrap_or(1))
                    .filter_map(|_| id(&mut u))
                    .collect(),
            },
            25..=39 => {
                let base_len = u.int_in_range(0..=(9u64 << 20)).unwrap_or(0);
                let cvs = (0..hash::chunk_count(base_len).min(3))
                    .map(|_| u.arbitrary().unwrap_or_default())
                    .collect();
                let sig: Vec<u8> = u.arbitrary().unwrap_or_default();
                let msg = Msg::Signature {
                    id: id(&mut u).unwrap_or(0),
                    base_len,
                    params: params(&mut u).unwrap_or(SigParams::for_len(0)),
                    cvs,
                };
                let _ = encode(&msg, &sig, &mut out);
                msg
            }
            40..=54 => Msg::NeedDelta {
                id: id(&mut u).unwrap_or(0),
                base_len: u.int_in_range(0..=(13u64 << 20)).unwrap_or(0),
                params: params(&mut u).unwrap_or(SigParams::for_len(0)),
            },
            55..=64 => {
                let part: Vec<u8> = u.arbitrary().unwrap_or_default();
                let msg = Msg::SigPart {
                    id: id(&mut u).unwrap_or(0),
                    chunk: u.int_in_range(0..=4).unwrap_or(0),
                };
                let _ = encode(&msg, &part, &mut out);
                msg
            }
            65..=79 => {
                let mut chunks: Vec<u32> = (0..u.int_in_range(0..=4).unwrap_or(0))
                    .map(|_| u.int_in_range(0..=5).unwrap_or(0))
                    .collect();
                chunks.sort_unstable();
                chunks.dedup();
                if u.ratio(1, 2).unwrap_or(false) {
                    Msg::DeltaRequest {
                        id: id(&mut u).unwrap_or(0),
                        chunks,
                        full: u.arbitrary().unwrap_or(false),
                    }
                } else {
                    Msg::NeedChunks {
                        id: id(&mut u).unwrap_or(0),
                        chunks,
                    }
                }
            }
            80..=89 => Msg::arbitrary(&mut u).unwrap_or(Msg::Ping),
            90..=93 => Msg::Done {
                stats: Default::default(),
                unsynced: Vec::new(),
                overflow: false,
            },
            _ => break,
        };
        if out.is_empty() {
            let _ = encode(&msg, &[], &mut out);
        }
        if our_w.write_all(&out).await.is_err() || send.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_micros(50)).await;
    }
    let _ = our_w.shutdown().await;
    drop(our_w);
    let _ = send.await.expect("the sender panicked"); // any error is a fine end
    let _ = writer.await.expect("the writer panicked");
    drain.abort();
}

#[test]
fn hostile_receivers_never_panic_or_hang_the_sender() {
    let n = cases(5_000, 100_000);
    run_cases("sender", n, 2, |arena, bytes, rt| {
        let root = arena.root.clone();
        rt.block_on(async {
            tokio::time::timeout(CASE_LIMIT, sender_case(&root, bytes))
                .await
                .expect("a sender case hung")
        });
    });
}
