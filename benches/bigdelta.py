#!/usr/bin/env python3
"""1 GiB three-edit delta through the OpenSSH path (`benches/compare.sh bigremote`).

A 1 GiB random file with three 4 KiB edits is pushed onto its old copy on a "devbox" that is
real OpenSSH (sshd behind `devsync serve --upstream`, a bench user with a pyenv-style
.bashrc: benches/watch.py's Env), against rsync over ssh -> openssl s_client -> stunnel ->
the same sshd, as the official devbox CLI runs it. All tools alternate round by round, the
old copy restored (and its mtime set older) and the edited file's ctime refreshed before
every run; medians and min–max.

Env: ROUNDS=5, BENCH_DIR (where big.orig / big.edit are; benches/compare.sh makes them).
"""
import os, shutil, statistics, subprocess, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import watch  # noqa: E402

DATA = os.environ.get('BENCH_DIR', '/tmp/devsync-bench')
ROUNDS = int(os.environ.get('ROUNDS', '5'))
DEVSYNC = watch.DEVSYNC


def main():
    big, edit = f'{DATA}/big.orig', f'{DATA}/big.edit'
    if not (os.path.exists(big) and os.path.exists(edit)):
        raise SystemExit(f'{big} / {edit} missing: run benches/compare.sh big first')
    watch.DATA = f'{DATA}/bigdelta-env'
    env = watch.Env()
    try:
        cfg = env.official_cli()
        src = f'{DATA}/bigdelta-src'
        shutil.rmtree(src, ignore_errors=True)
        os.makedirs(src)
        shutil.copy2(edit, f'{src}/big.bin')
        remote = env.remote['openssh']
        ds_env = dict(env.env['openssh'], DEVSYNC_KEEP_CONNECTION='0')
        rsh = f'ssh -F {cfg}'

        def restore(d):
            def f():
                shutil.rmtree(d, ignore_errors=True)
                os.makedirs(d)
                subprocess.run(['cp', big, f'{d}/big.bin'], check=True)
                st = os.stat(f'{src}/big.bin')
                os.utime(f'{d}/big.bin', ns=(st.st_atime_ns, st.st_mtime_ns - 10**9))
                subprocess.run(['chown', '-R', f'{watch.USER}:{watch.USER}', d], check=True)
            return f

        jobs = [
            ('devsync push', [DEVSYNC, 'push', '--json', src, f'dbx_openssh:{remote}/ds'], f'{remote}/ds', ds_env),
            ('devsync push --inplace', [DEVSYNC, 'push', '--json', '--inplace', src,
                                        f'dbx_openssh:{remote}/dsi'], f'{remote}/dsi', ds_env),
            ('rsync -a --no-whole-file', ['rsync', '-a', '--no-whole-file', '-e', rsh, src + '/',
                                          f'benchbox:{remote}/rs/'], f'{remote}/rs', None),
            ('rsync -a --inplace', ['rsync', '-a', '--inplace', '-e', rsh, src + '/',
                                    f'benchbox:{remote}/rsi/'], f'{remote}/rsi', None),
        ]
        times = {name: [] for name, *_ in jobs}
        for r in range(ROUNDS):
            for name, cmd, d, e in jobs:
                restore(d)()
                # The edit is new to this push, as an edit since the last push would be (the
                # old copy was put back, not pushed): devsync hashes big files changed since
                # its last push of the same trees before the receiver asks. Same as reflink.py.
                st = os.stat(f'{src}/big.bin')
                os.utime(f'{src}/big.bin', ns=(st.st_atime_ns, st.st_mtime_ns))
                subprocess.run(['sync'])
                t = time.perf_counter()
                subprocess.run(cmd, check=True, capture_output=True, env=e)
                times[name].append(time.perf_counter() - t)
                if open(f'{d}/big.bin', 'rb').read() != open(f'{src}/big.bin', 'rb').read():
                    raise SystemExit(f'{name}: wrong result')
            print(f'round {r + 1}: ' + ', '.join(f'{n} {t[-1]:.2f}s' for n, t in times.items()),
                  flush=True)
        ref = statistics.median(times['rsync -a --no-whole-file'])
        print('\n| tool | median | min–max | vs rsync --no-whole-file |\n|---|---|---|---|')
        for name, ts in times.items():
            m = statistics.median(ts)
            print(f'| {name} | {m:.3f} s | {min(ts):.2f}–{max(ts):.2f} s | {m / ref:.2f}× |')
    finally:
        env.close()
        shutil.rmtree(f'{DATA}/bigdelta-src', ignore_errors=True)


if __name__ == '__main__':
    main()
