//! What the user named on the command line: a local path, a devbox (`dbx_<id>:<path>`), or an
//! SSH host (`[user@]host[:port]:<path>`, `ssh://user@host:port/path`). Parsing only; no I/O.

use std::path::PathBuf;

pub mod credentials;
pub mod links;
pub mod pushed;

/// One side of a sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Local(PathBuf),
    Devbox {
        id: String,
        user: Option<String>,
        path: String,
    },
    Ssh {
        user: Option<String>,
        host: String,
        port: Option<u16>,
        path: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("{0:?}: empty path")]
    Empty(String),
    #[error("{0:?}: {1}")]
    Bad(String, &'static str),
}

impl Target {
    pub fn is_local(&self) -> bool {
        matches!(self, Target::Local(_))
    }

    /// A remote target's path as the user wrote it (empty: the remote home); `""` for a
    /// local one.
    pub fn remote_path(&self) -> &str {
        match self {
            Target::Devbox { path, .. } | Target::Ssh { path, .. } => path,
            Target::Local(_) => "",
        }
    }

    /// Parses scp-style syntax: a `:` before any `/` makes it remote; `./a:b` and `/a:b` are
    /// local paths.
    pub fn parse(s: &str) -> Result<Target, TargetError> {
        if s.is_empty() {
            return Err(TargetError::Empty(s.into()));
        }
        if let Some(rest) = s.strip_prefix("ssh://") {
            return parse_ssh_url(s, rest);
        }
        let colon = s.find(':');
        let slash = s.find('/');
        let Some(colon) = colon.filter(|&c| slash.is_none_or(|sl| c < sl)) else {
            return Ok(Target::Local(PathBuf::from(s)));
        };
        let (host_part, rest) = (&s[..colon], &s[colon + 1..]);
        if host_part.is_empty() {
            return Err(TargetError::Bad(
                s.into(),
                "missing host before ':' (write ./name for a local path)",
            ));
        }
        let (user, host) = match host_part.rsplit_once('@') {
            Some((u, h)) if !u.is_empty() && !h.is_empty() => (Some(u.to_string()), h),
            Some(_) => return Err(TargetError::Bad(s.into(), "empty user or host around '@'")),
            None => (None, host_part),
        };
        if let Some(id) = host.strip_prefix("dbx_") {
            if id.is_empty()
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(TargetError::Bad(
                    s.into(),
                    "devbox ids are letters, digits, '_' and '-'",
                ));
            }
            return Ok(Target::Devbox {
                id: format!("dbx_{id}"),
                user,
                path: default_path(rest),
            });
        }
        // host:port:path (the port form needs a second colon and digits).
        let (port, path) = match rest.split_once(':') {
            Some((p, path)) if !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()) => {
                let port = p
                    .parse()
                    .map_err(|_| TargetError::Bad(s.into(), "port out of range"))?;
                (Some(port), path)
            }
            _ => (None, rest),
        };
        Ok(Target::Ssh {
            user,
            host: host.to_string(),
            port,
            path: default_path(path),
        })
    }
}

/// An empty remote path means the remote home directory, as with scp.
fn default_path(p: &str) -> String {
    if p.is_empty() { ".".into() } else { p.into() }
}

fn parse_ssh_url(s: &str, rest: &str) -> Result<Target, TargetError> {
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "."),
    };
    let (user, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u.to_string()), h),
        None => (None, authority),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (
            h,
            Some(
                p.parse()
                    .map_err(|_| TargetError::Bad(s.into(), "bad port"))?,
            ),
        ),
        None => (hostport, None),
    };
    if host.is_empty() {
        return Err(TargetError::Bad(s.into(), "missing host"));
    }
    // ssh://host/~/x means home-relative, like scp's host:~/x.
    let path = path
        .strip_prefix("/~")
        .map_or(path.to_string(), |p| format!("~{p}"));
    Ok(Target::Ssh {
        user,
        host: host.to_string(),
        port,
        path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(s: &str) -> Target {
        Target::Local(PathBuf::from(s))
    }

    #[test]
    fn local_paths() {
        for s in [
            "dir",
            "./a:b",
            "/abs/x:y",
            "../up",
            "-dash",
            "with space",
            "a/b:c",
        ] {
            assert_eq!(Target::parse(s).unwrap(), local(s), "{s}");
        }
        assert!(Target::parse("").is_err());
        assert!(Target::parse(":x").is_err());
    }

    #[test]
    fn devboxes() {
        assert_eq!(
            Target::parse("dbx_abc:/home/user/dir").unwrap(),
            Target::Devbox {
                id: "dbx_abc".into(),
                user: None,
                path: "/home/user/dir".into()
            }
        );
        assert_eq!(
            Target::parse("me@dbx_A1-2:").unwrap(),
            Target::Devbox {
                id: "dbx_A1-2".into(),
                user: Some("me".into()),
                path: ".".into()
            }
        );
        assert!(Target::parse("dbx_:x").is_err());
        assert!(Target::parse("dbx_a b:x").is_err());
    }

    #[test]
    fn ssh_hosts() {
        assert_eq!(
            Target::parse("u@h:2222:/p").unwrap(),
            Target::Ssh {
                user: Some("u".into()),
                host: "h".into(),
                port: Some(2222),
                path: "/p".into()
            }
        );
        assert_eq!(
            Target::parse("host:src").unwrap(),
            Target::Ssh {
                user: None,
                host: "host".into(),
                port: None,
                path: "src".into()
            }
        );
        assert_eq!(
            Target::parse("ssh://u@h:22/~/x").unwrap(),
            Target::Ssh {
                user: Some("u".into()),
                host: "h".into(),
                port: Some(22),
                path: "~/x".into()
            }
        );
        assert!(Target::parse("ssh://u@h:99999/x").is_err());
    }
}
