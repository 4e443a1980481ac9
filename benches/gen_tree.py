#!/usr/bin/env python3
"""Deterministic benchmark data: a source-like tree and a big binary file.

tree [ROOT FILES BYTES]: ~40k files / ~700 MB by default: mostly small text files (source-like, compressible), a few
multi-MB files, ~2k directories up to 6 deep. big: a 1 GiB random file plus an edited copy
with three 4 KiB overwrites.
"""
import os, random, sys

def gen_tree(root, files=40_000, target_bytes=700 << 20, seed=42):
    rng = random.Random(seed)
    words = [''.join(rng.choice('abcdefghijklmnopqrstuvwxyz_') for _ in range(rng.randint(2, 12)))
             for _ in range(5000)]
    lines = []
    for _ in range(40_000):
        indent = ' ' * (4 * rng.randint(0, 4))
        lines.append(indent + ' '.join(rng.choice(words) for _ in range(rng.randint(1, 12))) + ';\n')
    blob = ''.join(lines).encode()
    dirs = ['']
    for i in range(2000):
        parent = rng.choice(dirs)
        if parent.count('/') >= 5:
            parent = ''
        dirs.append(f'{parent}/dir{i}' if parent else f'dir{i}')
    for d in dirs:
        os.makedirs(os.path.join(root, d), exist_ok=True)
    big = 40
    big_bytes = 0
    for i in range(big):
        size = rng.randint(2 << 20, 8 << 20)
        big_bytes += size
        path = os.path.join(root, rng.choice(dirs), f'asset{i}.bin')
        with open(path, 'wb') as f:
            f.write(rng.randbytes(size))
    small = files - big
    avg = max(1, (target_bytes - big_bytes) // small)
    for i in range(small):
        size = min(len(blob) - 1, int(rng.expovariate(1 / avg)) + 1)
        off = rng.randint(0, len(blob) - size)
        ext = rng.choice(['.rs', '.py', '.go', '.ts', '.md', '.json', '.c', '.h'])
        with open(os.path.join(root, rng.choice(dirs), f'file{i}{ext}'), 'wb') as f:
            f.write(blob[off:off + size])

def gen_big(path, edited, size=1 << 30, seed=7):
    rng = random.Random(seed)
    chunk = 64 << 20
    with open(path, 'wb') as f:
        for _ in range(size // chunk):
            f.write(rng.randbytes(chunk))
    os.system(f'cp --reflink=auto "{path}" "{edited}"')
    with open(edited, 'r+b') as f:
        for off in (100 << 20, 500 << 20, 900 << 20):
            f.seek(off + 1234)
            f.write(rng.randbytes(4096))

if __name__ == '__main__':
    what, *args = sys.argv[1:]
    if what == 'tree':
        # tree ROOT [FILES [BYTES]]
        files = int(args[1]) if len(args) > 1 else 40_000
        size = int(args[2]) if len(args) > 2 else 700 << 20
        gen_tree(args[0], files, size)
    elif what == 'big':
        gen_big(args[0], args[1])
    else:
        sys.exit(f'unknown: {what}')
