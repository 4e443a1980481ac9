//! A small SFTP server rooted at a devbox's home (relative paths resolve there): enough of
//! the protocol for the helper bootstrap and everyday `sftp` and `scp` use (open, read, write,
//! close, stat family, setstat, mkdir, rmdir, remove, rename, realpath, opendir/readdir).
//! It runs as a process of its own with the devbox user's rights, so it reaches exactly what
//! that user may; at most [`MAX_HANDLES`] files are open at once.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use russh_sftp::protocol::{
    Attrs, Data, File, FileAttributes, Handle, Name, OpenFlags, Status, StatusCode, Version,
};
use tokio::fs;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

/// Open files and directories one session may hold (each is a file descriptor here).
const MAX_HANDLES: usize = 256;

/// Serves SFTP on stdin/stdout, rooted at `home` (`devsync sftp-server`, which the endpoint
/// runs as the devbox's user for each `sftp` channel).
pub async fn serve_stdio(home: PathBuf) {
    let (done, ended) = tokio::sync::oneshot::channel();
    let io = EndsWith {
        inner: tokio::io::join(tokio::io::stdin(), tokio::io::stdout()),
        done: Some(done),
    };
    // russh-sftp serves on a task of its own and drops the stream when the client is gone.
    russh_sftp::server::run(io, SftpServer::new(home)).await;
    let _ = ended.await; // Err: dropped, which also means it ended
}

/// A stream that says when it is dropped.
struct EndsWith<S> {
    inner: S,
    done: Option<tokio::sync::oneshot::Sender<()>>,
}

impl<S> Drop for EndsWith<S> {
    fn drop(&mut self) {
        if let Some(d) = self.done.take() {
            let _ = d.send(()); // the waiter may be gone too
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for EndsWith<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for EndsWith<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

enum Open {
    File(fs::File),
    Dir(Option<Vec<File>>),
}

pub struct SftpServer {
    home: PathBuf,
    handles: HashMap<String, Open>,
    next: u64,
}

impl SftpServer {
    pub fn new(home: PathBuf) -> Self {
        SftpServer {
            home,
            handles: HashMap::new(),
            next: 0,
        }
    }

    /// The open file behind `handle`, positioned at `offset`.
    async fn file_at(&mut self, handle: &str, offset: u64) -> Result<&mut fs::File, StatusCode> {
        let Some(Open::File(f)) = self.handles.get_mut(handle) else {
            return Err(StatusCode::Failure);
        };
        f.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(|e| code(&e))?;
        Ok(f)
    }

    fn path(&self, p: &str) -> PathBuf {
        if p.is_empty() || p == "." {
            self.home.clone()
        } else if let Some(rest) = p.strip_prefix("~/") {
            self.home.join(rest)
        } else {
            self.home.join(p) // absolute paths replace the base
        }
    }

    fn handle(&mut self, open: Open) -> Result<String, StatusCode> {
        if self.handles.len() >= MAX_HANDLES {
            return Err(StatusCode::Failure);
        }
        self.next += 1;
        let h = self.next.to_string();
        self.handles.insert(h.clone(), open);
        Ok(h)
    }
}

fn ok(id: u32) -> Status {
    Status {
        id,
        status_code: StatusCode::Ok,
        error_message: "Ok".into(),
        language_tag: "en-US".into(),
    }
}

fn code(e: &std::io::Error) -> StatusCode {
    match e.kind() {
        std::io::ErrorKind::NotFound => StatusCode::NoSuchFile,
        std::io::ErrorKind::PermissionDenied => StatusCode::PermissionDenied,
        _ => StatusCode::Failure,
    }
}

async fn apply_attrs(path: &Path, attrs: &FileAttributes) -> Result<(), StatusCode> {
    if let Some(p) = attrs.permissions {
        fs::set_permissions(path, std::fs::Permissions::from_mode(p & 0o7777))
            .await
            .map_err(|e| code(&e))?;
    }
    if let Some(size) = attrs.size {
        let f = fs::OpenOptions::new()
            .write(true)
            .open(path)
            .await
            .map_err(|e| code(&e))?;
        f.set_len(size).await.map_err(|e| code(&e))?;
    }
    Ok(())
}

impl russh_sftp::server::Handler for SftpServer {
    type Error = StatusCode;

    fn unimplemented(&self) -> Self::Error {
        StatusCode::OpUnsupported
    }

    async fn init(
        &mut self,
        _version: u32,
        _ext: HashMap<String, String>,
    ) -> Result<Version, Self::Error> {
        Ok(Version::new())
    }

    async fn open(
        &mut self,
        id: u32,
        filename: String,
        pflags: OpenFlags,
        attrs: FileAttributes,
    ) -> Result<Handle, Self::Error> {
        let path = self.path(&filename);
        let mut o = fs::OpenOptions::new();
        o.read(pflags.contains(OpenFlags::READ))
            .write(pflags.contains(OpenFlags::WRITE) || pflags.contains(OpenFlags::APPEND))
            .append(pflags.contains(OpenFlags::APPEND))
            .truncate(pflags.contains(OpenFlags::TRUNCATE));
        if pflags.contains(OpenFlags::CREATE) {
            if pflags.contains(OpenFlags::EXCLUDE) {
                o.create_new(true);
            } else {
                o.create(true);
            }
            o.mode(attrs.permissions.unwrap_or(0o644) & 0o7777);
        }
        let f = o.open(&path).await.map_err(|e| code(&e))?;
        Ok(Handle {
            id,
            handle: self.handle(Open::File(f))?,
        })
    }

    async fn close(&mut self, id: u32, handle: String) -> Result<Status, Self::Error> {
        match self.handles.remove(&handle) {
            Some(Open::File(mut f)) => {
                f.flush().await.map_err(|e| code(&e))?;
                Ok(ok(id))
            }
            Some(Open::Dir(_)) => Ok(ok(id)),
            None => Err(StatusCode::Failure),
        }
    }

    async fn read(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        len: u32,
    ) -> Result<Data, Self::Error> {
        let f = self.file_at(&handle, offset).await?;
        let mut buf = vec![0u8; len.min(256 << 10) as usize];
        let n = f.read(&mut buf).await.map_err(|e| code(&e))?;
        if n == 0 {
            return Err(StatusCode::Eof);
        }
        buf.truncate(n);
        Ok(Data { id, data: buf })
    }

    async fn write(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<Status, Self::Error> {
        let f = self.file_at(&handle, offset).await?;
        f.write_all(&data).await.map_err(|e| code(&e))?;
        Ok(ok(id))
    }

    async fn lstat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        let md = fs::symlink_metadata(self.path(&path))
            .await
            .map_err(|e| code(&e))?;
        Ok(Attrs {
            id,
            attrs: FileAttributes::from(&md),
        })
    }

    async fn stat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        let md = fs::metadata(self.path(&path)).await.map_err(|e| code(&e))?;
        Ok(Attrs {
            id,
            attrs: FileAttributes::from(&md),
        })
    }

    async fn fstat(&mut self, id: u32, handle: String) -> Result<Attrs, Self::Error> {
        let Some(Open::File(f)) = self.handles.get(&handle) else {
            return Err(StatusCode::Failure);
        };
        let md = f.metadata().await.map_err(|e| code(&e))?;
        Ok(Attrs {
            id,
            attrs: FileAttributes::from(&md),
        })
    }

    async fn setstat(
        &mut self,
        id: u32,
        path: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        apply_attrs(&self.path(&path), &attrs).await?;
        Ok(ok(id))
    }

    async fn fsetstat(
        &mut self,
        id: u32,
        handle: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        let Some(Open::File(f)) = self.handles.get(&handle) else {
            return Err(StatusCode::Failure);
        };
        if let Some(p) = attrs.permissions {
            f.set_permissions(std::fs::Permissions::from_mode(p & 0o7777))
                .await
                .map_err(|e| code(&e))?;
        }
        if let Some(size) = attrs.size {
            f.set_len(size).await.map_err(|e| code(&e))?;
        }
        Ok(ok(id))
    }

    async fn mkdir(
        &mut self,
        id: u32,
        path: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        let p = self.path(&path);
        fs::create_dir(&p).await.map_err(|e| code(&e))?;
        if let Some(mode) = attrs.permissions {
            fs::set_permissions(&p, std::fs::Permissions::from_mode(mode & 0o7777))
                .await
                .map_err(|e| code(&e))?;
        }
        Ok(ok(id))
    }

    async fn rmdir(&mut self, id: u32, path: String) -> Result<Status, Self::Error> {
        fs::remove_dir(self.path(&path))
            .await
            .map_err(|e| code(&e))?;
        Ok(ok(id))
    }

    async fn remove(&mut self, id: u32, filename: String) -> Result<Status, Self::Error> {
        fs::remove_file(self.path(&filename))
            .await
            .map_err(|e| code(&e))?;
        Ok(ok(id))
    }

    async fn rename(
        &mut self,
        id: u32,
        oldpath: String,
        newpath: String,
    ) -> Result<Status, Self::Error> {
        fs::rename(self.path(&oldpath), self.path(&newpath))
            .await
            .map_err(|e| code(&e))?;
        Ok(ok(id))
    }

    async fn realpath(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        let p = fs::canonicalize(self.path(&path))
            .await
            .unwrap_or_else(|_| self.path(&path));
        Ok(Name {
            id,
            files: vec![File::dummy(p.to_string_lossy())],
        })
    }

    async fn opendir(&mut self, id: u32, path: String) -> Result<Handle, Self::Error> {
        let mut rd = fs::read_dir(self.path(&path)).await.map_err(|e| code(&e))?;
        let mut files = Vec::new();
        while let Some(e) = rd.next_entry().await.map_err(|e| code(&e))? {
            let attrs = e
                .metadata()
                .await
                .map(|m| FileAttributes::from(&m))
                .unwrap_or_default();
            files.push(File::new(e.file_name().to_string_lossy(), attrs));
        }
        Ok(Handle {
            id,
            handle: self.handle(Open::Dir(Some(files)))?,
        })
    }

    async fn readdir(&mut self, id: u32, handle: String) -> Result<Name, Self::Error> {
        match self.handles.get_mut(&handle) {
            Some(Open::Dir(files)) => match files.take() {
                Some(files) if !files.is_empty() => Ok(Name { id, files }),
                _ => Err(StatusCode::Eof),
            },
            _ => Err(StatusCode::Failure),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use russh_sftp::server::Handler;

    #[tokio::test]
    async fn open_handles_are_capped() {
        let td = tempfile::tempdir().unwrap();
        std::fs::write(td.path().join("f"), b"x").unwrap();
        let mut s = SftpServer::new(td.path().to_path_buf());
        let (flags, attrs) = (OpenFlags::READ, FileAttributes::empty);
        let mut held = Vec::new();
        for _ in 0..MAX_HANDLES {
            held.push(s.open(1, "f".into(), flags, attrs()).await.unwrap().handle);
        }
        let over = s.open(1, "f".into(), flags, attrs()).await;
        assert!(over.is_err(), "one handle past the cap");
        s.close(2, held.pop().unwrap()).await.unwrap();
        let again = s.open(1, "f".into(), flags, attrs()).await;
        assert!(again.is_ok(), "a closed handle frees its place");
    }
}
