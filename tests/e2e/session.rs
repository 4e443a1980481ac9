//! Real client and real helper over in-memory streams (no processes): round trips, links cut
//! at arbitrary points, and the BLAKE3 fallback when a rebuilt file does not verify.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use devsync::proto::{Msg, Role, SyncOptions, frame};
use devsync::session::client::{self, Job, Outcome};
use devsync::session::{SessionError, Silent, helper};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::common::*;

/// A stream that fails after `left` bytes were written through it (a link that drops).
struct CutAfter<S> {
    inner: S,
    left: usize,
}

impl<S: AsyncRead + Unpin> AsyncRead for CutAfter<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.left == 0 {
            return Poll::Ready(Err(std::io::ErrorKind::ConnectionReset.into()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CutAfter<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.left == 0 {
            return Poll::Ready(Err(std::io::ErrorKind::ConnectionReset.into()));
        }
        let n = buf.len().min(self.left);
        let r = Pin::new(&mut self.inner).poll_write(cx, &buf[..n]);
        if let Poll::Ready(Ok(w)) = r {
            self.left -= w;
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Runs one session in memory; the helper's writes are cut after `cut` bytes. A session that
/// is not cut must succeed on both ends; a cut one must fail on the client's (and the helper
/// must not have panicked either way).
async fn session(
    role: Role,
    local: &Path,
    remote: &Path,
    opts: SyncOptions,
    cut: usize,
) -> Result<Outcome, SessionError> {
    session_with(role, local, remote, opts, cut, true).await
}

/// [`session`] with a helper that may decline compression.
async fn session_with(
    role: Role,
    local: &Path,
    remote: &Path,
    opts: SyncOptions,
    cut: usize,
    helper_compresses: bool,
) -> Result<Outcome, SessionError> {
    let (a, b) = tokio::io::duplex(256 << 10);
    let (hr, hw) = tokio::io::split(CutAfter {
        inner: b,
        left: cut,
    });
    let helper = tokio::spawn(async move { helper::serve_with(hr, hw, helper_compresses).await });
    let (cr, cw) = tokio::io::split(a);
    let job = Job {
        role,
        local_root: local.to_path_buf(),
        remote_root: remote.as_os_str().as_encoded_bytes().to_vec(),
        opts,
        obs: Arc::new(Silent),
        memo: None,
        ahead: devsync::session::sender::AheadPolicy::Off,
    };
    let r = client::run(cr, cw, job).await;
    let h = helper.await.expect("the helper task panicked");
    if r.is_ok() {
        assert!(h.is_ok(), "client done, helper failed: {h:?}");
    } else if cut == usize::MAX {
        panic!("an uncut session failed: client {r:?}, helper {h:?}");
    }
    r
}

#[test]
fn push_and_pull_in_memory() {
    let rt = rt();
    let td = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        td.path().join("a"),
        td.path().join("b"),
        td.path().join("c"),
    );
    make_tree(
        &a,
        21,
        &TreeSpec {
            files: 200,
            max_size: 9 << 20,
            dirs: 20,
            links: 10,
        },
    );
    let o = rt
        .block_on(session(
            Role::Sender,
            &a,
            &b,
            SyncOptions::default(),
            usize::MAX,
        ))
        .unwrap();
    assert_same_tree(&a, &b);
    assert_eq!(o.stats.files, 200);
    let o = rt
        .block_on(session(
            Role::Receiver,
            &c,
            &b,
            SyncOptions::default(),
            usize::MAX,
        ))
        .unwrap();
    assert_same_tree(&b, &c);
    assert!(
        o.bytes_received > o.stats.total_size,
        "pull carried the data"
    );
}

/// A tree that compresses well (source-like text), with one file that does not.
fn text_tree(root: &Path, seed: u64) {
    std::fs::create_dir_all(root.join("src")).unwrap();
    for i in 0..120u64 {
        let body: String = (0..200)
            .map(|l| format!("    let value_{l} = compute({i}, {seed}, \"line {l}\");\n"))
            .collect();
        std::fs::write(root.join(format!("src/m{i}.rs")), body).unwrap();
    }
    std::fs::write(root.join("blob.bin"), random_bytes(600_000, 1)).unwrap();
    // Big enough for a delta: every 100th line depends on the seed.
    let log: String = (0..40_000u64)
        .map(|l| {
            format!(
                "{l:08} request served in {} ms\n",
                if l % 100 == 0 { seed } else { l % 7 }
            )
        })
        .collect();
    std::fs::write(root.join("big.log"), log).unwrap();
}

#[test]
fn compression_is_negotiated_both_ways_and_counted() {
    use devsync::proto::Compress;
    let rt = rt();
    let td = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        td.path().join("a"),
        td.path().join("b"),
        td.path().join("c"),
    );
    text_tree(&a, 1);
    // One session, in memory, the client playing `role`, compressing as `mode` asks (the
    // helper agreeing if `helper_ok`); the tree arrives exact.
    let run = |role: Role, local: &Path, remote: &Path, mode: Compress, helper_ok: bool| {
        let opts = SyncOptions {
            compress: mode,
            ..SyncOptions::default()
        };
        let o = rt
            .block_on(session_with(
                role,
                local,
                remote,
                opts,
                usize::MAX,
                helper_ok,
            ))
            .unwrap();
        match role {
            Role::Sender => assert_same_tree(local, remote),
            Role::Receiver => assert_same_tree(remote, local),
        }
        o
    };
    // Push compressed: the sender's data shrinks.
    let o = run(Role::Sender, &a, &b, Compress::Level(3), true);
    assert!(o.raw_sent > 3 * o.bytes_sent / 2, "{o:?}");
    // Edit every text file: delta literals are compressed too.
    text_tree(&a, 2);
    let o = run(Role::Sender, &a, &b, Compress::Level(3), true);
    assert!(
        o.stats.matched_bytes > 0 && o.raw_sent > o.bytes_sent * 3,
        "{o:?}"
    );
    // Pull compressed: the helper compresses what it sends.
    let o = run(Role::Receiver, &c, &b, Compress::Level(3), true);
    assert!(o.raw_received > 2 * o.bytes_received, "{o:?}");
    // A client that does not offer it, and a helper that declines: all raw, all exact.
    for (mode, helper_ok) in [(Compress::Off, true), (Compress::Level(3), false)] {
        let d = td.path().join(format!("d{helper_ok}"));
        let e = td.path().join(format!("e{helper_ok}"));
        for o in [
            run(Role::Receiver, &d, &b, mode, helper_ok),
            run(Role::Sender, &a, &e, mode, helper_ok),
        ] {
            assert_eq!(
                (o.raw_sent, o.raw_received),
                (o.bytes_sent, o.bytes_received),
                "{mode:?}"
            );
        }
    }
}

/// Every file at a final path is complete: the old version or the new one, never a mix.
fn assert_no_partial_files(
    src: &Path,
    dst: &Path,
    old: &std::collections::BTreeMap<std::path::PathBuf, Node>,
) {
    let now = snapshot(dst);
    let want = snapshot(src);
    for (path, node) in &now {
        if let Node::File { .. } = node {
            assert!(
                want.get(path)
                    .map(|n| same_content(n, node))
                    .unwrap_or(false)
                    || old
                        .get(path)
                        .map(|n| same_content(n, node))
                        .unwrap_or(false),
                "{path:?} is neither the old nor the new version"
            );
        }
    }
    for e in std::fs::read_dir(dst).unwrap() {
        let name = e.unwrap().file_name();
        assert!(
            !name.to_string_lossy().starts_with(".devsync-tmp"),
            "temp file left: {name:?}"
        );
    }
}

fn same_content(a: &Node, b: &Node) -> bool {
    matches!((a, b), (Node::File { content_hash: x, .. }, Node::File { content_hash: y, .. }) if x == y)
}

#[test]
fn links_cut_mid_transfer_leave_no_partial_files() {
    let rt = rt();
    let td = tempfile::tempdir().unwrap();
    let (src, dst) = (td.path().join("src"), td.path().join("dst"));
    std::fs::create_dir(&src).unwrap();
    for i in 0..6u64 {
        std::fs::write(src.join(format!("f{i}")), random_bytes(3 << 20, i)).unwrap();
    }
    // An older version on the receiving side, so deltas are in flight too.
    std::fs::create_dir(&dst).unwrap();
    for i in 0..3u64 {
        let mut d = random_bytes(3 << 20, i);
        d[1000] ^= 1;
        std::fs::write(dst.join(format!("f{i}")), d).unwrap();
    }
    let old = snapshot(&dst);
    // How much each side says in a full run (on a scratch copy), to cut at points inside it.
    let scratch = td.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    for i in 0..3u64 {
        std::fs::copy(dst.join(format!("f{i}")), scratch.join(format!("f{i}"))).unwrap();
    }
    let full = rt
        .block_on(session(
            Role::Sender,
            &src,
            &scratch,
            SyncOptions::default(),
            usize::MAX,
        ))
        .unwrap();
    let helper_says = full.bytes_received as usize;
    // Cut the receiver's side (helper) at various points: list, signatures, reports.
    for cut in [
        10,
        100,
        helper_says / 10,
        helper_says / 2,
        helper_says * 9 / 10,
    ] {
        let r = rt.block_on(session(
            Role::Sender,
            &src,
            &dst,
            SyncOptions::default(),
            cut,
        ));
        assert!(r.is_err(), "cut at {cut} went unnoticed");
        assert_no_partial_files(&src, &dst, &old);
    }
    // Cut the sender's side (helper pushes in a pull) mid-data.
    let back = td.path().join("back");
    for cut in [50, 70_000, 4 << 20, 9 << 20] {
        let r = rt.block_on(session(
            Role::Receiver,
            &back,
            &src,
            SyncOptions::default(),
            cut,
        ));
        assert!(r.is_err(), "cut at {cut} went unnoticed");
        if back.exists() {
            assert_no_partial_files(&src, &back, &Default::default());
        }
    }
    // And a clean run afterwards completes the job.
    rt.block_on(session(
        Role::Sender,
        &src,
        &dst,
        SyncOptions::default(),
        usize::MAX,
    ))
    .unwrap();
    assert_same_tree(&src, &dst);
}

/// A sender whose delta does not rebuild what it claims: the receiver must notice (BLAKE3),
/// ask for the whole file, and end up with the right content.
#[test]
fn failed_verification_falls_back_to_whole_file() {
    use devsync::engine::{Entry, EntryKind, Mtime, RelPath};
    use devsync::proto::handshake::{CLIENT_MAGIC, HELPER_MAGIC};
    use devsync::proto::{FrameReader, PROTOCOL_VERSION};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let rt = rt();
    let td = tempfile::tempdir().unwrap();
    let dest = td.path().join("dest");
    std::fs::create_dir(&dest).unwrap();
    let base = random_bytes(100_000, 1);
    std::fs::write(dest.join("f"), &base).unwrap();
    let mut new = base.clone();
    new[50_000] ^= 0xff;
    let new2 = new.clone();
    let out = rt.block_on(async move {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (hr, mut hw) = tokio::io::split(b);
        let fake = tokio::spawn(async move {
            let enc = |m: &Msg, p: &[u8]| {
                let mut v = Vec::new();
                frame::encode(m, p, &mut v).unwrap();
                v
            };
            hw.write_all(HELPER_MAGIC).await.unwrap();
            hw.write_all(&PROTOCOL_VERSION.to_be_bytes()).await.unwrap();
            let mut r = FrameReader::new(hr);
            let mut m = [0u8; 16];
            r.raw().read_exact(&mut m).await.unwrap();
            assert_eq!(&m, CLIENT_MAGIC);
            r.next().await.unwrap().unwrap(); // Hello
            hw.write_all(&enc(
                &Msg::HelloOk {
                    version: PROTOCOL_VERSION,
                    compress: false,
                },
                &[],
            ))
            .await
            .unwrap();
            let entry = Entry {
                path: RelPath::new("f").unwrap(),
                kind: EntryKind::File {
                    size: new2.len() as u64,
                    digest: None,
                },
                mode: 0o644,
                mtime: Mtime {
                    sec: 1_700_000_000,
                    nsec: 5,
                },
            };
            hw.write_all(&enc(
                &Msg::GenStart {
                    generation: 0,
                    whole: true,
                    replace_dirs: false,
                },
                &[],
            ))
            .await
            .unwrap();
            hw.write_all(&enc(
                &Msg::Entries {
                    first_id: 0,
                    entries: vec![entry],
                    changed: false,
                },
                &[],
            ))
            .await
            .unwrap();
            hw.write_all(&enc(
                &Msg::EndOfList {
                    count: 1,
                    scan_errors: 0,
                    root: None,
                },
                &[],
            ))
            .await
            .unwrap();
            let digest = *blake3::hash(&new2).as_bytes();
            let stamp = devsync::proto::Stamp {
                mode: 0o644,
                mtime: Mtime {
                    sec: 1_700_000_000,
                    nsec: 5,
                },
            };
            while let Ok(Some((msg, _))) = r.next().await {
                match msg {
                    // Lie: claim chunk 0 is unchanged (it is not).
                    Msg::Signature { .. } => {
                        hw.write_all(&enc(&Msg::Copy { id: 0, chunk: 0 }, &[]))
                            .await
                            .unwrap();
                        let end = Msg::FileEnd {
                            id: 0,
                            len: new2.len() as u64,
                            digest,
                            stamp,
                        };
                        hw.write_all(&enc(&end, &[])).await.unwrap();
                    }
                    Msg::NeedWhole { ids } => {
                        let files = ids
                            .into_iter()
                            .map(|id| devsync::proto::WholeItem {
                                id,
                                len: new2.len() as u32,
                                digest,
                                stamp,
                            })
                            .collect();
                        hw.write_all(&enc(&Msg::WholeFiles { files }, &new2))
                            .await
                            .unwrap();
                    }
                    Msg::Done { .. } => {
                        hw.write_all(&enc(&Msg::Bye, &[])).await.unwrap();
                        break;
                    }
                    _ => {}
                }
            }
        });
        let (cr, cw) = tokio::io::split(a);
        let job = Job {
            role: Role::Receiver,
            local_root: dest.clone(),
            remote_root: b"/r".to_vec(),
            opts: SyncOptions::default(),
            obs: Arc::new(Silent),
            memo: None,
            ahead: devsync::session::sender::AheadPolicy::Off,
        };
        let o = client::run(cr, cw, job).await;
        fake.await.unwrap();
        o
    });
    let o = out.unwrap();
    assert_eq!(o.stats.verify_retries, 1);
    assert_eq!(o.stats.errors, 0);
    assert_eq!(std::fs::read(td.path().join("dest/f")).unwrap(), new);
}

/// Between a client and a real helper: passes everything through, except that after the
/// helper's greeting nothing more reaches the client (so no `HelloOk`) until the client's
/// bytes held a whole list, `EndOfList` included. A client that waited for `HelloOk` before
/// sending its list would never finish; `Err` after 10 s says so.
async fn list_before_hello_ok(
    client_side: tokio::io::DuplexStream,
    helper_side: tokio::io::DuplexStream,
) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut cr, mut cw) = tokio::io::split(client_side);
    let (mut hr, mut hw) = tokio::io::split(helper_side);
    let (seen_tx, seen_rx) = tokio::sync::oneshot::channel::<()>();
    let upstream = async move {
        let mut seen = Some(seen_tx);
        let mut got: Vec<u8> = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = cr.read(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Ok::<_, String>(());
            }
            hw.write_all(&buf[..n]).await.map_err(|e| e.to_string())?;
            if seen.is_none() {
                continue;
            }
            got.extend_from_slice(&buf[..n]);
            // The client's magic, then frames: u32 BE length, body.
            let mut at = devsync::proto::handshake::CLIENT_MAGIC.len();
            while got.len() >= at + 4 {
                let len = u32::from_be_bytes(got[at..at + 4].try_into().unwrap()) as usize;
                if got.len() < at + 4 + len {
                    break;
                }
                let mut body = bytes::Bytes::copy_from_slice(&got[at + 4..at + 4 + len]);
                let (msg, _) = frame::decode(&mut body).map_err(|e| e.to_string())?;
                if matches!(msg, Msg::EndOfList { .. }) {
                    let _ = seen.take().map(|s| s.send(()));
                    break;
                }
                at += 4 + len;
            }
        }
    };
    let downstream = async move {
        let greeting = devsync::proto::handshake::HELPER_MAGIC.len()
            + std::mem::size_of_val(&devsync::proto::PROTOCOL_VERSION);
        let mut first = vec![0u8; greeting];
        hr.read_exact(&mut first).await.map_err(|e| e.to_string())?;
        cw.write_all(&first).await.map_err(|e| e.to_string())?;
        tokio::time::timeout(std::time::Duration::from_secs(10), seen_rx)
            .await
            .map_err(|_| "the list did not come before HelloOk".to_string())?
            .map_err(|_| "the client ended before its list".to_string())?;
        tokio::io::copy(&mut hr, &mut cw)
            .await
            .map_err(|e| e.to_string())?;
        cw.shutdown().await.map_err(|e| e.to_string())
    };
    let (u, d) = tokio::join!(upstream, downstream);
    d.and(u)
}

/// A no-change push costs one round trip after the helper starts: the list goes with the
/// Hello, both on a greeted stream (a kept connection) and in the bytes a transport sends
/// behind the exec, before the greeting (`Prepared::early`).
#[test]
fn a_small_trees_list_goes_with_the_hello() {
    let rt = rt();
    let td = tempfile::tempdir().unwrap();
    let (src, dst) = (td.path().join("src"), td.path().join("dst"));
    text_tree(&src, 7);
    for early in [false, true] {
        let _ = std::fs::remove_dir_all(&dst);
        let (a, b) = tokio::io::duplex(1 << 20);
        let (c, d) = tokio::io::duplex(1 << 20);
        let (hr, hw) = tokio::io::split(d);
        let job = Job {
            role: Role::Sender,
            local_root: src.clone(),
            remote_root: dst.as_os_str().as_encoded_bytes().to_vec(),
            opts: SyncOptions::default(),
            obs: Arc::new(Silent),
            memo: None,
            ahead: devsync::session::sender::AheadPolicy::Off,
        };
        let (client, gate) = rt.block_on(async {
            let helper = tokio::spawn(helper::serve_with(hr, hw, true));
            let gate = tokio::spawn(list_before_hello_ok(a, c));
            let (cr, mut cw) = tokio::io::split(b);
            let prepared = client::prepare(&job).unwrap();
            // A small tree's scan is done by the time SSH is up (or the keeper answered):
            // waited for here, so a loaded machine cannot make the test miss it.
            prepared
                .list_ready(std::time::Duration::from_secs(10))
                .await;
            if early {
                // What a transport does: the early bytes right behind the exec.
                let hello = client::hello_bytes(job.role, &job.remote_root, &job.opts);
                let bytes = prepared.early(hello)();
                tokio::io::AsyncWriteExt::write_all(&mut cw, &bytes)
                    .await
                    .unwrap();
            }
            let mut reader = devsync::proto::FrameReader::new(cr);
            devsync::proto::handshake::await_helper(&mut reader)
                .await
                .unwrap();
            let client = client::run_ready(reader, cw, job, prepared, early).await;
            let _ = helper.await.unwrap();
            (client, gate.await.unwrap())
        });
        assert!(gate.is_ok(), "early={early}: {gate:?}");
        assert!(client.is_ok(), "early={early}: {client:?}");
        assert_same_tree(&src, &dst);
    }
}
