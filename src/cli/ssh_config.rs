//! `devsync ssh dbx_x --config-only`: an OpenSSH `Host` block for a devbox, so ssh, scp,
//! `rsync -e ssh`, VSCode Remote-SSH and JetBrains Gateway reach it through `devsync proxy`
//! with its host key checked (pinned in devsync's known_hosts, never `StrictHostKeyChecking
//! no`). Only the block goes to stdout, so `>> ~/.ssh/config` stays clean.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};

use super::RemoteArgs;
use crate::target::Target;
use crate::target::credentials;
use crate::transport::devbox_api::Api;
use crate::transport::remote::{self, Notice};

pub async fn print(target: &Target, a: &RemoteArgs) -> anyhow::Result<u8> {
    let Target::Devbox { id, user, .. } = target else {
        bail!(
            "--config-only is for devboxes (dbx_<id>): an SSH host is already reachable with \
             ssh and its own ~/.ssh/config entry"
        );
    };
    let opts = a.options();
    let notice: Notice = Arc::new(|m: String| {
        eprintln!("devsync: {}", super::output::escape_text(&m));
    });
    // One real login: it fetches and caches the key, pins the host key, and proves the block
    // will work before anyone pastes it.
    let (conn, _) = remote::connect(target, &opts, &notice).await?;
    conn.close().await;
    let creds = credentials::load(id)?
        .with_context(|| format!("the key for {id} was not cached after logging in"))?;
    let gateway = Api::from_env(&opts.tls)?.gateway()?;
    let exe = std::env::current_exe()
        .and_then(|p| p.canonicalize())
        .context("finding this devsync binary for the ProxyCommand")?;
    let mut proxy = format!("{} proxy --gateway {}", sh_quote(&exe), sh_word(&gateway));
    if let Some(ca) = &opts.tls.extra_ca {
        let ca = absolute(ca)?;
        proxy.push_str(&format!(" --tls-ca {}", sh_quote(&ca)));
    }
    if opts.tls.insecure {
        proxy.push_str(" --insecure-tls");
    }
    proxy.push_str(" %h");
    let block = block(
        id,
        &creds.url,
        user.as_deref().unwrap_or(&creds.ssh_user),
        &credentials::key_path(id)?,
        &proxy,
        &credentials::pin_file()?,
    );
    print!("{block}");
    eprintln!(
        "devsync: append this to ~/.ssh/config (devsync ssh {id} --config-only >> ~/.ssh/config), then: ssh {id}"
    );
    Ok(super::exit::OK)
}

/// The `Host` block. `%` is OpenSSH's token character: literal ones are doubled.
fn block(id: &str, host: &str, user: &str, key: &Path, proxy: &str, pins: &Path) -> String {
    let path = |p: &Path| config_quote(&p.display().to_string());
    format!(
        "Host {id}\n\
         \x20 HostName {host}\n\
         \x20 User {user}\n\
         \x20 IdentityFile {key}\n\
         \x20 IdentitiesOnly yes\n\
         \x20 ProxyCommand {proxy}\n\
         \x20 ServerAliveInterval 60\n\
         \x20 ServerAliveCountMax 3\n\
         \x20 UserKnownHostsFile {pins}\n\
         \x20 HostKeyAlias {id}\n\
         \x20 StrictHostKeyChecking yes\n",
        key = path(key),
        pins = path(pins),
    )
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    p.canonicalize()
        .with_context(|| format!("--tls-ca {}", p.display()))
}

/// A path quoted for the shell OpenSSH runs the ProxyCommand with.
fn sh_quote(p: &Path) -> String {
    sh_word(&p.display().to_string())
}

fn sh_word(s: &str) -> String {
    shell_escape::unix::escape(s.into())
        .into_owned()
        .replace('%', "%%")
}

/// A value for ssh_config: double-quoted when it has spaces; `%` doubled.
fn config_quote(s: &str) -> String {
    let s = s.replace('%', "%%");
    if s.contains([' ', '\t']) {
        format!("\"{s}\"")
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_block_names_everything_and_keeps_checking_host_keys() {
        let b = block(
            "dbx_a",
            "dbx_a.ssh.example",
            "user",
            Path::new("/home/me/.runloop/ssh_keys/dbx_a.pem"),
            "/usr/bin/devsync proxy --gateway ssh.example:443 %h",
            Path::new("/home/me/my state/known_hosts"),
        );
        assert_eq!(
            b,
            "Host dbx_a\n  HostName dbx_a.ssh.example\n  User user\n  \
             IdentityFile /home/me/.runloop/ssh_keys/dbx_a.pem\n  IdentitiesOnly yes\n  \
             ProxyCommand /usr/bin/devsync proxy --gateway ssh.example:443 %h\n  \
             ServerAliveInterval 60\n  ServerAliveCountMax 3\n  \
             UserKnownHostsFile \"/home/me/my state/known_hosts\"\n  HostKeyAlias dbx_a\n  \
             StrictHostKeyChecking yes\n"
        );
        assert_eq!(sh_word("/a b/100%"), "'/a b/100%%'");
    }
}
