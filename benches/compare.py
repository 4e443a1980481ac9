#!/usr/bin/env python3
"""End-to-end comparison: devsync vs cp -a vs rsync on the same pair of local directories.

Reports median wall time of N runs, ratios and bytes moved. Machines are shared and noisy:
read the ratios, not the absolute times.
"""
import json, os, shutil, statistics, subprocess, sys, time

DEVSYNC = os.environ.get('DEVSYNC', os.path.abspath('target/release/devsync'))
DATA = os.environ.get('BENCH_DIR', '/tmp/devsync-bench')
RUNS = int(os.environ.get('RUNS', '5'))
HAVE_RSYNC = shutil.which('rsync') is not None

def sh(cmd, **kw):
    return subprocess.run(cmd, shell=isinstance(cmd, str), check=True, capture_output=True, text=True, **kw)

SPREAD = {}

def timed(cmd, prepare=None, runs=RUNS, env=None):
    """Median seconds over `runs`, and the last run's stdout."""
    return interleaved([(cmd, prepare, env)], runs)[0]

def interleaved(jobs, runs=RUNS):
    """Runs several (cmd, prepare, env) jobs round-robin, `runs` rounds, so slow drift of the
    machine (page cache filling, VM memory, disk state) hits every tool alike. Returns
    [(median, last stdout)] in job order; the min and max go to SPREAD for the table."""
    times = [[] for _ in jobs]
    outs = [''] * len(jobs)
    for _ in range(runs):
        for i, (cmd, prepare, env) in enumerate(jobs):
            if prepare:
                prepare()
            sh('sync')
            t = time.perf_counter()
            outs[i] = subprocess.run(cmd, shell=isinstance(cmd, str), check=True, capture_output=True,
                                     text=True, env=env).stdout
            times[i].append(time.perf_counter() - t)
    res = []
    for ts, out in zip(times, outs):
        m = statistics.median(ts)
        SPREAD[m] = (min(ts), max(ts))
        res.append((m, out))
    return res

TRASH = f'{DATA}/trash'
_trash_n = [0]

def rm(p):
    """Moves `p` out of the way instead of deleting it. On ext4 without a journal (this kind
    of VM), inodes freed in the last minutes make every new inode allocation crawl past them
    (`recently_deleted` in the kernel): deleting a 40k-file destination before each run made
    the next run of *any* tool mostly measure that. The trash is emptied at the very end."""
    if os.path.lexists(p):
        os.makedirs(TRASH, exist_ok=True)
        _trash_n[0] += 1
        os.rename(p, f'{TRASH}/{_trash_n[0]}')

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
    lo, hi = SPREAD.get(secs, (secs, secs))
    spread = f'{lo:.2f}–{hi:.2f}s'
    rows.append((case, tool, f'{secs:.3f}s', spread, ratio, human(nbytes) if nbytes is not None else ''))
    print(f'{case:<28} {tool:<26} {secs:8.3f}s {spread:>13} {ratio:>8} {rows[-1][5]:>12}', flush=True)

def prepare_data():
    tree, big, big_edit = f'{DATA}/tree', f'{DATA}/big.orig', f'{DATA}/big.edit'
    os.makedirs(DATA, exist_ok=True)
    here = os.path.dirname(os.path.abspath(__file__))
    if not os.path.exists(f'{tree}/.done'):
        print('generating source-like tree (~40k files, ~700 MB)...', flush=True)
        shutil.rmtree(tree, ignore_errors=True)
        sh([sys.executable, f'{here}/gen_tree.py', 'tree', tree])
        open(f'{tree}/.done', 'w').close()
    if not os.path.exists(big_edit):
        print('generating 1 GiB file and an edited copy...', flush=True)
        sh([sys.executable, f'{here}/gen_tree.py', 'big', big, big_edit])
    du = sh(['du', '-sb', tree]).stdout.split()[0]
    nfiles = sh(f'find {tree} -type f | wc -l').stdout.strip()
    print(f'tree: {nfiles} files, {human(int(du))}; runs per case: {RUNS}\n')
    print(f'{"case":<28} {"tool":<26} {"median":>9} {"min–max":>13} {"vs ref":>8} {"wire":>12}')
    return tree, big, big_edit

def local_bench(tree, big, big_edit):

    # 1. Initial copy into an empty directory (tools interleaved round by round).
    d = f'{DATA}/dst'
    jobs = [(['cp', '-a', tree, d], lambda: rm(d), None),
            ([DEVSYNC, 'push', '--json', tree, d], lambda: rm(d), None)]
    if HAVE_RSYNC:
        jobs.append((['rsync', '-a', '--stats', tree + '/', d + '/'], lambda: rm(d), None))
    res = interleaved(jobs)
    cp = res[0][0]
    row('initial copy (tree)', 'cp -a (reference)', cp)
    row('initial copy (tree)', 'devsync push', res[1][0], cp, ds_bytes(res[1][1]))
    if HAVE_RSYNC:
        row('initial copy (tree)', 'rsync -a', res[2][0], cp, rsync_bytes(res[2][1]))

    # 2. No-change resync (destination up to date).
    jobs = [([DEVSYNC, 'push', '--json', tree, d], None, None)]
    if HAVE_RSYNC:
        jobs.append((['rsync', '-a', '--stats', tree + '/', d + '/'], None, None))
    res = interleaved(jobs, RUNS + 2)
    row('no-change resync (tree)', 'devsync push', res[0][0], None, ds_bytes(res[0][1]))
    if HAVE_RSYNC:
        row('no-change resync (tree)', 'rsync -a', res[1][0], res[0][0], rsync_bytes(res[1][1]))
    rm(d)
    big_delta_local(big, big_edit)

def big_delta_local(big, big_edit):
    # 3. 1 GiB file with three 4 KiB edits; destination has the original.
    src, dst = f'{DATA}/bigsrc', f'{DATA}/bigdst'
    shutil.rmtree(src, ignore_errors=True); os.makedirs(src)
    shutil.copy2(big_edit, f'{src}/big.bin')
    def restore():
        shutil.rmtree(dst, ignore_errors=True); os.makedirs(dst)  # one inode: no allocator effect
        sh(['cp', big, f'{dst}/big.bin'])
        st = os.stat(f'{src}/big.bin')
        os.utime(f'{dst}/big.bin', ns=(st.st_atime_ns, st.st_mtime_ns - 10**9))
    jobs = [([DEVSYNC, 'push', '--json', src, dst], restore, None),
            ([DEVSYNC, 'push', '--json', '--inplace', src, dst], restore, None)]
    if HAVE_RSYNC:
        jobs.append((['rsync', '-a', '--no-whole-file', '--stats', src + '/', dst + '/'], restore, None))
        jobs.append((['rsync', '-a', '--no-whole-file', '--inplace', '--stats', src + '/', dst + '/'], restore, None))
        jobs.append((['rsync', '-a', '--stats', src + '/', dst + '/'], restore, None))
    res = interleaved(jobs)
    ds_d = res[0][0]
    row('1 GiB, three 4 KiB edits', 'devsync push', ds_d, None, ds_bytes(res[0][1]))
    row('1 GiB, three 4 KiB edits', 'devsync push --inplace', res[1][0], ds_d, ds_bytes(res[1][1]))
    if HAVE_RSYNC:
        row('1 GiB, three 4 KiB edits', 'rsync -a --no-whole-file', res[2][0], ds_d, rsync_bytes(res[2][1]))
        row('1 GiB, three 4 KiB edits', 'rsync -a --no-whole-file --inplace', res[3][0], res[1][0], rsync_bytes(res[3][1]))
        row('1 GiB, three 4 KiB edits', 'rsync -a (whole-file)', res[4][0], ds_d, rsync_bytes(res[4][1]))
    shutil.rmtree(src, ignore_errors=True); shutil.rmtree(dst, ignore_errors=True)

def remote_bench(tree, big, big_edit):
    """devsync through `devsync serve` (TLS + built-in SSH) vs rsync over OpenSSH behind stunnel,
    reached with an `openssl s_client` ProxyCommand the way the official CLI does. Loopback."""
    for tool in ('/usr/sbin/sshd', 'stunnel4', 'openssl', 'rsync'):
        if not (os.path.exists(tool) or shutil.which(tool)):
            print(f'(remote comparison skipped: {tool} missing)')
            return
    R = f'{DATA}/remote'
    shutil.rmtree(R, ignore_errors=True); os.makedirs(R)
    procs = []
    try:
        # OpenSSH on 127.0.0.1:22022, stunnel TLS on 22443 in front of it.
        sh(f'ssh-keygen -q -t ed25519 -N "" -f {R}/host && ssh-keygen -q -t ed25519 -N "" -f {R}/client')
        shutil.copy(f'{R}/client.pub', f'{R}/authorized_keys')
        open(f'{R}/sshd_config', 'w').write(
            f'Port 22022\nListenAddress 127.0.0.1\nHostKey {R}/host\nAuthorizedKeysFile {R}/authorized_keys\n'
            'PasswordAuthentication no\nUsePAM no\nPermitRootLogin prohibit-password\nStrictModes no\n'
            f'PidFile {R}/sshd.pid\nSubsystem sftp /usr/lib/openssh/sftp-server\n')
        os.makedirs('/run/sshd', exist_ok=True)
        procs.append(subprocess.Popen(['/usr/sbin/sshd', '-D', '-f', f'{R}/sshd_config', '-E', f'{R}/sshd.log']))
        sh(f'openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 '
           f'-subj /CN=ssh.bench.local -keyout {R}/tls.key -out {R}/tls.crt')
        open(f'{R}/stunnel.conf', 'w').write(
            f'foreground = yes\npid =\n[ssh]\naccept = 127.0.0.1:22443\nconnect = 127.0.0.1:22022\n'
            f'cert = {R}/tls.crt\nkey = {R}/tls.key\n')
        procs.append(subprocess.Popen(['stunnel4', f'{R}/stunnel.conf'], stderr=subprocess.DEVNULL))
        open(f'{R}/ssh_config', 'w').write(
            f'Host benchbox\n  User root\n  IdentityFile {R}/client\n  StrictHostKeyChecking no\n'
            '  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n'
            '  ProxyCommand openssl s_client -quiet -servername %h -connect 127.0.0.1:22443\n')
        # devsync serve: gateway 28443, API 28080.
        env = dict(os.environ, HOME=f'{R}/home', RUNLOOP_BASE_URL='http://127.0.0.1:28080',
                   RUNLOOP_SSH_GATEWAY='127.0.0.1:28443', RUNLOOP_API_KEY='bench',
                   DEVSYNC_TLS_CA=f'{R}/serve/ca.pem')
        os.makedirs(f'{R}/home')
        procs.append(subprocess.Popen([DEVSYNC, 'serve', '--state', f'{R}/serve', '--listen', '127.0.0.1:28443',
                                       '--api-listen', '127.0.0.1:28080', '--devbox', 'dbx_bench', '--token', 'bench'],
                                      stderr=open(f'{R}/serve.log', 'w')))
        time.sleep(1.5)
        ssh = f'ssh -F {R}/ssh_config'
        warm = f'{R}/warm'
        os.makedirs(warm); open(f'{warm}/x', 'w').write('x')
        subprocess.run([DEVSYNC, 'push', '-q', warm, f'dbx_bench:{R}/warm-dst'], env=env, check=True)  # installs the helper
        sh(['rsync', '-a', '-e', ssh, warm + '/', f'benchbox:{R}/warm-rs/'])

        d_ds, d_rs = f'{R}/dst-devsync', f'{R}/dst-rsync'
        res = interleaved([
            (['rsync', '-a', '--stats', '-e', ssh, tree + '/', f'benchbox:{d_rs}/'], lambda: rm(d_rs), None),
            ([DEVSYNC, 'push', '--json', tree, f'dbx_bench:{d_ds}'], lambda: rm(d_ds), env)])
        row('remote initial push (tree)', 'rsync over ssh+TLS', res[0][0], None, rsync_bytes(res[0][1]))
        row('remote initial push (tree)', 'devsync push dbx_', res[1][0], res[0][0], ds_bytes(res[1][1]))
        res = interleaved([
            (['rsync', '-a', '--stats', '-e', ssh, tree + '/', f'benchbox:{d_rs}/'], None, None),
            ([DEVSYNC, 'push', '--json', tree, f'dbx_bench:{d_ds}'], None, env)], RUNS + 2)
        row('remote no-change (tree)', 'rsync over ssh+TLS', res[0][0], None, rsync_bytes(res[0][1]))
        row('remote no-change (tree)', 'devsync push dbx_', res[1][0], res[0][0], ds_bytes(res[1][1]))
        rm(d_ds); rm(d_rs)

        src = f'{R}/bigsrc'
        os.makedirs(src)
        shutil.copy2(big_edit, f'{src}/big.bin')
        def restore(dst):
            def f():
                shutil.rmtree(dst, ignore_errors=True); os.makedirs(dst)
                sh(['cp', big, f'{dst}/big.bin'])
                st = os.stat(f'{src}/big.bin')
                os.utime(f'{dst}/big.bin', ns=(st.st_atime_ns, st.st_mtime_ns - 10**9))
            return f
        res = interleaved([
            (['rsync', '-a', '--stats', '-e', ssh, src + '/', f'benchbox:{R}/bigdst-rs/'], restore(f'{R}/bigdst-rs'), None),
            ([DEVSYNC, 'push', '--json', src, f'dbx_bench:{R}/bigdst-ds'], restore(f'{R}/bigdst-ds'), env)])
        row('remote 1 GiB, 3 edits', 'rsync over ssh+TLS', res[0][0], None, rsync_bytes(res[0][1]))
        row('remote 1 GiB, 3 edits', 'devsync push dbx_', res[1][0], res[0][0], ds_bytes(res[1][1]))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(R, ignore_errors=True)

def main():
    which = sys.argv[1] if len(sys.argv) > 1 else 'all'
    tree, big, big_edit = prepare_data()
    if which in ('all', 'local'):
        local_bench(tree, big, big_edit)
    if which == 'big':
        big_delta_local(big, big_edit)
    if which in ('all', 'remote'):
        remote_bench(tree, big, big_edit)
    shutil.rmtree(TRASH, ignore_errors=True)
    print()
    print('| case | tool | median | min–max | ratio | wire |')
    print('|---|---|---|---|---|---|')
    for r in rows:
        print('| ' + ' | '.join(r) + ' |')

if __name__ == '__main__':
    main()
