#!/usr/bin/env python3
"""--compress=auto against --compress=off on unshaped loopback, where compression must
switch itself off: a cold push of TREE (default the compare.sh 40k-file tree) into an empty
directory, through `devsync serve` and through real OpenSSH behind the TLS gateway
(benches/watch.py's Env). The two modes alternate round by round; ROUNDS=7. Prints each
run, the medians, and the median of the per-round ratios auto/off (what to read: the
machine's drift between rounds is larger than the effect). With T=1 the first auto run's
DEVSYNC_TRACE output goes to $BENCH_DIR/loopauto-trace.txt (level changes: `[compress]`).
"""
import os, statistics, subprocess, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.dont_write_bytecode = True
import watch  # noqa: E402

DATA = os.environ.get('BENCH_DIR', '/tmp/devsync-bench')
TREE = os.environ.get('TREE', f'{DATA}/tree')
ROUNDS = int(os.environ.get('ROUNDS', '7'))
NAMES = os.environ.get('NAMES', 'serve openssh').split()


def main():
    watch.DATA = f'{DATA}/loopauto-env'
    os.makedirs(watch.DATA, exist_ok=True)
    env = watch.Env()
    try:
        times = {}
        for r in range(ROUNDS):
            for name in NAMES:
                for mode in ('auto', 'off'):
                    sub = f'loop-{mode}'
                    subprocess.run(['rm', '-rf', f'{env.remote[name]}/{sub}'], check=True)
                    subprocess.run(['sync'], check=True)
                    e = dict(env.env[name])
                    trace = os.environ.get('T') and mode == 'auto' and r == 0
                    if trace:
                        e['DEVSYNC_TRACE'] = '1'
                    t = time.perf_counter()
                    p = subprocess.run([watch.DEVSYNC, 'push', '--json', '--keep-connection', '0',
                                        '--compress', mode, TREE, env.target(name, sub)],
                                       capture_output=True, text=True, env=e)
                    dt = time.perf_counter() - t
                    assert p.returncode == 0, p.stderr[-2000:]
                    if trace:
                        open(f'{DATA}/loopauto-trace.txt', 'w').write(p.stderr)
                    times.setdefault((name, mode), []).append(dt)
                    print(f'round {r + 1} {name:8} {mode:5} {dt:.3f} s', flush=True)
        for (name, mode), v in times.items():
            print(f'{name:8} {mode:5} median {statistics.median(v):.3f} s '
                  f'({min(v):.3f}-{max(v):.3f})')
        for name in NAMES:
            ratios = [a / o for a, o in zip(times[(name, 'auto')], times[(name, 'off')])]
            print(f'{name}: auto/off per round {" ".join(f"{x:.2f}" for x in ratios)}; '
                  f'median {statistics.median(ratios):.2f}')
    finally:
        env.close()


if __name__ == '__main__':
    main()
