#!/usr/bin/env python3
"""Replacing a 1 GiB file on ext4 through the page cache vs with O_DIRECT (no devsync involved).

What a receiver does when it rebuilds a big file: read the old copy in 4 MiB pieces, write
them into a new file, rename it over the old one. On ext4 the rename over an existing file
writes the new one back first (`auto_da_alloc`), so the buffered variant pays the disk write
inside `rename`; the direct one pays it while writing. Prints write and rename times per run.

    python3 benches/direct_copy.py [DIR] [ROUNDS]    # DIR on the ext4 to measure; default /var/tmp/direct-copy

`WARM=1` frees a just-written 1 GiB file before each run, so the buffered writes can reuse
its pages (the state of a machine where fresh page-cache pages are cheap); without it, runs
are 10 s apart and take whatever pages the kernel hands out.
"""
import mmap
import os
import sys
import time

CHUNK = 4 << 20
SIZE = 1 << 30


def run(d, mode):
    src = os.open(f'{d}/old', os.O_RDONLY)
    buf = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT needs
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if mode == 'direct' else 0)
    t0 = time.perf_counter()
    fd = os.open(f'{d}/new.tmp', flags, 0o644)
    off = 0
    while off < SIZE:
        n = os.preadv(src, [buf], off)
        os.pwritev(fd, [buf if n == CHUNK else buf[:n]], off)
        off += n
    os.close(fd)
    t1 = time.perf_counter()
    os.rename(f'{d}/new.tmp', f'{d}/cur')
    t2 = time.perf_counter()
    os.close(src)
    return t1 - t0, t2 - t1


def main():
    d = sys.argv[1] if len(sys.argv) > 1 else '/var/tmp/direct-copy'
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    os.makedirs(d, exist_ok=True)
    with open(f'{d}/old', 'wb') as f:
        for _ in range(SIZE // CHUNK):
            f.write(os.urandom(CHUNK))
    os.system(f'cp {d}/old {d}/cur && sync')
    res = {'buffered': [], 'direct': []}
    for _ in range(rounds):
        for mode in res:
            if os.environ.get('WARM'):
                os.system(f'cp {d}/old {d}/junk && sync && rm {d}/junk')
            else:
                time.sleep(10)
            w, r = run(d, mode)
            res[mode].append(w + r)
            print(f'{mode}: write {w:.3f} s, rename {r:.3f} s, total {w + r:.3f} s', flush=True)
            os.sync()
    for mode, v in res.items():
        v.sort()
        print(f'{mode}: median {v[len(v) // 2]:.3f} s ({v[0]:.3f}–{v[-1]:.3f})')
    for f in ('old', 'cur'):
        os.remove(f'{d}/{f}')


if __name__ == '__main__':
    main()
