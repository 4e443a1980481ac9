#!/usr/bin/env python3
"""1 GiB three-edit delta onto loop-mounted XFS, btrfs and ext4 (`benches/compare.sh reflink`).

For each filesystem in FS (default "xfs btrfs ext4") an image is made and mounted
(`mkfs.xfs -m reflink=1`, `mkfs.btrfs`, `mkfs.ext4`; the loop device in direct-I/O mode so
the image's pages are not cached twice), and the edited 1 GiB file is pushed onto its old copy
there, locally and (PATHS="local openssh openssh-kept") through the OpenSSH path: sshd behind
`devsync serve --upstream`, a bench user with a pyenv-style .bashrc (benches/watch.py's Env),
rsync through ssh -> openssl s_client -> stunnel -> the same sshd, as the official CLI runs it.
`openssh` connects afresh for every devsync run (`DEVSYNC_KEEP_CONNECTION=0`); `openssh-kept`
leaves the default on, so every run after the first goes through the connection the previous
one kept (as a second push within minutes does).

Before every timed run the edited file's ctime is refreshed (as an edit would; contents and
mtime stay), so devsync sees it changed since its last push of these trees.

Two kinds of old copy, both restored before every timed run (untimed):
  devsync  the old copy is the file an earlier `devsync push` wrote (the usual case: you
           pushed the file once, edited it, push again);
  cp       the old copy was put there by `cp` (devsync has never seen it).
rsync gets a `cp` copy (it keeps no state; which writer made its old copy does not matter to
it). Tools alternate round by round; medians and min–max; every result is compared with the
source byte for byte.

Env: ROUNDS=5, FS, PATHS, IMG_GB=8, BENCH_DIR (big.orig / big.edit; compare.sh big makes them).
"""
import os, shutil, statistics, subprocess, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import watch  # noqa: E402

DATA = os.environ.get('BENCH_DIR', '/tmp/devsync-bench')
ROUNDS = int(os.environ.get('ROUNDS', '5'))
FS = os.environ.get('FS', 'xfs btrfs ext4').split()
PATHS = os.environ.get('PATHS', 'local openssh openssh-kept').split()
IMG_GB = int(os.environ.get('IMG_GB', '8'))
DEVSYNC = watch.DEVSYNC
MKFS = {'xfs': ['mkfs.xfs', '-q', '-f', '-m', 'reflink=1'], 'btrfs': ['mkfs.btrfs', '-q', '-f'],
        'ext4': ['mkfs.ext4', '-q', '-F']}


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def same(a, b):
    with open(a, 'rb') as fa, open(b, 'rb') as fb:
        while True:
            x, y = fa.read(16 << 20), fb.read(16 << 20)
            if x != y:
                return False
            if not x:
                return True


def Mount(fs):
    """A fresh `fs` image mounted at /mnt/devsync-bench-FS."""
    return watch.LoopFs(f'{DATA}/img-{fs}.img', f'/mnt/devsync-bench-{fs}', MKFS[fs],
                        IMG_GB << 30)


def bench(fs, path, env, cfg):
    """One filesystem, one path: returns {tool: [seconds]}."""
    big, edit = f'{DATA}/big.orig', f'{DATA}/big.edit'
    src = {'orig': f'{DATA}/reflink-src-orig', 'edit': f'{DATA}/reflink-src-edit'}
    for k, f in (('orig', big), ('edit', edit)):
        shutil.rmtree(src[k], ignore_errors=True)
        os.makedirs(src[k])
        shutil.copy2(f, f'{src[k]}/big.bin')
    st = os.stat(f'{src["edit"]}/big.bin')
    os.utime(f'{src["orig"]}/big.bin', ns=(st.st_atime_ns, st.st_mtime_ns - 10**9))
    root = f'/mnt/devsync-bench-{fs}/{path}'
    os.makedirs(root, exist_ok=True)
    if path.startswith('openssh'):
        sh(['chown', f'{watch.USER}:{watch.USER}', root])
        target = lambda d: [f'dbx_openssh:{d}']  # noqa: E731
        ds_env = dict(env.env['openssh'])
        if path == 'openssh':
            ds_env['DEVSYNC_KEEP_CONNECTION'] = '0'
        rsync_to = lambda d: ['-e', f'ssh -F {cfg}', src['edit'] + '/', f'benchbox:{d}/']  # noqa: E731
    else:
        target = lambda d: [d]  # noqa: E731
        ds_env = dict(os.environ)
        rsync_to = lambda d: [src['edit'] + '/', d + '/']  # noqa: E731

    def chown(d):
        if path.startswith('openssh'):
            sh(['chown', '-R', f'{watch.USER}:{watch.USER}', d])

    def by_cp(d):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        sh(['cp', f'{src["orig"]}/big.bin', f'{d}/big.bin'])
        s = os.stat(f'{src["orig"]}/big.bin')
        os.utime(f'{d}/big.bin', ns=(s.st_atime_ns, s.st_mtime_ns))
        chown(d)

    def by_devsync(d):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        chown(d)
        sh([DEVSYNC, 'push', src['orig']] + target(d), env=ds_env)

    jobs = [
        ('devsync push (old copy by devsync)', by_devsync, f'{root}/ds',
         [DEVSYNC, 'push', '--json', src['edit']] + target(f'{root}/ds')),
        ('devsync push (old copy by cp)', by_cp, f'{root}/dscp',
         [DEVSYNC, 'push', '--json', src['edit']] + target(f'{root}/dscp')),
        ('rsync -a --no-whole-file', by_cp, f'{root}/rs',
         ['rsync', '-a', '--no-whole-file'] + rsync_to(f'{root}/rs')),
    ]
    times = {name: [] for name, *_ in jobs}
    edited = f'{src["edit"]}/big.bin'
    for r in range(ROUNDS):
        for name, restore, d, cmd in jobs:
            restore(d)
            subprocess.run(['sync'])
            # As if just edited: its ctime moves past the last push of these trees, as an edit
            # since then would (contents and mtime stay). devsync hashes big files changed
            # since the last push ahead of the receiver's request; without this, every round
            # after the first would look like a push of a file that did not change since the
            # last one, onto a copy someone else reverted.
            s = os.stat(edited)
            os.utime(edited, ns=(s.st_atime_ns, s.st_mtime_ns))
            t = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True,
                           env=None if cmd[0] == 'rsync' else ds_env)
            times[name].append(time.perf_counter() - t)
            if not same(f'{d}/big.bin', f'{src["edit"]}/big.bin'):
                raise SystemExit(f'{fs} {path} {name}: wrong result')
        print(f'{fs} {path} round {r + 1}: '
              + ', '.join(f'{n} {t[-1]:.3f}s' for n, t in times.items()), flush=True)
    for _, _, d, _ in jobs:
        shutil.rmtree(d, ignore_errors=True)
    return times


def main():
    if not all(os.path.exists(f'{DATA}/big.{k}') for k in ('orig', 'edit')):
        raise SystemExit(f'{DATA}/big.orig / big.edit missing: run benches/compare.sh big first')
    env = cfg = None
    if any(p.startswith('openssh') for p in PATHS):
        watch.DATA = f'{DATA}/reflink-env'
        env = watch.Env()
        cfg = env.official_cli()
    rows = []
    try:
        for fs in FS:
            m = Mount(fs)
            try:
                for path in PATHS:
                    times = bench(fs, path, env, cfg)
                    ref = statistics.median(times['rsync -a --no-whole-file'])
                    for name, ts in times.items():
                        rows.append((fs, path, name, statistics.median(ts), min(ts), max(ts),
                                     statistics.median(ts) / ref))
            finally:
                m.close()
    finally:
        if env:
            env.close()
        for k in ('orig', 'edit'):
            shutil.rmtree(f'{DATA}/reflink-src-{k}', ignore_errors=True)
    print('\n| fs | path | tool | median | min–max | vs rsync --no-whole-file |')
    print('|---|---|---|---|---|---|')
    for fs, path, name, med, lo, hi, ratio in rows:
        print(f'| {fs} | {path} | {name} | {med:.3f} s | {lo:.2f}–{hi:.2f} s | {ratio:.2f}× |')


if __name__ == '__main__':
    main()
