#!/usr/bin/env python3
"""devsync push against rsync over a rate-limited link: where compression and round trips
matter, as they do between a laptop and a hosted devbox.

Everything runs inside a network namespace of its own (`devsync-shaped`): sshd, the stunnel
TLS terminator, both `devsync serve` gateways and their key APIs all listen on its
127.0.0.1. Its loopback is shaped with `tc` to each rate in RATES, but only the hop a laptop
would cross: traffic to and from the ports clients connect to (stunnel, the gateways, the
APIs) goes through a `tbf` per direction (a full-duplex link; htb sorts the packets); the
gateways' own hop to sshd stays at loopback speed, as it is inside the datacenter. Shaping
all of loopback would make the OpenSSH paths (client -> gateway -> sshd) cross the slow link
twice. Both rates are measured in the namespace (one TCP stream of 20 MB) and printed before
the cases. No delay is added: this is bandwidth, not latency. devsync runs from a copy of
the binary taken at the start, so a cargo build meanwhile changes nothing.

Data: a source tree of >= 110 MB of real crate sources (sorted crate directories of
~/.cargo/registry/src, copied once into $BENCH_DIR/shaped-src), which gzip -6 packs ~4-6x.
Cases, tools alternating round by round:

  initial    push into an empty remote directory (a fresh one each round)
  edit       one line appended to 20 files (a different deterministic 20 each round), onto an
             up-to-date copy
  no change  the same push again

Tools: `devsync push` to OpenSSH through `devsync serve --upstream` (how hosted devboxes are
reached), `devsync push` to `devsync serve`'s own SSH server, and `rsync -az` / `rsync -a`
with `-e "ssh -F ssh_config"` to `benchbox:`, whose ProxyCommand is `openssl s_client` to
stunnel in front of the same sshd (how the official devbox CLI runs rsync). All log in as a
user whose ~/.bashrc does a pyenv/nvm-style init. devsync runs with --no-gitignore: the
crate sources carry .gitignore files, and every tool must copy the same tree. Each
destination is compared with the source (type, mode, size, mtime, content) after the last
round of each case. Wire bytes are what each tool reports it sent (devsync --json
bytes_sent; rsync --stats "Total bytes sent"); compression is devsync's compression_ratio
and, for rsync -az, literal data / bytes sent (~: its file list is not compressed).

Usage: benches/compare.sh shaped   (or python3 benches/shaped.py; needs root, openssh-server,
       stunnel4, rsync, iproute2)
  RATES="20mbit 100mbit"  tc rates, one run each;  ROUNDS=3;  BENCH_DIR=/tmp/devsync-bench
  TOOLS="OpenSSH,rsync -a"  only these tools (substrings of their names; rsync -az always)
  CRATES_SRC=~/.cargo/registry/src  where the source tree is taken from.
  REMOTE_FS=ext4  the remote copies go to a fresh loop-mounted ext4 image per rate (the
                  receiving side starts as a devbox's disk does); root: the root filesystem.
  Each run's stderr goes to $BENCH_DIR/shaped-RATE.log (with DEVSYNC_TRACE=1: devsync's
  timed milestones), the numbers to $BENCH_DIR/shaped-RATE.json.
"""
import glob, hashlib, json, os, random, re, shutil, socket, statistics, subprocess, sys
import threading, time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True  # no benches/__pycache__ in the working tree
import watch  # noqa: E402  (its Env: sshd, the bench user, two devsync gateways)

DEVSYNC = watch.DEVSYNC
DATA = os.environ.get('BENCH_DIR', '/tmp/devsync-bench')
watch.DATA = DATA
ROUNDS = int(os.environ.get('ROUNDS', '3'))
RATES = os.environ.get('RATES', '20mbit 100mbit').split()
CRATES = os.environ.get('CRATES_SRC', os.path.expanduser('~/.cargo/registry/src'))
NS = 'devsync-shaped'
SRC = f'{DATA}/shaped-src'
TRASH = f'{DATA}/shaped-trash'
TREE_BYTES = 110 << 20
REMOTE_FS = os.environ.get('REMOTE_FS', 'ext4')
PROBE = 28999  # the port the link rate is measured on
# What a client connects to: stunnel, the two devsync gateways, their key APIs (watch.Env).
CLIENT_PORTS = (22443, 28543, 28544, 28180, 28181, PROBE)
EDITS = 20
RUN_TIMEOUT = 3600  # seconds; a hung run fails the bench instead of stalling it


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=isinstance(cmd, str), check=True, capture_output=True,
                          text=True, **kw)


_trash_n = [0]


def rm(p):
    """Out of the way by rename (ext4 crawls after mass deletes), emptied at the very end.
    One trash per filesystem: the data, the env and the bench user's home share the root
    disk; the remote copies have a filesystem of their own (see RemoteFs)."""
    if os.path.lexists(p):
        trash = TRASH
        if REMOTE_FS != 'root' and os.path.abspath(p).startswith(remote_dir() + '/'):
            trash = f'{remote_dir()}/.trash'
        os.makedirs(trash, exist_ok=True)
        _trash_n[0] += 1
        os.rename(p, f'{trash}/{os.getpid()}-{_trash_n[0]}')


def remote_dir():
    """Where the remote copies go: the bench user's (as watch.Env sets it up), with the
    serve tool's beside them (see inner)."""
    home = os.path.expanduser('~' + watch.USER)
    if not os.path.isabs(home):
        raise SystemExit(f'no home directory for {watch.USER} (is the user there?)')
    return f'{home}/remote'


class RemoteFs:
    """A fresh ext4 filesystem for the remote copies, one per rate (REMOTE_FS=ext4, the
    default): the receiving side of every tool starts where a devbox's disk is, not on a root
    filesystem that earlier runs filled and emptied (after a mass delete, ext4's inode
    allocation crawls through recently freed inodes: one run's rsync -az took 2.1 s, a
    later run's 3.3 to 5.9 s on the same link). Inode tables and journal are written at mkfs
    time, not by a background thread during the run."""

    def __init__(self):
        watch.ensure_user()  # before its home is looked up and mounted over
        self.mnt = remote_dir()
        self.loop = None
        watch.unmount(self.mnt)
        rm(self.mnt)
        if REMOTE_FS == 'root':
            return
        if REMOTE_FS != 'ext4':
            raise SystemExit(f'REMOTE_FS={REMOTE_FS}: use ext4 (a fresh image) or root')
        # Sparse: only what is written takes space. Room for every round's copies of every
        # tool (they go to the image's own trash, emptied with the image): 5 rounds of 6
        # tools are ~3.5 GB and ~400k inodes.
        self.loop = watch.LoopFs(
            f'{DATA}/shaped-remote.img', self.mnt,
            ['mkfs.ext4', '-q', '-F', '-E', 'lazy_itable_init=0,lazy_journal_init=0'], 16 << 30)
        sh(['chown', f'{watch.USER}:{watch.USER}', self.mnt])

    def close(self):
        if self.loop is not None:
            self.loop.close()
            self.loop = None


# ---- data -------------------------------------------------------------------------------

def build_source():
    """The source tree, built once; returns its stats (files, bytes, gzip -6 ratio)."""
    done = f'{SRC}.json'  # beside the tree, not in it: it must not be synced
    if os.path.exists(done):
        return json.load(open(done))
    print(f'building {SRC} from {CRATES}...', flush=True)
    rm(SRC)
    os.makedirs(SRC)
    crates = sorted(glob.glob(f'{CRATES}/*/*/'), key=lambda d: os.path.basename(d.rstrip('/')))
    total = 0
    for d in crates:
        if total >= TREE_BYTES:
            break
        name = os.path.basename(d.rstrip('/'))
        if os.path.exists(f'{SRC}/{name}'):
            continue  # the same crate from a second registry
        sh(['cp', '-a', d.rstrip('/'), f'{SRC}/{name}'])
        total += sum(os.lstat(os.path.join(r, f)).st_size
                     for r, _, fs in os.walk(f'{SRC}/{name}') for f in fs)
    if total < TREE_BYTES:
        raise SystemExit(f'only {total >> 20} MiB of sources in {CRATES}; need {TREE_BYTES >> 20}')
    files = sum(len(fs) for _, _, fs in os.walk(SRC))
    tar = int(sh(f'tar -C {SRC} -cf - . | wc -c').stdout)
    gz = int(sh(f'tar -C {SRC} -cf - . | gzip -6 | wc -c').stdout)
    stats = dict(files=files, bytes=total, crates=len(os.listdir(SRC)), tar=tar, gzip6=gz,
                 ratio=tar / gz)
    json.dump(stats, open(done, 'w'))
    return stats


def manifest(root):
    """relpath -> (kind, mode, size, mtime_ns, sha1) for everything under root."""
    out = {}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(d, n)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = ('l', os.readlink(p))
            elif os.path.isdir(p):
                out[rel] = ('d', st.st_mode & 0o7777)
            else:
                with open(p, 'rb') as f:
                    h = hashlib.file_digest(f, 'sha1').hexdigest()
                out[rel] = ('f', st.st_mode & 0o7777, st.st_size, st.st_mtime_ns, h)
    return out


def check_same(src_manifest, dest, what):
    got = manifest(dest)
    bad = sorted(set(src_manifest) ^ set(got))
    bad += sorted(k for k in set(src_manifest) & set(got) if src_manifest[k] != got[k])
    if bad:
        for k in bad[:5]:
            print(f'  {k}: source {src_manifest.get(k)} != {what} {got.get(k)}', flush=True)
        raise SystemExit(f'{what}: {dest} differs from the source in {len(bad)} entries')


def edit(src, files, k):
    """Appends a line to a deterministic 20 of `files` (a different 20 each round k)."""
    for rel in random.Random(k).sample(files, EDITS):
        with open(f'{src}/{rel}', 'a') as f:
            f.write(f'// shaped bench edit {k}\n')


# ---- link -------------------------------------------------------------------------------

def shape(rate):
    """Client-facing ports through a tbf per direction; everything else unshaped.
    (htb only sorts packets into the two tbfs: its classes are far faster than any rate
    here, and what no filter claims goes straight out. This kernel has no prio qdisc.)"""
    tc = ['tc', '-n', NS]
    sh(tc + ['qdisc', 'replace', 'dev', 'lo', 'root', 'handle', '1:', 'htb', 'default', '0'])
    for band in (1, 2):  # 1: to the servers, 2: back to the clients
        sh(tc + ['class', 'add', 'dev', 'lo', 'parent', '1:', 'classid', f'1:{band}', 'htb',
                 'rate', '10gbit', 'burst', '1mb', 'cburst', '1mb', 'quantum', '200000'])
        sh(tc + ['qdisc', 'add', 'dev', 'lo', 'parent', f'1:{band}', 'handle', f'{band}0:',
                 'tbf', 'rate', rate, 'burst', '32kb', 'latency', '400ms'])
    for port in CLIENT_PORTS:
        for direction, band in (('dport', 1), ('sport', 2)):
            sh(tc + ['filter', 'add', 'dev', 'lo', 'parent', '1:', 'protocol', 'ip', 'prio', '1',
                     'u32', 'match', 'ip', direction, str(port), '0xffff', 'flowid', f'1:{band}'])


def link_rate(port=0, nbytes=20 << 20):
    """Mbit/s of payload one TCP stream gets over this namespace's loopback to `port`."""
    srv = socket.socket()
    srv.bind(('127.0.0.1', port))
    srv.listen(1)
    done = [0, 0.0]

    def receive():
        c, _ = srv.accept()
        while b := c.recv(1 << 20):
            done[0] += len(b)
        done[1] = time.perf_counter()
        c.close()

    th = threading.Thread(target=receive)
    th.start()
    c = socket.create_connection(srv.getsockname())
    buf = bytes(1 << 20)
    t = time.perf_counter()
    for _ in range(nbytes >> 20):
        c.sendall(buf)
    c.shutdown(socket.SHUT_WR)
    th.join()
    c.close()
    srv.close()
    return done[0] * 8 / (done[1] - t) / 1e6


# ---- tools ------------------------------------------------------------------------------

def devsync_stats(out):
    j = json.loads(out)
    return dict(sent=j['bytes_sent'], sent_raw=j['bytes_sent_uncompressed'],
                compression=j['compression_ratio'])


def rsync_stats(out):
    def field(name):
        m = re.search(rf'^{name}: ([\d,]+)', out, re.M)
        return int(m.group(1).replace(',', '')) if m else None
    return dict(sent=field('Total bytes sent'), literal=field('Literal data'))


def tools(env, ssh_config):
    """(name, cmd(sub), local path of the destination, environment, stats parser)."""
    home = env.remote['openssh']
    rsync_e = ['-e', f'ssh -F {ssh_config}']
    push = [DEVSYNC, 'push', '--json', '--no-gitignore']
    # Cold: every push makes its own connection; kept: the connection a previous push left
    # (--keep-connection, the default) is reused.
    cold = lambda e: dict(e, DEVSYNC_KEEP_CONNECTION='0')
    kept = lambda e: dict(e, DEVSYNC_KEEP_CONNECTION='600')
    every = [
        ('devsync (OpenSSH)', lambda src, sub: push + [src, env.target('openssh', sub)],
         lambda sub: f'{home}/{sub}', cold(env.env['openssh']), devsync_stats),
        ('devsync (OpenSSH, kept)', lambda src, sub: push + [src, env.target('openssh', sub + '-k')],
         lambda sub: f'{home}/{sub}-k', kept(env.env['openssh']), devsync_stats),
        ('devsync (serve)', lambda src, sub: push + [src, env.target('serve', sub)],
         lambda sub: f'{env.remote["serve"]}/{sub}', cold(env.env['serve']), devsync_stats),
        ('rsync -az', lambda src, sub: ['rsync', '-az', '--stats'] + rsync_e
         + [f'{src}/', f'benchbox:{home}/{sub}/'],
         lambda sub: f'{home}/{sub}', None, rsync_stats),
        ('rsync -a', lambda src, sub: ['rsync', '-a', '--stats'] + rsync_e
         + [f'{src}/', f'benchbox:{home}/{sub}/'],
         lambda sub: f'{home}/{sub}', None, rsync_stats),
    ]
    # TOOLS="OpenSSH,rsync -az": only the tools whose names contain one of these (rsync -az,
    # the reference, always runs).
    want = [t.strip() for t in os.environ.get('TOOLS', '').split(',') if t.strip()]
    return [j for j in every if not want or j[0] == 'rsync -az' or any(w in j[0] for w in want)]


def run(cmd, e, log):
    """Seconds and stdout of one run; its stderr goes to `log` (DEVSYNC_TRACE=1 fills it)."""
    sh('sync')
    t = time.perf_counter()
    p = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    dt = time.perf_counter() - t
    log.write(f'=== {dt:.2f} s: {" ".join(cmd)}\n{p.stderr}')
    if 'installing the devsync helper' in p.stderr:
        print(f'  (this run uploaded the helper: {" ".join(cmd)})', flush=True)
    if p.returncode != 0:
        raise SystemExit(f'{" ".join(cmd)} failed ({p.returncode}):\n{p.stderr[-2000:]}')
    return dt, p.stdout


# ---- one rate, inside the namespace -----------------------------------------------------

def inner(rate):
    mbit = link_rate(PROBE)
    fast = link_rate()
    print(f'[{rate}] link rate measured in {NS}: {mbit:.1f} Mbit/s on the shaped ports, '
          f'{fast:.0f} Mbit/s unshaped (gateway -> sshd); one TCP stream, 20 MB', flush=True)
    env = watch.Env()
    if REMOTE_FS != 'root':
        # devsync serve's copies go to the fresh filesystem too (it runs as root).
        env.remote['serve'] = f'{remote_dir()}/via-serve'
        os.makedirs(env.remote['serve'], exist_ok=True)
    log = open(f'{DATA}/shaped-{rate}.log', 'w')
    try:
        ssh_config = env.official_cli()
        src = f'{DATA}/shaped-work'  # the edits go to a copy; shaped-src stays as built
        rm(src)
        sh(['cp', '-a', SRC, src])
        files = sorted(os.path.relpath(os.path.join(d, f), src)
                       for d, _, fs in os.walk(src) for f in fs)
        jobs = tools(env, ssh_config)
        slug = {j[0]: re.sub(r'[^a-z]+', '-', j[0].lower()).strip('-') for j in jobs}
        # First contact (helper upload, host keys) is not what is measured.
        warm = f'{DATA}/shaped-warm'
        os.makedirs(warm, exist_ok=True)
        open(f'{warm}/warm', 'w').write('x')
        for tool, cmd, _dest, e, _parse in jobs:
            run(cmd(warm, f'warm-{slug[tool]}'), e, log)
        rows = []
        for case in ('initial', 'edit', 'no change'):
            times = [[] for _ in jobs]
            stats = [None] * len(jobs)
            for k in range(ROUNDS):
                if case == 'edit':
                    edit(src, files, k)
                for i, (tool, cmd, dest, e, parse) in enumerate(jobs):
                    if case == 'initial':
                        rm(dest(slug[tool]))
                    # devsync starts compressing at the level the last big push to the same
                    # host settled at (none in round 1 of the initial push: a fresh home).
                    links = e and os.path.isdir(f'{e["HOME"]}/.local/state/devsync/links')
                    dt, out = run(cmd(src, slug[tool]), e, log)
                    times[i].append(dt)
                    stats[i] = parse(out)
                    print(f'[{rate}] {case:9} round {k + 1}/{ROUNDS} {tool:18} {dt:7.2f} s  '
                          f'{stats[i]}{"  (link remembered)" if links else ""}', flush=True)
            want = manifest(src)
            for tool, _cmd, dest, _e, _parse in jobs:
                check_same(want, dest(slug[tool]), f'{tool} after {case}')
            ref = statistics.median(times[[j[0] for j in jobs].index('rsync -az')])
            for (tool, *_), ts, st in zip(jobs, times, stats):
                m = statistics.median(ts)
                if 'compression' in st:
                    c = st['compression']
                    comp = f'{c:.2f}x' if c else 'none'
                elif tool == 'rsync -az' and st['literal'] and st['literal'] >= 1 << 20:
                    comp = f'~{st["literal"] / st["sent"]:.2f}x'
                else:
                    comp = '–'
                rows.append(dict(rate=rate, case=case, tool=tool, median=m, min=min(ts),
                                 max=max(ts), vs=m / ref, wire=st['sent'], comp=comp, stats=st))
        result = dict(rate=rate, measured_mbit=mbit, unshaped_mbit=fast, rounds=ROUNDS,
                      rows=rows)
        json.dump(result, open(f'{DATA}/shaped-{rate}.json', 'w'), indent=1)
        print_table(result)
    finally:
        env.close()
        log.close()


def print_table(r):
    print(f'\nrate {r["rate"]}: link measured at {r["measured_mbit"]:.1f} Mbit/s '
          f'(unshaped hop {r["unshaped_mbit"]:.0f} Mbit/s); '
          f'{r["rounds"]} rounds', flush=True)
    print('| rate | case | tool | median s | min–max | vs rsync -az | wire MB | compression |')
    print('|---|---|---|---|---|---|---|---|')
    for x in r['rows']:
        print(f'| {x["rate"]} | {x["case"]} | {x["tool"]} | {x["median"]:.2f} | '
              f'{x["min"]:.2f}–{x["max"]:.2f} | {x["vs"]:.2f}x | {x["wire"] / 1e6:.2f} | '
              f'{x["comp"]} |', flush=True)


# ---- the driver: one namespace per rate -------------------------------------------------

def leftovers():
    p = subprocess.run(['ip', 'netns', 'pids', NS], capture_output=True, text=True)
    return [int(x) for x in p.stdout.split()]


def main():
    if len(sys.argv) == 3 and sys.argv[1] == '--inner':
        return inner(sys.argv[2])
    if os.geteuid() != 0:
        raise SystemExit('needs root (a network namespace, sshd, a bench user)')
    os.makedirs(DATA, exist_ok=True)
    # A snapshot of the binary: a cargo build during the run would otherwise swap it between
    # runs (and every new build is a new helper to upload, inside a timed push).
    snap = f'{DATA}/shaped-devsync'
    shutil.copy2(DEVSYNC, snap)
    os.environ['DEVSYNC'] = snap
    with open(snap, 'rb') as f:
        digest = hashlib.file_digest(f, 'sha256').hexdigest()[:12]
    print(f'devsync: {DEVSYNC} (built {time.ctime(os.stat(DEVSYNC).st_mtime)}, sha256 '
          f'{digest}), run as {snap}', flush=True)
    st = build_source()
    print(f'source tree {SRC}: {st["files"]} files in {st["crates"]} crates, '
          f'{st["bytes"] / 1e6:.1f} MB; tar {st["tar"] / 1e6:.1f} MB, gzip -6 '
          f'{st["gzip6"] / 1e6:.1f} MB: {st["ratio"]:.2f}x', flush=True)
    results = []
    try:
        for rate in RATES:
            # What an earlier rate's run left behind goes to the trash, not through rmtree.
            rm(f'{DATA}/env')
            fs = RemoteFs()
            try:
                sh(['ip', 'netns', 'add', NS])
                sh(['ip', '-n', NS, 'link', 'set', 'lo', 'mtu', '1500', 'up'])
                shape(rate)
                subprocess.run(['ip', 'netns', 'exec', NS, sys.executable,
                                os.path.abspath(__file__), '--inner', rate], check=True)
                results.append(json.load(open(f'{DATA}/shaped-{rate}.json')))
            finally:
                # Anything still in the namespace was started by this run (the inner run
                # stops its servers by pid; this catches what outlived it).
                for pid in leftovers():
                    print(f'stopping leftover pid {pid} in {NS}', flush=True)
                    try:
                        os.kill(pid, 15)
                    except ProcessLookupError:
                        pass
                subprocess.run(['ip', 'netns', 'del', NS], check=False)
                fs.close()
    finally:
        # The copies go; env/ stays for its logs.
        watch.unmount(remote_dir())
        for p in (f'{DATA}/env/remote-serve', remote_dir(), f'{DATA}/shaped-work'):
            rm(p)
        shutil.rmtree(TRASH, ignore_errors=True)
    print(f'\nsource: {st["files"]} files, {st["bytes"] / 1e6:.1f} MB, gzip -6 {st["ratio"]:.2f}x')
    for r in results:
        print_table(r)


if __name__ == '__main__':
    main()
