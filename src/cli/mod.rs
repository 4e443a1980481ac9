//! Command line: clap definitions (syntax only) turned into jobs; one file per command.

mod cp;
mod helper;
pub(crate) mod output;
mod proxy;
mod serve;
mod ssh;
mod ssh_config;
mod sync;
mod watch;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

/// Exit statuses (rsync's numbers where they mean the same thing).
pub mod exit {
    pub const OK: u8 = 0;
    /// Fatal error: nothing or only part was synced, the message says why.
    pub const FATAL: u8 = 1;
    /// Bad command line (clap's own code).
    pub const USAGE: u8 = 2;
    /// Some files could not be transferred; everything else was.
    pub const PARTIAL: u8 = 23;
    /// `--delete` was refused by the safety guard.
    pub const DELETE_REFUSED: u8 = 25;
    /// A watch stopped propagating: its root was deleted, replaced or emptied.
    pub const HALTED: u8 = 26;
}

#[derive(Parser, Debug)]
#[command(
    name = "devsync",
    version,
    about = "Fast rsync-style delta sync between your working tree and a remote dev box",
    after_help = "Exit status: 0 ok, 1 error, 2 usage, 23 some files failed, 25 --delete refused, \
                  26 watch halted."
)]
pub struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

const TARGETS: &str = "\
Targets (scp syntax; a ':' before any '/' makes it remote):
  dir, ./a:b, /x:y                    a local directory (write ./name for a name with ':' or '-')
  dbx_<id>:path, user@dbx_<id>:path   a hosted devbox (RUNLOOP_API_KEY; SSH inside TLS)
  host:path, user@host:2222:path      an SSH host (~/.ssh/config aliases apply)
  ssh://user@host:2222/path           the same, as a URL
An empty remote path is the remote home; relative paths are relative to it.";

const PUSH_HELP: &str = "\
Examples:
  devsync push . dbx_abc:~/project              sync this directory to a devbox
  devsync push -n --delete src box:/srv/app     show what a mirror would change
  devsync push -i --exclude target/ . dbx_abc:  one line per change, without target/";

const PULL_HELP: &str = "\
Examples:
  devsync pull dbx_abc:~/project/out ./out      fetch a devbox's build output
  devsync pull --delete box:/srv/app ./app      make ./app an exact copy";

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Make DEST mirror the local directory SRC (only differences travel)
    #[command(after_help = format!("{TARGETS}\n\n{PUSH_HELP}"))]
    Push(SyncArgs),
    /// Make the local directory DEST mirror SRC
    #[command(after_help = format!("{TARGETS}\n\n{PULL_HELP}"))]
    Pull(SyncArgs),
    /// Keep DEST in sync with the local directory SRC: an initial push, then every change as
    /// it happens, over one connection
    #[command(after_help = format!("{TARGETS}\n\n{}", watch::WATCH_HELP))]
    Watch(watch::WatchArgs),
    /// Wait until every change made in DIR so far is on the remote (DIR is being watched)
    Flush(watch::FlushArgs),
    /// Copy files (directories with -r) between here and remotes, or between two remotes,
    /// scp-style; only differences travel
    #[command(after_help = format!("{TARGETS}\n\n{}", cp::CP_HELP))]
    Cp(cp::CpArgs),
    /// A shell on a devbox or SSH host, or a command run there (exit status is its own);
    /// --config-only prints an OpenSSH config block for the devbox
    #[command(after_help = ssh::SSH_HELP)]
    Ssh(ssh::SshArgs),
    /// Relay stdin/stdout to a devbox through its TLS gateway (an OpenSSH ProxyCommand; see
    /// `devsync ssh --config-only`)
    Proxy(proxy::ProxyArgs),
    /// Run the embedded endpoint: TLS gateway, SSH server and devbox key API in one process
    Serve(serve::ServeArgs),
    /// Serve the sync protocol on stdin/stdout (started by devsync itself, locally or over SSH)
    #[command(hide = true)]
    Helper,
    /// Serve SFTP on stdin/stdout rooted at DIR (run by `devsync serve` for each devbox)
    #[command(hide = true)]
    SftpServer { dir: std::path::PathBuf },
    /// Keep a connection open for the next session (started by devsync itself)
    #[command(hide = true, name = "__keep")]
    Keep(KeepArgs),
    /// Print a shell completion script (e.g. `devsync completions bash > /etc/bash_completion.d/devsync`)
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Args, Debug, Clone)]
pub struct SyncArgs {
    /// What to sync from: push, a local directory; pull, a target (see below)
    #[arg(value_name = "SRC")]
    src: String,
    /// What to make a mirror of SRC: push, a target (see below); pull, a local directory.
    /// Created if missing
    #[arg(value_name = "DEST")]
    dst: String,
    /// Delete destination entries that the source does not have (excluded entries are kept)
    #[arg(long)]
    delete: bool,
    /// With --delete: skip the guard against emptying or mostly-emptying the destination
    #[arg(long, requires = "delete")]
    force_delete: bool,
    /// Show what would change; change nothing
    #[arg(short = 'n', long)]
    dry_run: bool,
    /// Compare file contents (BLAKE3) instead of size and modification time
    #[arg(short = 'c', long)]
    checksum: bool,
    /// Flush every written file to disk before it replaces the old one (survives power loss;
    /// slower)
    #[arg(long)]
    fsync: bool,
    /// Update changed files with an old copy of over 8 MiB by writing the changed ranges into
    /// that file, after the new content is verified, instead of replacing it: costs the change,
    /// not the file, where the filesystem has no reflinks. Not atomic: while it writes, readers
    /// see old and new mixed, and other hard links to the file change too (as rsync --inplace)
    #[arg(long)]
    inplace: bool,
    #[command(flatten)]
    filters: FilterArgs,
    #[command(flatten)]
    output: OutputArgs,
    #[command(flatten)]
    remote: RemoteArgs,
}

/// What push, pull and cp print.
#[derive(Args, Debug, Clone)]
pub struct OutputArgs {
    /// Print one line per change, rsync --itemize-changes style
    #[arg(short = 'i', long = "itemize", visible_alias = "itemize-changes")]
    itemize: bool,
    /// Show a progress bar (default: on when stderr is a terminal)
    #[arg(long, overrides_with = "no_progress")]
    progress: bool,
    /// Never show a progress bar
    #[arg(long)]
    no_progress: bool,
    /// Print a machine-readable JSON summary on stdout instead of text
    #[arg(long)]
    json: bool,
    /// Print only errors
    #[arg(short, long)]
    quiet: bool,
    /// Say more: the summary's full detail, and timed milestones of both ends on stderr
    /// (as DEVSYNC_TRACE=1 does)
    #[arg(short, long)]
    verbose: bool,
}

impl OutputArgs {
    /// The reporter these flags ask for (`sending`: this side sends).
    pub fn reporter(&self, sending: bool) -> std::sync::Arc<output::Reporter> {
        use std::io::IsTerminal;
        let progress = !self.no_progress
            && (self.progress || (std::io::stderr().is_terminal() && !self.quiet && !self.json));
        std::sync::Arc::new(output::Reporter::new(
            sending,
            self.itemize,
            self.quiet,
            self.json,
            progress,
        ))
    }

    /// The exit status of a finished sync or copy.
    pub fn exit_code(outcome: &crate::session::client::Outcome, r: &output::Reporter) -> u8 {
        if outcome.stats.delete_refused {
            exit::DELETE_REFUSED
        } else if outcome.stats.errors > 0 || !r.errors().is_empty() {
            exit::PARTIAL
        } else {
            exit::OK
        }
    }

    /// Prints the summary: JSON, one line (and the detail with `-v`), or nothing with `-q`.
    pub fn summary(
        &self,
        outcome: &crate::session::client::Outcome,
        elapsed: std::time::Duration,
        r: &output::Reporter,
        code: u8,
        dry_run: bool,
    ) {
        if self.json {
            println!("{}", output::summary_json(outcome, elapsed, r, code));
        } else if !self.quiet {
            println!("{}", output::summary_line(outcome, elapsed, dry_run));
            if self.verbose {
                for line in output::summary_detail(outcome) {
                    println!("  {line}");
                }
            }
        }
    }
}

/// Which paths take part (push, pull and watch).
#[derive(Args, Debug, Clone)]
pub struct FilterArgs {
    /// Exclude paths matching PATTERN (gitignore syntax; repeatable)
    #[arg(long, value_name = "PATTERN")]
    exclude: Vec<String>,
    /// Do not read .gitignore files (.devsyncignore and --exclude still apply)
    #[arg(long)]
    no_gitignore: bool,
    /// Leave version-control directories (.git, .hg, .svn, …) out of the sync
    #[arg(long)]
    exclude_vcs: bool,
}

impl FilterArgs {
    pub fn options(&self) -> crate::engine::filter::FilterOptions {
        crate::engine::filter::FilterOptions {
            gitignore: !self.no_gitignore,
            exclude_vcs: self.exclude_vcs,
            excludes: self.exclude.clone(),
        }
    }
}

/// How to reach remote targets.
#[derive(Args, Debug, Clone)]
pub struct RemoteArgs {
    /// Private key for SSH hosts (repeatable; tried before the ssh-agent and ~/.ssh/id_*)
    #[arg(short = 'I', long = "identity", value_name = "FILE")]
    identity: Vec<std::path::PathBuf>,
    /// Refuse SSH hosts missing from ~/.ssh/known_hosts (default: record them on first use)
    #[arg(long)]
    strict_host_keys: bool,
    /// Extra CA certificate (PEM) to trust for devbox gateways and the API
    #[arg(long, value_name = "FILE", env = "DEVSYNC_TLS_CA")]
    tls_ca: Option<std::path::PathBuf>,
    /// Skip verifying the devbox gateway's TLS certificate (the SSH host key is still pinned)
    #[arg(long)]
    insecure_tls: bool,
    /// devsync binary to install on remotes of another platform than this one
    #[arg(long, value_name = "FILE")]
    helper_binary: Option<std::path::PathBuf>,
    /// Directory for helper binaries on remotes
    #[arg(
        long,
        value_name = "DIR",
        env = "DEVSYNC_REMOTE_DIR",
        default_value = "~/.cache/devsync"
    )]
    remote_dir: String,
    /// Seconds to wait for a connection, handshake or authentication
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    timeout: u64,
    /// Compress data on the wire with zstd: auto (only while the link is slower than the
    /// compressor, at the level that moves data fastest), off, or a fixed level 1-19. Data that
    /// does not compress always goes as it is. Local targets never compress
    #[arg(long, value_name = "auto|off|LEVEL", default_value = "auto")]
    compress: crate::proto::Compress,
    /// Keep the connection (and a started helper) open in the background for this many idle
    /// seconds after a push, pull or cp to a remote, so the next one to the same target starts
    /// at once; 0 keeps nothing
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 300,
        env = "DEVSYNC_KEEP_CONNECTION"
    )]
    keep_connection: u64,
}

impl RemoteArgs {
    /// `--compress`, for a session with `target` (a local one never compresses: a pipe is
    /// faster than any compressor).
    pub fn compress(&self, target: &crate::target::Target) -> crate::proto::Compress {
        match target {
            crate::target::Target::Local(_) => crate::proto::Compress::Off,
            _ => self.compress,
        }
    }

    pub fn options(&self) -> crate::transport::remote::RemoteOptions {
        use crate::transport::bootstrap::BootstrapOptions;
        use crate::transport::remote::RemoteOptions;
        use crate::transport::tls::TlsPolicy;
        use std::time::Duration;
        let ms = |var: &str| {
            std::env::var(var)
                .ok()
                .and_then(|v| v.parse().ok())
                .map(Duration::from_millis)
        };
        let d = RemoteOptions::default();
        RemoteOptions {
            tls: TlsPolicy {
                extra_ca: self.tls_ca.clone(),
                insecure: self.insecure_tls,
            },
            identities: self.identity.clone(),
            strict_host_keys: self.strict_host_keys,
            bootstrap: BootstrapOptions {
                remote_dir: self.remote_dir.clone(),
                helper_binary: self.helper_binary.clone(),
                greeting_timeout: Duration::from_secs(self.timeout.max(1)),
            },
            timeout: Duration::from_secs(self.timeout.max(1)),
            // For scripts and tests that do not want to wait 3 s between status checks.
            poll_every: ms("DEVSYNC_POLL_INTERVAL_MS").unwrap_or(d.poll_every),
            poll_limit: d.poll_limit,
            keep: Duration::from_secs(self.keep_connection),
            keep_args: self.to_args(),
        }
    }

    /// These options as command-line flags (for the keeper process, which makes the same
    /// connection).
    fn to_args(&self) -> Vec<std::ffi::OsString> {
        let mut v: Vec<std::ffi::OsString> = Vec::new();
        for i in &self.identity {
            v.push("--identity".into());
            v.push(i.into());
        }
        if self.strict_host_keys {
            v.push("--strict-host-keys".into());
        }
        if let Some(ca) = &self.tls_ca {
            v.push("--tls-ca".into());
            v.push(ca.into());
        }
        if self.insecure_tls {
            v.push("--insecure-tls".into());
        }
        if let Some(b) = &self.helper_binary {
            v.push("--helper-binary".into());
            v.push(b.into());
        }
        v.push(format!("--remote-dir={}", self.remote_dir).into());
        v.push(format!("--timeout={}", self.timeout).into());
        v
    }
}

/// `devsync __keep`: the background process that keeps a connection for the next session.
#[derive(Args, Debug, Clone)]
pub struct KeepArgs {
    /// Seconds without a session before it exits
    #[arg(long)]
    idle: u64,
    #[command(flatten)]
    remote: RemoteArgs,
    /// The endpoint (a target whose path is ignored)
    target: String,
}

/// A command that failed: the error to print (once, by `main`) and the exit status.
#[derive(Debug)]
pub struct Failure {
    pub error: anyhow::Error,
    pub code: u8,
    /// The command was run with `--json`: the failure goes to stdout as JSON too.
    pub json: bool,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Failure {
        Failure {
            error: e.into(),
            code: exit::FATAL,
            json: false,
        }
    }
}

/// Which stage a failure happened in, for `--json` (the text says it for humans).
pub fn stage_of(e: &anyhow::Error) -> &'static str {
    use crate::transport::TransportError as T;
    for cause in e.chain() {
        if let Some(t) = cause.downcast_ref::<T>() {
            return match t {
                T::Api(_) => "api",
                T::Connect { .. } => "connect",
                T::Tls { .. } | T::TlsSetup(_) => "tls",
                T::Ssh { .. } => "ssh",
                T::HostKey { .. } => "host_key",
                T::Auth { .. } => "auth",
                T::Helper { .. } => "helper",
                T::Config(_) | T::Local(_) => "config",
            };
        }
        if cause
            .downcast_ref::<crate::session::SessionError>()
            .is_some()
        {
            return "sync";
        }
        if cause
            .downcast_ref::<crate::engine::scan::ScanError>()
            .is_some()
        {
            return "source";
        }
        if cause.downcast_ref::<crate::target::TargetError>().is_some() {
            return "usage";
        }
    }
    "local"
}

/// Parses the command line and runs the command: its exit status, or why it failed.
pub fn run() -> Result<u8, Failure> {
    crate::transport::tls::install_crypto_provider();
    let cli = match parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print(); // nowhere else to report a failure to print
            if !e.use_stderr() {
                return Ok(exit::OK); // --help, --version
            }
            // Tools asked for JSON get it even when the command line itself is wrong.
            if std::env::args_os().any(|a| a == "--json") {
                let v = serde_json::json!({
                    "error": e.kind().to_string(),
                    "detail": e.render().to_string(),
                    "stage": "usage",
                    "exit_code": exit::USAGE,
                });
                println!("{v}");
            }
            return Ok(exit::USAGE);
        }
    };
    match cli.cmd {
        Cmd::Push(a) => sync::run(a, sync::Direction::Push),
        Cmd::Pull(a) => sync::run(a, sync::Direction::Pull),
        Cmd::Watch(a) => watch::run(a),
        Cmd::Flush(a) => watch::flush(a),
        Cmd::Cp(a) => cp::run(a),
        Cmd::Ssh(a) => ssh::run(a),
        Cmd::Proxy(a) => proxy::run(a),
        Cmd::Serve(a) => {
            crate::trace::init(false);
            serve::run(a)
        }
        Cmd::Helper => {
            crate::trace::init(false);
            helper::run()
        }
        Cmd::Keep(a) => {
            crate::trace::init(false);
            let target = crate::target::Target::parse(&a.target)?;
            let opts = a.remote.options();
            let idle = std::time::Duration::from_secs(a.idle.max(1));
            runtime()?.block_on(crate::transport::keep::keeper(
                &a.target, &target, opts, idle,
            ))?;
            Ok(exit::OK)
        }
        Cmd::SftpServer { dir } => {
            runtime()?.block_on(crate::server::sftp::serve_stdio(dir));
            Ok(exit::OK)
        }
        Cmd::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "devsync",
                &mut std::io::stdout(),
            );
            Ok(exit::OK)
        }
    }
}

/// Prints a failure the one way devsync prints errors: `devsync: error: ` and the cause chain,
/// with control characters escaped (messages carry remote file names and remote stderr); with
/// `--json` also a JSON object on stdout, for tools.
pub fn print_failure(f: &Failure) {
    let whole = crate::error_chain::chain(f.error.as_ref());
    let text = output::escape_text(&whole);
    eprintln!("devsync: error: {text}");
    if f.json {
        let v = serde_json::json!({
            "error": whole,
            "stage": stage_of(&f.error),
            "exit_code": f.code,
        });
        println!("{v}");
    }
}

/// Whether `e` is only a closed stdout/stderr (a pipe into `head`): not worth an error.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Parses the command line. An empty environment variable counts as unset, as for the
/// `RUNLOOP_*` variables: clap would otherwise take `DEVSYNC_TLS_CA=` for `--tls-ca` given
/// without a value and refuse to run.
fn parse() -> Result<Cli, clap::Error> {
    fn without_empty_env(cmd: clap::Command) -> clap::Command {
        cmd.mut_args(|a| {
            let empty = a
                .get_env()
                .and_then(std::env::var_os)
                .is_some_and(|v| v.is_empty());
            if empty {
                a.env(None::<&'static str>)
            } else {
                a
            }
        })
        .mut_subcommands(without_empty_env)
    }
    let matches = without_empty_env(Cli::command()).try_get_matches()?;
    Cli::from_arg_matches(&matches)
}

/// A multi-threaded runtime sized for this machine.
pub(crate) fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

/// Our stdin, read on a thread of its own (a blocking read must not hold up the runtime's
/// shutdown): chunks as they come, whatever their size; the channel closes at EOF.
pub(crate) fn stdin_chunks() -> tokio::sync::mpsc::Receiver<Vec<u8>> {
    use std::io::Read;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    let chunk = buf.get(..n).unwrap_or_default().to_vec();
                    if tx.blocking_send(chunk).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            }
        }
    });
    rx
}

/// Raises the soft open-files limit to the hard limit (deep trees keep directories open).
pub(crate) fn raise_fd_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current < lim.maximum {
        lim.current = lim.maximum;
        let _ = setrlimit(Resource::Nofile, lim); // best effort: the default still works
    }
}
