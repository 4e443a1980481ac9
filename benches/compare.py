#!/usr/bin/env python3
"""End-to-end comparison: devsync vs cp -a vs rsync on the same pair of local directories.

Reports median wall time of N runs, ratios and bytes moved. Machines are shared and noisy:
read the ratios, not the absolute times.
"""
import json, os, shutil, statistics, subprocess, sys, time

DEVSYNC = os.environ.get('DEVSYNC', os.path.abspath('target/release/devsync'))
DATA = os.environ.get('BENCH_DIR', '/tmp/devsync-bench')
RUNS = int(os.environ.get('RUNS', '3'))
HAVE_RSYNC = shutil.which('rsync') is not None

def sh(cmd, **kw):
    return subprocess.run(cmd, shell=isinstance(cmd, str), check=True, capture_output=True, text=True, **kw)

def timed(cmd, prepare=None, runs=RUNS):
    """Median seconds over `runs`, and the last run's stdout."""
    times, out = [], ''
    for _ in range(runs):
        if prepare:
            prepare()
        sh('sync')
        t = time.perf_counter()
        out = sh(cmd).stdout
        times.append(time.perf_counter() - t)
    return statistics.median(times), out

def rm(p):
    shutil.rmtree(p, ignore_errors=True)

def rsync_bytes(out):
    sent = recv = 0
    for line in out.splitlines():
        if line.startswith('Total bytes sent:'):
            sent = int(line.split(':')[1].replace(',', ''))
        if line.startswith('Total bytes received:'):
            recv = int(line.split(':')[1].replace(',', ''))
    return sent + recv

def ds_bytes(out):
    j = json.loads(out)
    return j['bytes_sent'] + j['bytes_received']

def human(n):
    for unit in ['B', 'KiB', 'MiB', 'GiB']:
        if n < 1024:
            return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
        n /= 1024
    return f'{n:.1f} TiB'

rows = []
def row(case, tool, secs, ref=None, nbytes=None):
    ratio = f'{secs / ref:.2f}x' if ref else ''
    rows.append((case, tool, f'{secs:.3f}s', ratio, human(nbytes) if nbytes is not None else ''))
    print(f'{case:<28} {tool:<26} {secs:8.3f}s {ratio:>8} {rows[-1][4]:>12}', flush=True)

def main():
    tree, big, big_edit = f'{DATA}/tree', f'{DATA}/big.orig', f'{DATA}/big.edit'
    os.makedirs(DATA, exist_ok=True)
    here = os.path.dirname(os.path.abspath(__file__))
    if not os.path.exists(f'{tree}/.done'):
        print('generating source-like tree (~40k files, ~700 MB)...', flush=True)
        rm(tree)
        sh([sys.executable, f'{here}/gen_tree.py', 'tree', tree])
        open(f'{tree}/.done', 'w').close()
    if not os.path.exists(big_edit):
        print('generating 1 GiB file and an edited copy...', flush=True)
        sh([sys.executable, f'{here}/gen_tree.py', 'big', big, big_edit])
    du = sh(['du', '-sb', tree]).stdout.split()[0]
    nfiles = sh(f'find {tree} -type f | wc -l').stdout.strip()
    print(f'tree: {nfiles} files, {human(int(du))}; runs per case: {RUNS}\n')
    print(f'{"case":<28} {"tool":<26} {"median":>9} {"vs ref":>8} {"wire":>12}')

    # 1. Initial copy into an empty directory.
    d = f'{DATA}/dst'
    cp, _ = timed(['cp', '-a', tree, d], prepare=lambda: rm(d))
    row('initial copy (tree)', 'cp -a (reference)', cp)
    ds, out = timed([DEVSYNC, 'push', '--json', tree, d], prepare=lambda: rm(d))
    row('initial copy (tree)', 'devsync push', ds, cp, ds_bytes(out))
    if HAVE_RSYNC:
        rs, out = timed(['rsync', '-a', '--stats', tree + '/', d + '/'], prepare=lambda: rm(d))
        row('initial copy (tree)', 'rsync -a', rs, cp, rsync_bytes(out))

    # 2. No-change resync (destination up to date).
    ds_nc, out = timed([DEVSYNC, 'push', '--json', tree, d], runs=RUNS + 2)
    row('no-change resync (tree)', 'devsync push', ds_nc, None, ds_bytes(out))
    if HAVE_RSYNC:
        rs_nc, out = timed(['rsync', '-a', '--stats', tree + '/', d + '/'], runs=RUNS + 2)
        row('no-change resync (tree)', 'rsync -a', rs_nc, ds_nc, rsync_bytes(out))
    rm(d)

    # 3. 1 GiB file with three 4 KiB edits; destination has the original.
    src, dst = f'{DATA}/bigsrc', f'{DATA}/bigdst'
    rm(src); os.makedirs(src)
    shutil.copy2(big_edit, f'{src}/big.bin')
    def restore():
        rm(dst); os.makedirs(dst)
        sh(['cp', big, f'{dst}/big.bin'])
        st = os.stat(f'{src}/big.bin')
        os.utime(f'{dst}/big.bin', ns=(st.st_atime_ns, st.st_mtime_ns - 10**9))
    ds_d, out = timed([DEVSYNC, 'push', '--json', src, dst], prepare=restore)
    row('1 GiB, three 4 KiB edits', 'devsync push', ds_d, None, ds_bytes(out))
    if HAVE_RSYNC:
        rs_d, out = timed(['rsync', '-a', '--no-whole-file', '--stats', src + '/', dst + '/'], prepare=restore)
        row('1 GiB, three 4 KiB edits', 'rsync -a --no-whole-file', rs_d, ds_d, rsync_bytes(out))
        rs_w, out = timed(['rsync', '-a', '--stats', src + '/', dst + '/'], prepare=restore)
        row('1 GiB, three 4 KiB edits', 'rsync -a (whole-file)', rs_w, ds_d, rsync_bytes(out))
    rm(src); rm(dst)

    print()
    print('| case | tool | median | ratio | wire |')
    print('|---|---|---|---|---|')
    for r in rows:
        print('| ' + ' | '.join(r) + ' |')

if __name__ == '__main__':
    main()
