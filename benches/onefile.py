#!/usr/bin/env python3
"""No-change push of a one-file tree, cold (`--keep-connection 0`) against kept (the default),
to real OpenSSH behind the TLS gateway and to `devsync serve` (benches/watch.py's Env).

The bench user's ~/.bashrc is the pyenv-style init of watch.py, or with SLEEP=0.2 a
`sleep 0.2` (a slow-starting login shell). RUNS=9 rounds, cold and kept alternating.
With TREE=dir, that tree is pushed instead of one file, and a local no-change push of it
(into a local copy) runs in the same rounds. With SSH=1, `devsync ssh -T HOST -- true` is timed
instead of a push (a command per agent step), cold against kept.
"""
import os, shutil, statistics, subprocess, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import watch  # noqa: E402

DATA = os.environ.get('BENCH_DIR', '/tmp/devsync-bench')
RUNS = int(os.environ.get('RUNS', '9'))
SLEEP = os.environ.get('SLEEP')
SSH = os.environ.get('SSH') == '1'


def main():
    watch.DATA = f'{DATA}/onefile-env'
    env = watch.Env()
    try:
        if SLEEP:
            open(f'{env.home}/.bashrc', 'w').write(f'sleep {SLEEP}\n')
        src = os.environ.get('TREE')
        local = f'{DATA}/onefile-local'
        if src:
            subprocess.run([watch.DEVSYNC, 'push', '-q', src, local], check=True)
        else:
            src = f'{DATA}/onefile-src'
            shutil.rmtree(src, ignore_errors=True)
            os.makedirs(src)
            open(f'{src}/f', 'w').write('hello\n')
        for name in ('openssh', 'serve'):
            target = env.target(name, 'one')
            e = env.env[name]
            if SSH:
                host = target.split(':')[0]
                run = lambda keep: subprocess.run(
                    [watch.DEVSYNC, 'ssh', '-T', '--keep-connection', keep, host, '--', 'true'],
                    check=True, capture_output=True, env=e)
            else:
                run = lambda keep: subprocess.run(
                    [watch.DEVSYNC, 'push', '-q', '--keep-connection', keep, src, target],
                    check=True, capture_output=True, env=e)
            run('0')
            run('300')  # leaves a keeper behind
            times = {'cold': [], 'kept': []} if SSH else {'cold': [], 'kept': [], 'local': []}
            for _ in range(RUNS):
                kinds = (('cold', '0'), ('kept', '300')) + ((('local', None),) if not SSH else ())
                for kind, keep in kinds:
                    t = time.perf_counter()
                    if keep:
                        run(keep)
                    else:
                        subprocess.run([watch.DEVSYNC, 'push', '-q', src, local], check=True)
                    times[kind].append(time.perf_counter() - t)
            for kind, ts in times.items():
                print(f'{name:8} {kind}: {statistics.median(ts) * 1000:6.1f} ms '
                      f'({min(ts) * 1000:.1f}–{max(ts) * 1000:.1f})', flush=True)
    finally:
        env.close()
        shutil.rmtree(f'{DATA}/onefile-local', ignore_errors=True)
        # The keepers exit once their connection is gone (the servers were just stopped).


if __name__ == '__main__':
    main()
