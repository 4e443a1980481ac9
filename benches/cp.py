#!/usr/bin/env python3
"""`devsync cp` against `scp` the way the official devbox CLI runs it: through an
`openssl s_client` ProxyCommand to a TLS terminator (stunnel) in front of OpenSSH, logging in
as a user whose ~/.bashrc does a pyenv/nvm-style init. devsync goes to the same sshd through
`devsync serve --upstream` (TLS gateway + SNI, as hosted devboxes are reached), and for
reference to `devsync serve`'s own SSH server. Loopback; tools alternate round by round.

Cases: a 1 GiB random file up and down (fresh destination each round), and the same file
with three 4 KiB edits onto an existing copy (devsync sends a delta; scp sends everything).

Usage: benches/compare.sh cp   (BENCH_DIR, default /tmp/devsync-bench; ROUNDS=5)
"""
import os, shutil, statistics, subprocess, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import watch  # noqa: E402  (its Env: sshd, the bench user, two devsync gateways)

DEVSYNC = watch.DEVSYNC
DATA = os.environ.get('BENCH_DIR', '/tmp/devsync-bench')
ROUNDS = int(os.environ.get('ROUNDS', '5'))
watch.DATA = DATA


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=isinstance(cmd, str), check=True, capture_output=True,
                          text=True, **kw)


_trash = [0]


def rm(p):
    """Out of the way by rename (ext4 crawls after mass deletes), emptied at the end."""
    if os.path.lexists(p):
        t = os.path.join(os.path.dirname(p), '.trash')
        os.makedirs(t, exist_ok=True)
        _trash[0] += 1
        os.rename(p, f'{t}/{_trash[0]}')


def main():
    big, big_edit = f'{DATA}/big.orig', f'{DATA}/big.edit'
    here = os.path.dirname(os.path.abspath(__file__))
    os.makedirs(DATA, exist_ok=True)
    if not os.path.exists(big_edit):
        print('generating 1 GiB file and an edited copy...', flush=True)
        sh([sys.executable, f'{here}/gen_tree.py', 'big', big, big_edit])
    env = watch.Env()
    try:
        # The official CLI's path: ssh/scp -> openssl s_client -> TLS (stunnel) -> sshd.
        ssh_config = env.official_cli()
        scp = ['scp', '-q', '-F', ssh_config]
        remote = env.remote['openssh']  # owned by the bench user: scp and devsync write here
        local = f'{DATA}/cp-local'
        shutil.rmtree(local, ignore_errors=True)
        os.makedirs(local)
        # First contact installs the helper; not what is measured.
        open(f'{local}/warm', 'w').write('x')
        for name in ('openssh', 'serve'):
            subprocess.run([DEVSYNC, 'cp', '-q', f'{local}/warm', env.target(name, '')],
                           env=env.env[name], check=True)
        serve_remote = env.remote['serve']

        def chown(p):
            sh(['chown', f'{watch.USER}:{watch.USER}', p])

        def restore(path, owner=False):
            """An older copy of the unedited file at `path` (what a re-copy finds)."""
            def f():
                rm(path)
                sh(['cp', big, path])
                st = os.stat(big_edit)
                os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - 10**9))
                if owner:
                    chown(path)
            return f

        def fresh(path):
            return lambda: rm(path)

        cases = {
            'upload 1 GiB': [
                ('scp via openssl s_client', scp + [big, f'benchbox:{remote}/scp.bin'], fresh(f'{remote}/scp.bin'), None),
                ('devsync cp (OpenSSH)', [DEVSYNC, 'cp', '-q', big, env.target('openssh', 'ds.bin')], fresh(f'{remote}/ds.bin'), env.env['openssh']),
                ('devsync cp (serve)', [DEVSYNC, 'cp', '-q', big, env.target('serve', 'ds.bin')], fresh(f'{serve_remote}/ds.bin'), env.env['serve']),
            ],
            'download 1 GiB': [
                ('scp via openssl s_client', scp + [f'benchbox:{remote}/scp.bin', f'{local}/scp.bin'], fresh(f'{local}/scp.bin'), None),
                ('devsync cp (OpenSSH)', [DEVSYNC, 'cp', '-q', env.target('openssh', 'ds.bin'), f'{local}/ds.bin'], fresh(f'{local}/ds.bin'), env.env['openssh']),
                ('devsync cp (serve)', [DEVSYNC, 'cp', '-q', env.target('serve', 'ds.bin'), f'{local}/ds2.bin'], fresh(f'{local}/ds2.bin'), env.env['serve']),
            ],
            'upload 1 GiB, 3 edits': [
                ('scp via openssl s_client', scp + [big_edit, f'benchbox:{remote}/scp.bin'], restore(f'{remote}/scp.bin', True), None),
                ('devsync cp (OpenSSH)', [DEVSYNC, 'cp', '--json', big_edit, env.target('openssh', 'ds.bin')], restore(f'{remote}/ds.bin', True), env.env['openssh']),
                ('devsync cp (serve)', [DEVSYNC, 'cp', '--json', big_edit, env.target('serve', 'ds.bin')], restore(f'{serve_remote}/ds.bin'), env.env['serve']),
            ],
            'download 1 GiB, 3 edits': [
                ('scp via openssl s_client', scp + [f'benchbox:{remote}/edit.bin', f'{local}/scp.bin'], restore(f'{local}/scp.bin'), None),
                ('devsync cp (OpenSSH)', [DEVSYNC, 'cp', '--json', env.target('openssh', 'edit.bin'), f'{local}/ds.bin'], restore(f'{local}/ds.bin'), env.env['openssh']),
                ('devsync cp (serve)', [DEVSYNC, 'cp', '--json', env.target('serve', 'edit.bin'), f'{local}/ds2.bin'], restore(f'{local}/ds2.bin'), env.env['serve']),
            ],
        }
        # The edited file on both remotes, for the downloads of edits.
        for d, own in ((remote, True), (serve_remote, False)):
            shutil.copy2(big_edit, f'{d}/edit.bin')
            if own:
                chown(f'{d}/edit.bin')
        # The upload cases leave files the download cases read.
        shutil.copy2(big, f'{remote}/scp.bin'); chown(f'{remote}/scp.bin')
        shutil.copy2(big, f'{remote}/ds.bin'); chown(f'{remote}/ds.bin')
        shutil.copy2(big, f'{serve_remote}/ds.bin')
        results = []
        for case, jobs in cases.items():
            times = [[] for _ in jobs]
            wire = [None] * len(jobs)
            for _ in range(ROUNDS):
                for i, (tool, cmd, prep, e) in enumerate(jobs):
                    prep()
                    sh('sync')
                    t = time.perf_counter()
                    out = subprocess.run(cmd, env=e, check=True, capture_output=True, text=True).stdout
                    times[i].append(time.perf_counter() - t)
                    if out.strip().startswith('{'):
                        import json
                        j = json.loads(out)
                        wire[i] = j['bytes_sent'] + j['bytes_received']
            ref = statistics.median(times[0])
            for i, (tool, *_rest) in enumerate(jobs):
                m = statistics.median(times[i])
                line = (case, tool, f'{m:.2f} s', f'{min(times[i]):.2f}–{max(times[i]):.2f}',
                        f'{m / ref:.2f}x', '' if wire[i] is None else f'{wire[i] / 1024:.0f} KiB')
                results.append(line)
                print('  '.join(line), flush=True)
            # Every copy is the file it should be.
        for a, b in ((big_edit, f'{remote}/ds.bin'), (big_edit, f'{local}/ds.bin'), (big_edit, f'{remote}/scp.bin')):
            if sh(['cmp', a, b]).returncode != 0:
                raise SystemExit(f'{b} differs from {a}')
        print(f'\n| case | tool | median | min–max | vs scp | wire |  (rounds: {ROUNDS})')
        print('|---|---|---|---|---|---|')
        for r in results:
            print('| ' + ' | '.join(r) + ' |')
    finally:
        env.close()
        for d in (env.remote['openssh'], env.remote['serve'], f'{DATA}/cp-local'):
            shutil.rmtree(os.path.join(d, '.trash'), ignore_errors=True)


if __name__ == '__main__':
    main()
