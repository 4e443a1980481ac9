//! The protocol against hostile or broken peers: a fake helper speaking raw frames to the real
//! client, and garbage fed to the real `devsync helper` process.

use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;

use devsync::engine::{Entry, EntryKind, Mtime, RelPath};
use devsync::proto::handshake::{CLIENT_MAGIC, HELPER_MAGIC};
use devsync::proto::{FrameReader, Msg, PROTOCOL_VERSION, Role, SyncOptions, WholeItem, frame};
use devsync::session::client::{self, Job, Outcome};
use devsync::session::{SessionError, Silent};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::rt;

/// An entry whose path skips validation (as a hostile peer would send it).
fn raw_entry(path: &[u8], kind: EntryKind) -> Entry {
    let mut bytes = postcard::to_stdvec(&RelPath::new("x").unwrap()).unwrap();
    bytes.truncate(0);
    bytes.extend(postcard::to_stdvec(&serde_bytes::Bytes::new(path)).unwrap());
    let path: RelPath = postcard::from_bytes(&bytes).unwrap();
    Entry {
        path,
        kind,
        mode: 0o644,
        mtime: Mtime { sec: 1, nsec: 0 },
    }
}

fn file(path: &[u8]) -> Entry {
    raw_entry(
        path,
        EntryKind::File {
            size: 4,
            digest: None,
        },
    )
}

fn frame(msg: &Msg, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    frame::encode(msg, payload, &mut v).unwrap();
    v
}

/// Runs the real client (pulling into `dest`) against a scripted fake helper that says
/// `prelude` first, then sends `script` frames and serves whole-file requests with `EVIL`.
async fn pull_from_fake(
    dest: &Path,
    prelude: &[u8],
    script: Vec<Vec<u8>>,
) -> Result<Outcome, SessionError> {
    pull_from_fake_answering(dest, prelude, script, |ids| {
        ids.iter()
            .map(|&id| {
                frame(
                    &Msg::WholeFiles {
                        files: vec![evil(id)],
                    },
                    b"EVIL",
                )
            })
            .collect()
    })
    .await
    .0
}

/// A whole file `EVIL` for `id`, as the fake serves it.
fn evil(id: u32) -> WholeItem {
    WholeItem {
        id,
        len: 4,
        digest: *blake3::hash(b"EVIL").as_bytes(),
        stamp: devsync::proto::Stamp {
            mode: 0o644,
            mtime: Mtime { sec: 1, nsec: 0 },
        },
    }
}

/// [`pull_from_fake`], answering each `NeedWhole` with the frames `answer` makes of its ids;
/// also says whether the client's receiver sent `Done`.
async fn pull_from_fake_answering(
    dest: &Path,
    prelude: &[u8],
    script: Vec<Vec<u8>>,
    answer: impl Fn(&[u32]) -> Vec<Vec<u8>> + Send + 'static,
) -> (Result<Outcome, SessionError>, bool) {
    let (client_end, helper_end) = tokio::io::duplex(1 << 20);
    let (cr, cw) = tokio::io::split(client_end);
    let (hr, mut hw) = tokio::io::split(helper_end);
    let prelude = prelude.to_vec();
    let fake = tokio::spawn(async move {
        hw.write_all(&prelude).await.unwrap();
        hw.write_all(HELPER_MAGIC).await.unwrap();
        hw.write_all(&PROTOCOL_VERSION.to_be_bytes()).await.unwrap();
        let mut reader = FrameReader::new(hr);
        let mut magic = [0u8; 16];
        // The reader buffers: read the magic through a raw read of the first 16 bytes.
        let _ = reader_read_exact(&mut reader, &mut magic).await;
        assert_eq!(&magic, CLIENT_MAGIC);
        let _hello = reader.next().await.unwrap().unwrap();
        hw.write_all(&frame(
            &Msg::HelloOk {
                version: PROTOCOL_VERSION,
                compress: false,
            },
            &[],
        ))
        .await
        .unwrap();
        // One generation of the whole tree, as a pull's helper sends.
        let start = Msg::GenStart {
            generation: 0,
            whole: true,
            replace_dirs: false,
        };
        if hw.write_all(&frame(&start, &[])).await.is_err() {
            return false;
        }
        for f in script {
            if hw.write_all(&f).await.is_err() {
                return false;
            }
        }
        // Serve whatever is asked for as `answer` says, until the client hangs up.
        while let Ok(Some((msg, _))) = reader.next().await {
            if let Msg::NeedWhole { ids } = &msg {
                for f in answer(ids) {
                    if hw.write_all(&f).await.is_err() {
                        return false; // the client hung up
                    }
                }
            }
            if let Msg::Fatal { .. } = msg {
                return false; // like a real sender: the session is over
            }
            if let Msg::Done { .. } = msg {
                let _ = hw.write_all(&frame(&Msg::Bye, &[])).await;
                return true;
            }
        }
        false
    });
    let job = Job {
        role: Role::Receiver,
        local_root: dest.to_path_buf(),
        remote_root: b"/remote".to_vec(),
        opts: SyncOptions::default(),
        obs: Arc::new(Silent),
        memo: None,
        ahead: devsync::session::sender::AheadPolicy::Off,
    };
    let r = client::run(cr, cw, job).await;
    // The fake itself must not have failed (its writes fail quietly once the client hangs up).
    let done = fake.await.expect("the fake helper panicked");
    (r, done)
}

async fn reader_read_exact<R: tokio::io::AsyncRead + Unpin>(
    r: &mut FrameReader<R>,
    buf: &mut [u8],
) -> std::io::Result<()> {
    r.raw().read_exact(buf).await.map(|_| ())
}

fn no_evil_outside(td: &Path) {
    for e in walkdir::WalkDir::new(td).into_iter().filter_map(Result::ok) {
        if e.file_type().is_file() {
            assert_ne!(
                std::fs::read(e.path()).unwrap(),
                b"EVIL",
                "wrote {:?}",
                e.path()
            );
        }
    }
}

#[test]
fn hostile_paths_are_refused_and_nothing_is_written_outside() {
    let rt = rt();
    for bad in [&b"../x"[..], b"/etc/x", b"a/../../x", b"a//b", b"./x"] {
        let td = tempfile::tempdir().unwrap();
        let dest = td.path().join("dest");
        let script = vec![frame(
            &Msg::Entries {
                first_id: 0,
                entries: vec![file(bad)],
                changed: false,
            },
            &[],
        )];
        let r = rt.block_on(pull_from_fake(&dest, b"", script));
        let e = r.expect_err("hostile path accepted");
        assert!(e.to_string().contains("invalid message"), "{bad:?}: {e}");
        no_evil_outside(td.path());
    }
}

#[test]
fn paths_through_receiver_symlinks_are_refused() {
    let rt = rt();
    let td = tempfile::tempdir().unwrap();
    let dest = td.path().join("dest");
    let outside = td.path().join("outside");
    std::fs::create_dir_all(&dest).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, dest.join("link")).unwrap();
    // A file under "link/" without "link" announced as a directory first: a protocol violation.
    let script = vec![frame(
        &Msg::Entries {
            first_id: 0,
            entries: vec![file(b"link/evil")],
            changed: false,
        },
        &[],
    )];
    let e = rt
        .block_on(pull_from_fake(&dest, b"", script))
        .expect_err("accepted");
    assert!(e.to_string().contains("before its parent"), "{e}");
    no_evil_outside(td.path());
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);

    // Announcing "link" as a directory replaces the symlink with a real directory first.
    let script = vec![
        frame(
            &Msg::Entries {
                first_id: 0,
                entries: vec![raw_entry(b"link", EntryKind::Dir)],
                changed: false,
            },
            &[],
        ),
        frame(
            &Msg::Entries {
                first_id: 1,
                entries: vec![file(b"link/evil")],
                changed: false,
            },
            &[],
        ),
        frame(
            &Msg::EndOfList {
                count: 2,
                scan_errors: 0,
                root: None,
            },
            &[],
        ),
    ];
    rt.block_on(pull_from_fake(&dest, b"", script))
        .expect("a real directory is fine");
    assert!(
        std::fs::symlink_metadata(dest.join("link"))
            .unwrap()
            .is_dir()
    );
    assert_eq!(std::fs::read(dest.join("link/evil")).unwrap(), b"EVIL");
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "wrote through the old symlink"
    );
}

#[test]
fn junk_before_the_helper_greeting_is_skipped() {
    let rt = rt();
    let td = tempfile::tempdir().unwrap();
    let dest = td.path().join("dest");
    let junk = b"Welcome to devbox!\nLast login: yesterday\n\x00\x01garbage DEVSYNC-HELP";
    let script = vec![frame(
        &Msg::EndOfList {
            count: 0,
            scan_errors: 0,
            root: None,
        },
        &[],
    )];
    let o = rt
        .block_on(pull_from_fake(&dest, junk, script))
        .expect("junk tolerated");
    assert_eq!(o.stats.files, 0);
}

#[test]
fn entries_that_lie_are_refused() {
    let rt = rt();
    let td = tempfile::tempdir().unwrap();
    let dest = td.path().join("dest");
    // Repeated or skipped ids, a wrong count, data for files never requested.
    let cases: Vec<(Vec<Vec<u8>>, &str)> = vec![
        (
            vec![
                frame(
                    &Msg::Entries {
                        first_id: 0,
                        entries: vec![file(b"a")],
                        changed: false,
                    },
                    &[],
                ),
                frame(
                    &Msg::Entries {
                        first_id: 0,
                        entries: vec![file(b"b")],
                        changed: false,
                    },
                    &[],
                ),
            ],
            "starts at id 0, expected 1",
        ),
        (
            vec![frame(
                &Msg::Entries {
                    first_id: 7,
                    entries: vec![file(b"a")],
                    changed: false,
                },
                &[],
            )],
            "starts at id 7, expected 0",
        ),
        (
            vec![
                frame(
                    &Msg::Entries {
                        first_id: 0,
                        entries: vec![file(b"a")],
                        changed: false,
                    },
                    &[],
                ),
                frame(
                    &Msg::EndOfList {
                        count: 5,
                        scan_errors: 0,
                        root: None,
                    },
                    &[],
                ),
            ],
            "count 5",
        ),
        (
            vec![frame(&Msg::Data { id: 9, chunk: 0 }, b"xx")],
            "not requested",
        ),
        (
            vec![frame(&Msg::NeedWhole { ids: vec![0] }, &[])],
            "unexpected message",
        ),
    ];
    for (script, want) in cases {
        let e = rt
            .block_on(pull_from_fake(&dest, b"", script))
            .expect_err(want);
        assert!(e.to_string().contains(want), "want {want:?}, got {e}");
    }
}

/// Garbage on the helper's stdin: a clear error and a non-zero exit, never a panic.
#[test]
fn helper_process_survives_garbage() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"hello there\n".to_vec(), "not a devsync client"),
        (CLIENT_MAGIC.to_vec(), "connection closed"),
        ([&CLIENT_MAGIC[..], &[0, 0]].concat(), "middle of a frame"),
        (
            [&CLIENT_MAGIC[..], &0xffff_ffffu32.to_be_bytes()].concat(),
            "limit",
        ),
        (
            [
                &CLIENT_MAGIC[..],
                &8u32.to_be_bytes(),
                &[0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff],
            ]
            .concat(),
            "malformed",
        ),
        (
            [&CLIENT_MAGIC[..], &6u32.to_be_bytes(), &[0, 0, 0, 9, 1, 2]].concat(),
            "malformed",
        ),
    ];
    for (input, want) in cases {
        let mut child = crate::common::bin()
            .arg("helper")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&input).unwrap();
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{want}: {err}");
        assert!(err.contains(want), "want {want:?} in {err:?}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(out.stdout.starts_with(HELPER_MAGIC));
    }
}

/// A sender that ends one file twice must not complete it twice: a duplicate id in one
/// `WholeFiles`, or a second `SendFailed`, once made the receiver count the file done twice
/// and send `Done` while the other file was still in flight (or underflow its count).
#[test]
fn a_file_ended_twice_is_a_violation_not_an_early_done() {
    let rt = rt();
    let two = || {
        vec![
            frame(
                &Msg::Entries {
                    first_id: 0,
                    entries: vec![file(b"a"), file(b"b")],
                    changed: false,
                },
                &[],
            ),
            frame(
                &Msg::EndOfList {
                    count: 2,
                    scan_errors: 0,
                    root: None,
                },
                &[],
            ),
        ]
    };
    let failed = |id| {
        frame(
            &Msg::SendFailed {
                id,
                message: "gone".into(),
                transient: false,
            },
            &[],
        )
    };
    type Answer = Box<dyn Fn(&[u32]) -> Vec<Vec<u8>> + Send>;
    let cases: Vec<(&str, Answer, &str)> = vec![
        (
            "one id twice in a WholeFiles",
            Box::new(|_: &[u32]| {
                vec![frame(
                    &Msg::WholeFiles {
                        files: vec![evil(0), evil(0)],
                    },
                    b"EVILEVIL",
                )]
            }),
            "twice",
        ),
        (
            "two SendFailed for one file",
            Box::new(move |_: &[u32]| vec![failed(0), failed(0)]),
            "",
        ),
        (
            "a SendFailed after the file arrived",
            Box::new(move |_: &[u32]| {
                vec![
                    frame(
                        &Msg::WholeFiles {
                            files: vec![evil(0)],
                        },
                        b"EVIL",
                    ),
                    failed(0),
                ]
            }),
            "",
        ),
    ];
    for (what, answer, want) in cases {
        let td = tempfile::tempdir().unwrap();
        let dest = td.path().join("dest");
        let (r, done) = rt.block_on(pull_from_fake_answering(&dest, b"", two(), answer));
        assert!(!done, "{what}: the receiver said Done");
        match r {
            Err(SessionError::Violation(m)) => {
                eprintln!("{what}: {m}");
                assert!(m.contains(want), "{what}: {m}")
            }
            Err(SessionError::Proto(e)) => assert!(e.to_string().contains(want), "{what}: {e}"),
            other => panic!("{what}: want a protocol violation, got {other:?}"),
        }
    }
}
