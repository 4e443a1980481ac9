//! Starting `devsync helper` on an SSH server, uploading it first when it is missing.
//!
//! Helpers live at `<dir>/<build>/devsync` on the remote (`<dir>` defaults to
//! `~/.cache/devsync`; `<build>` is this binary's version plus a hash of its bytes, so a client
//! and its helper are always the same build). One exec runs the helper if it is there;
//! otherwise it reports the platform (`uname -sm`) and home directory on stderr and exits 111.
//! The client then checks the platform, uploads itself (or `--helper-binary`) to a temporary
//! name, makes it executable, renames it into place and tries once more. The upload is
//! gzip-compressed through `gzip -dc` where the remote has gzip (nearly everywhere), and goes
//! over SFTP as it is otherwise. Nothing needs to be preinstalled remotely besides `sh` and
//! gzip or an SFTP server.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::watch;

use super::TransportError;
use super::ssh::{Connection, ExecStatus, wait_exit};
use crate::proto::FrameReader;
use crate::proto::handshake::await_helper;

/// Why the helper could not be started.
#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    #[error("opening the exec channel")]
    Exec(#[source] russh::Error),
    /// It ran and failed: what it said and how it ended.
    #[error("{0}")]
    Failed(String),
    #[error("{0}")]
    Platform(String),
    #[error("{path}")]
    Local {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Sftp(#[from] super::ssh::SftpError),
    #[error("{what}")]
    Upload {
        what: String,
        #[source]
        source: russh_sftp::client::error::Error,
    },
    #[error("uploading to {path}")]
    Copy {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Exit status of the start script when no helper is installed.
const NEED_HELPER: u32 = 111;
const MARKER: &str = "DEVSYNC-NEED-HELPER";

#[derive(Debug, Clone)]
pub struct BootstrapOptions {
    /// Remote directory holding helpers (`~/` means the remote home).
    pub remote_dir: String,
    /// Binary to upload instead of this one (for a remote of another platform).
    pub helper_binary: Option<PathBuf>,
    /// How long the helper may take to greet us once started.
    pub greeting_timeout: Duration,
}

impl Default for BootstrapOptions {
    fn default() -> Self {
        BootstrapOptions {
            remote_dir: "~/.cache/devsync".into(),
            helper_binary: None,
            greeting_timeout: Duration::from_secs(30),
        }
    }
}

/// A helper that has greeted us.
pub struct Started {
    pub reader: FrameReader<Box<dyn AsyncRead + Send + Unpin>>,
    pub writer: Box<dyn AsyncWrite + Send + Unpin>,
    pub status: watch::Receiver<ExecStatus>,
    /// Whether the helper binary had to be uploaded.
    pub uploaded: bool,
}

/// This build's identity: version and a hash of the executable. The hash is remembered in
/// the state directory per (inode, size, mtime) of the executable, so it is computed once per
/// build rather than on every connection.
pub fn build_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        let hash = std::env::current_exe()
            .and_then(|exe| cached_hash(&exe))
            .unwrap_or_else(|_| "unknown".into());
        format!("{}-{hash}", env!("CARGO_PKG_VERSION"))
    })
}

fn cached_hash(exe: &Path) -> std::io::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(exe)?;
    let stamp = format!(
        "{} {} {} {} {}",
        exe.display(),
        md.dev(),
        md.ino(),
        md.len(),
        md.mtime_nsec() + md.mtime() * 1_000_000_000
    );
    let cache = crate::target::credentials::state_dir().map(|d| d.join("build-id"));
    hash_with_cache(exe, &stamp, cache.ok().as_deref())
}

/// BLAKE3 of `exe` (12 hex digits), looked up by `stamp` in the `cache` file first.
fn hash_with_cache(exe: &Path, stamp: &str, cache: Option<&Path>) -> std::io::Result<String> {
    let text = cache
        .and_then(|c| std::fs::read_to_string(c).ok())
        .unwrap_or_default();
    // One line per binary seen lately (say an installed devsync and a development build).
    let known: Vec<&str> = text.lines().collect();
    if let Some(hash) = known
        .iter()
        .filter_map(|l| l.rsplit_once(' '))
        .find_map(|(seen, hash)| (seen == stamp).then_some(hash))
    {
        return Ok(hash.to_string());
    }
    let bytes = std::fs::read(exe)?;
    let hash = blake3::hash(&bytes).to_hex()[..12].to_string();
    if let Some(c) = cache {
        let oldest = known.len().saturating_sub(BUILD_IDS_KEPT - 1);
        let mut lines: Vec<String> = known.iter().skip(oldest).map(|l| l.to_string()).collect();
        lines.push(format!("{stamp} {hash}"));
        // A cache that cannot be written only costs hashing again next time.
        let _ = c.parent().map(std::fs::create_dir_all);
        let _ = std::fs::write(c, lines.join("\n") + "\n");
    }
    Ok(hash)
}

/// Binaries whose hashes the build-id cache remembers.
const BUILD_IDS_KEPT: usize = 8;

/// Characters allowed in the remote directory: it goes into a shell script.
fn check_dir(dir: &str) -> Result<(), TransportError> {
    let ok = !dir.is_empty()
        && dir
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-~+@,".contains(c))
        && (dir.starts_with('/') || dir.starts_with("~/"));
    if ok {
        Ok(())
    } else {
        Err(TransportError::Config(format!(
            "remote helper directory {dir:?} must be absolute or start with ~/, and use only \
             letters, digits and / . _ - + @ ,"
        )))
    }
}

/// The remote start script, as one exec command (single-quoted for the login shell, POSIX sh
/// inside, so it works whatever the user's shell is).
fn start_script(dir: &str) -> String {
    let d = build_dir(dir);
    // A client that traces has its helper trace too (its stderr comes back to the client).
    let env = if crate::trace::enabled() {
        "DEVSYNC_TRACE=1 "
    } else {
        ""
    };
    format!(
        "sh -c 'h={d}/devsync; if [ -x \"$h\" ]; then {env}exec \"$h\" helper; fi; \
         if command -v gzip >/dev/null 2>&1; then z=gz; else z=raw; fi; \
         echo \"{MARKER} $(uname -s) $(uname -m) $z $HOME\" >&2; exit {NEED_HELPER}'"
    )
}

/// This build's directory under `dir`, as a double-quoted shell word (`~/` is `$HOME/`).
fn build_dir(dir: &str) -> String {
    match dir.strip_prefix("~/") {
        Some(rest) => format!("\"$HOME/{rest}/{}\"", build_id()),
        None => format!("\"{dir}/{}\"", build_id()),
    }
}

/// The exec that installs a gzip-compressed helper read from stdin: unpacked to a unique
/// temporary name (gzip checks its CRC), made executable and renamed into place; nothing is
/// left behind if any step fails.
fn gunzip_script(dir: &str, tag: &str) -> String {
    let d = build_dir(dir);
    format!(
        "sh -c 'set -e; d={d}; mkdir -p \"$d\"; t=\"$d/.devsync.upload.{tag}.$$\"; \
         trap \"rm -f \\\"$t\\\"\" EXIT; gzip -dc > \"$t\"; chmod 755 \"$t\"; \
         mv -f \"$t\" \"$d/devsync\"; trap - EXIT'"
    )
}

/// What the start script reported when no helper was there.
#[derive(Debug, PartialEq, Eq)]
struct Need {
    os: String,
    arch: String,
    /// The remote has `gzip`.
    gzip: bool,
    home: String,
}

fn parse_need(stderr: &str) -> Option<Need> {
    let line = stderr.lines().find_map(|l| l.trim().strip_prefix(MARKER))?;
    let mut it = line.split_whitespace();
    let (os, arch) = (it.next()?.to_string(), it.next()?.to_string());
    let gzip = it.next()? == "gz";
    let home = it.collect::<Vec<_>>().join(" ");
    Some(Need {
        os,
        arch,
        gzip,
        home,
    })
}

/// `uname -s`/`uname -m` of the machine this binary was built for.
fn local_platform() -> (String, String) {
    let os = match std::env::consts::OS {
        "linux" => "Linux",
        "macos" => "Darwin",
        "freebsd" => "FreeBSD",
        other => other,
    };
    (os.to_string(), std::env::consts::ARCH.to_string())
}

fn same_platform(need: &Need) -> bool {
    let norm = |a: &str| match a {
        "arm64" => "aarch64".to_string(),
        "amd64" => "x86_64".to_string(),
        other => other.to_string(),
    };
    let (os, arch) = local_platform();
    need.os == os && norm(&need.arch) == norm(&arch)
}

/// The binary to install for `need`'s platform: `--helper-binary`, or this one if it fits.
fn choose_binary(need: &Need, helper_binary: Option<&Path>) -> Result<PathBuf, HelperError> {
    match helper_binary {
        Some(p) => Ok(p.to_path_buf()),
        None if same_platform(need) => {
            std::env::current_exe().map_err(|source| HelperError::Local {
                path: "this devsync binary".into(),
                source,
            })
        }
        None => {
            let (os, arch) = local_platform();
            Err(HelperError::Platform(format!(
                "the remote is {} {} but this devsync is built for {os} {arch}; pass \
                 --helper-binary PATH with a devsync built for {} {}",
                need.os, need.arch, need.os, need.arch
            )))
        }
    }
}

/// Starts the helper, uploading it once if needed.
pub async fn start(
    conn: &Connection,
    opts: &BootstrapOptions,
    notice: Arc<dyn Fn(String) + Send + Sync>,
    early: &(dyn Fn() -> Vec<u8> + Send + Sync),
) -> Result<Started, TransportError> {
    check_dir(&opts.remote_dir)?;
    let helper_err = |source: HelperError| TransportError::Helper {
        host: conn.label().to_string(),
        source,
    };
    let mut uploaded = false;
    loop {
        crate::trace!("client", "starting the remote helper");
        let exec = conn
            .exec(&start_script(&opts.remote_dir))
            .await
            .map_err(|e| helper_err(HelperError::Exec(e)))?;
        let mut status = exec.status;
        let mut writer = exec.writer;
        let early = early();
        if !early.is_empty() {
            // The session's first words, sent now rather than after the greeting: they wait
            // in the channel until the helper reads them. A failed write (a shell that already
            // exited to ask for the helper) shows as the greeting that does not come.
            let _ = tokio::io::AsyncWriteExt::write_all(&mut writer, &early).await;
            let _ = tokio::io::AsyncWriteExt::flush(&mut writer).await;
        }
        let mut reader = FrameReader::new(exec.reader);
        // A login script that hangs (waiting for input, a dead NFS home) is not waited on for
        // ever.
        let greeting =
            match tokio::time::timeout(opts.greeting_timeout, await_helper(&mut reader)).await {
                Ok(g) => g,
                Err(_) => {
                    return Err(helper_err(HelperError::Failed(format!(
                        "the helper did not say hello within {} s (a login script on the remote \
                     side may be waiting for input)",
                        opts.greeting_timeout.as_secs()
                    ))));
                }
            };
        if greeting.is_ok() {
            return Ok(Started {
                reader,
                writer,
                status,
                uploaded,
            });
        }
        let st = wait_exit(&mut status, Duration::from_secs(10)).await;
        let stderr = st.stderr_text();
        match (st.code, parse_need(&stderr), uploaded) {
            (Some(NEED_HELPER), Some(need), false) => {
                upload(conn, opts, &need, &*notice)
                    .await
                    .map_err(helper_err)?;
                uploaded = true;
            }
            _ => {
                let mut msg = greeting.err().map(|e| e.to_string()).unwrap_or_default();
                if let Some(c) = st.code {
                    msg.push_str(&format!("; exit status {c}"));
                }
                if let Some(s) = &st.signal {
                    msg.push_str(&format!("; killed by signal {s}"));
                }
                if !stderr.is_empty() {
                    msg.push_str(&format!("; remote stderr: {stderr}"));
                }
                return Err(helper_err(HelperError::Failed(msg)));
            }
        }
    }
}

/// Uploads the helper binary for `need`'s platform to its versioned path over SFTP.
async fn upload(
    conn: &Connection,
    opts: &BootstrapOptions,
    need: &Need,
    notice: &(dyn Fn(String) + Send + Sync),
) -> Result<(), HelperError> {
    let local = choose_binary(need, opts.helper_binary.as_deref())?;
    let base = match opts.remote_dir.strip_prefix("~/") {
        Some(rest) => format!("{}/{rest}", need.home.trim_end_matches('/')),
        None => opts.remote_dir.clone(),
    };
    let dir = format!("{base}/{}", build_id());
    let size = std::fs::metadata(&local)
        .map_err(|source| HelperError::Local {
            path: local.display().to_string(),
            source,
        })?
        .len();
    notice(format!(
        "installing the devsync helper ({:.1} MiB) on {} in {dir}",
        size as f64 / (1 << 20) as f64,
        conn.label()
    ));
    crate::trace!("client", "uploading the helper to {dir}");
    if need.gzip {
        return upload_gz(conn, &local, &opts.remote_dir).await;
    }
    let sftp = conn.sftp().await?;
    let r = put(&sftp, &local, &dir).await;
    let _ = sftp.close().await; // the upload's outcome is what matters
    r
}

/// A name part unique to one upload (`pid.n`) for its temporary file: two sessions of one
/// client (a copy between two places on one box) may be installing at the same time, and
/// neither may exec the other's half-written file.
fn upload_tag() -> String {
    static UPLOADS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!(
        "{}.{}",
        std::process::id(),
        UPLOADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// Uploads `local` gzip-compressed into an exec of [`gunzip_script`].
async fn upload_gz(conn: &Connection, local: &Path, remote_dir: &str) -> Result<(), HelperError> {
    let local_err = |source| HelperError::Local {
        path: local.display().to_string(),
        source,
    };
    let cache = crate::target::credentials::state_dir().ok();
    let path = local.to_path_buf();
    let packed =
        tokio::task::spawn_blocking(move || super::packed::gzipped(&path, cache.as_deref()))
            .await
            .map_err(|e| local_err(std::io::Error::other(e)))?
            .map_err(local_err)?;
    crate::trace!("client", "helper compressed to {} bytes", packed.len());
    let mut exec = conn
        .exec(&gunzip_script(remote_dir, &upload_tag()))
        .await
        .map_err(HelperError::Exec)?;
    let copy_err = |source| HelperError::Copy {
        path: format!("{remote_dir}/{}", build_id()),
        source,
    };
    let sent = async {
        exec.writer.write_all(&packed).await?;
        exec.writer.shutdown().await
    }
    .await;
    let st = wait_exit(&mut exec.status, Duration::from_secs(60)).await;
    if st.code == Some(0) {
        return Ok(());
    }
    sent.map_err(copy_err)?;
    Err(HelperError::Failed(format!(
        "installing the helper failed (exit {}): {}",
        st.code.map_or("unknown".into(), |c| c.to_string()),
        st.stderr_text()
    )))
}

async fn put(
    sftp: &russh_sftp::client::SftpSession,
    local: &Path,
    dir: &str,
) -> Result<(), HelperError> {
    let sftp_err = |what: &str, source: russh_sftp::client::error::Error| HelperError::Upload {
        what: what.to_string(),
        source,
    };
    // mkdir -p
    let mut path = String::new();
    for comp in dir.split('/').filter(|c| !c.is_empty()) {
        path.push('/');
        path.push_str(comp);
        if !sftp.try_exists(path.clone()).await.unwrap_or(false)
            && let Err(e) = sftp.create_dir(path.clone()).await
            && !sftp.try_exists(path.clone()).await.unwrap_or(false)
        {
            return Err(sftp_err(&format!("creating {path}"), e));
        }
    }
    let fin = format!("{dir}/devsync");
    let tmp = format!("{dir}/.devsync.upload.{}", upload_tag());
    let mut remote = sftp
        .create(tmp.clone())
        .await
        .map_err(|e| sftp_err(&format!("creating {tmp}"), e))?;
    let file = tokio::fs::File::open(local)
        .await
        .map_err(|source| HelperError::Local {
            path: local.display().to_string(),
            source,
        })?;
    let mut src = BufReader::with_capacity(1 << 20, file);
    let copy_err = |source| HelperError::Copy {
        path: tmp.clone(),
        source,
    };
    tokio::io::copy_buf(&mut src, &mut remote)
        .await
        .map_err(copy_err)?;
    remote.shutdown().await.map_err(copy_err)?;
    let mut attrs = russh_sftp::protocol::FileAttributes::empty();
    attrs.permissions = Some(0o755);
    sftp.set_metadata(tmp.clone(), attrs)
        .await
        .map_err(|e| sftp_err(&format!("chmod {tmp}"), e))?;
    if let Err(e) = sftp.rename(tmp.clone(), fin.clone()).await {
        // Another client may have installed the same build meanwhile: that one is as good.
        let _ = sftp.remove_file(tmp.clone()).await;
        if !sftp.try_exists(fin.clone()).await.unwrap_or(false) {
            return Err(sftp_err(&format!("renaming {tmp} to {fin}"), e));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_ids_of_several_binaries_stay_cached() {
        let td = tempfile::tempdir().unwrap();
        let cache = td.path().join("state/build-id");
        let bins: Vec<_> = (0..BUILD_IDS_KEPT + 1)
            .map(|i| {
                let p = td.path().join(format!("bin{i}"));
                std::fs::write(&p, format!("binary {i}")).unwrap();
                p
            })
            .collect();
        let want =
            |i: usize| blake3::hash(format!("binary {i}").as_bytes()).to_hex()[..12].to_string();
        for (i, b) in bins.iter().enumerate() {
            let got = hash_with_cache(b, &format!("stamp{i}"), Some(&cache)).unwrap();
            assert_eq!(got, want(i));
        }
        // Cached: the stamp decides, not the file (which is gone now).
        std::fs::remove_file(&bins[BUILD_IDS_KEPT]).unwrap();
        let last = hash_with_cache(
            &bins[BUILD_IDS_KEPT],
            &format!("stamp{BUILD_IDS_KEPT}"),
            Some(&cache),
        );
        assert_eq!(last.unwrap(), want(BUILD_IDS_KEPT));
        std::fs::remove_file(&bins[1]).unwrap();
        assert_eq!(
            hash_with_cache(&bins[1], "stamp1", Some(&cache)).unwrap(),
            want(1)
        );
        // The oldest was dropped to keep the file bounded.
        assert_eq!(
            std::fs::read_to_string(&cache).unwrap().lines().count(),
            BUILD_IDS_KEPT
        );
        std::fs::remove_file(&bins[0]).unwrap();
        assert!(hash_with_cache(&bins[0], "stamp0", Some(&cache)).is_err());
    }

    #[test]
    fn marker_parsing() {
        assert_eq!(
            parse_need("motd\nDEVSYNC-NEED-HELPER Linux x86_64 gz /home/u\n"),
            Some(Need {
                os: "Linux".into(),
                arch: "x86_64".into(),
                gzip: true,
                home: "/home/u".into()
            })
        );
        assert_eq!(
            parse_need("DEVSYNC-NEED-HELPER Darwin arm64 raw /Users/a b").map(|n| (n.gzip, n.home)),
            Some((false, "/Users/a b".to_string()))
        );
        assert_eq!(parse_need("sh: 1: exec: not found"), None);
    }

    #[test]
    fn platform_names() {
        let (os, arch) = local_platform();
        assert!(same_platform(&Need {
            os,
            arch,
            gzip: true,
            home: String::new()
        }));
        assert!(
            !same_platform(&Need {
                os: "Darwin".into(),
                arch: "arm64".into(),
                gzip: true,
                home: String::new()
            }) || cfg!(all(target_os = "macos", target_arch = "aarch64"))
        );
    }

    #[test]
    fn a_foreign_platform_needs_a_matching_binary() {
        let mac = Need {
            os: "Darwin".into(),
            arch: "arm64".into(),
            gzip: true,
            home: "/Users/x".into(),
        };
        if !same_platform(&mac) {
            let e = choose_binary(&mac, None).unwrap_err().to_string();
            assert!(
                e.contains("the remote is Darwin arm64") && e.contains("--helper-binary"),
                "{e}"
            );
        }
        let given = Path::new("/opt/devsync-darwin-arm64");
        assert_eq!(choose_binary(&mac, Some(given)).unwrap(), given);
        let (os, arch) = local_platform();
        let here = Need {
            os,
            arch,
            gzip: true,
            home: String::new(),
        };
        assert_eq!(
            choose_binary(&here, None).unwrap(),
            std::env::current_exe().unwrap()
        );
    }

    #[test]
    fn the_gunzip_install_script_installs_atomically_or_not_at_all() {
        use std::io::Write;
        use std::os::unix::fs::PermissionsExt;
        let td = tempfile::tempdir().unwrap();
        let dir = td.path().join("helpers");
        let run = |input: &[u8]| {
            // As a login shell runs an exec's command.
            let mut c = std::process::Command::new("bash")
                .arg("-c")
                .arg(gunzip_script(dir.to_str().unwrap(), "t"))
                .stdin(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            c.stdin.take().unwrap().write_all(input).unwrap();
            c.wait().unwrap().success()
        };
        let installed = dir.join(build_id()).join("devsync");
        // Corrupt input: nothing is installed and nothing is left behind.
        assert!(!run(b"\x1f\x8bnot really gzip"));
        assert!(!installed.exists());
        let leftovers = std::fs::read_dir(dir.join(build_id())).unwrap().count();
        assert_eq!(leftovers, 0);
        let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        z.write_all(b"#!/bin/sh\necho hi\n").unwrap();
        assert!(run(&z.finish().unwrap()));
        assert_eq!(std::fs::read(&installed).unwrap(), b"#!/bin/sh\necho hi\n");
        let mode = std::fs::metadata(&installed).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
    }

    #[test]
    fn remote_dirs_are_checked() {
        check_dir("~/.cache/devsync").unwrap();
        check_dir("/opt/devsync-helpers").unwrap();
        for bad in [
            "", "relative", "/a b", "/a'b", "/a\"b", "/$x", "~user/x", "/a`b`",
        ] {
            assert!(check_dir(bad).is_err(), "{bad}");
        }
        let s = start_script("~/.cache/devsync");
        assert!(s.starts_with("sh -c '") && s.ends_with('\''));
        assert_eq!(s.matches('\'').count(), 2);
    }
}
