#!/usr/bin/env python3
"""Watch-mode benchmark: how long a saved file takes to be readable on the remote.

Targets (loopback): `devsync serve` (its own TLS gateway and SSH server), and real OpenSSH
behind a TLS gateway (`devsync serve --upstream` in front of sshd, as hosted devboxes are),
logging in as a user whose ~/.bashrc does a pyenv/nvm-style init. For each target, with a
small tree and with a 50,000-file tree in place:

  latency  EDITS single-file edits, spaced out; each timed from the end of the local write to
           the new content being read back *on the remote side* (polled every 0.2 ms), not
           from anything devsync reports: p50/p90/p99/max.
  burst    5,000 files rewritten at once: watch (from the first write until `devsync flush`
           returns) against a one-shot `devsync push` of the same kind of change, alternating.
  idle     CPU time and RSS of the watch process (and its helper, for serve) over IDLE_S
           seconds of nothing happening, then RSS after SOAK edits.

Usage: benches/watch.py [quick]   (BENCH_DIR, default /tmp/devsync-watch-bench; EDITS=200,
       IDLE_S=60, SOAK=10000, ROUNDS=3). Needs root (sshd, a bench user), openssh-server.
"""
import json, os, random, shutil, statistics, subprocess, sys, threading, time

DEVSYNC = os.environ.get('DEVSYNC', os.path.abspath('target/release/devsync'))
DATA = os.environ.get('BENCH_DIR', '/tmp/devsync-watch-bench')
QUICK = len(sys.argv) > 1 and sys.argv[1] == 'quick'
EDITS = int(os.environ.get('EDITS', '40' if QUICK else '200'))
IDLE_S = int(os.environ.get('IDLE_S', '5' if QUICK else '60'))
SOAK = int(os.environ.get('SOAK', '500' if QUICK else '10000'))
ROUNDS = int(os.environ.get('ROUNDS', '1' if QUICK else '3'))
BURST = 5000
USER = 'devsyncbench'
HERE = os.path.dirname(os.path.abspath(__file__))


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=isinstance(cmd, str), check=True, capture_output=True,
                          text=True, **kw)


def ensure_user():
    """The bench user, created if it is not there yet (Env unlocks it for sshd)."""
    if subprocess.run(['id', USER], capture_output=True).returncode != 0:
        sh(['useradd', '-m', '-s', '/bin/bash', USER])


def unmount(mnt):
    """Unmounts `mnt` if it is a mount point (one a killed run left behind included)."""
    if os.path.ismount(mnt):
        if subprocess.run(['umount', mnt]).returncode != 0:
            # Something still has it open (a server that has not exited yet): detach it
            # now, it goes when they do.
            subprocess.run(['umount', '-l', mnt], check=False)


class LoopFs:
    """A fresh filesystem: a sparse image of `size` bytes at `img`, made by `mkfs` (its argv
    without the image) and mounted at `mnt` through a loop device in direct-I/O mode, so the
    image's pages are not cached twice. close() unmounts it and removes the image."""

    def __init__(self, img, mnt, mkfs, size):
        self.img, self.mnt = img, mnt
        unmount(mnt)
        if os.path.exists(img):
            os.remove(img)
        with open(img, 'wb') as f:
            f.truncate(size)
        sh(mkfs + [img])
        os.makedirs(mnt, exist_ok=True)
        self.dev = sh(['losetup', '--direct-io=on', '--show', '-f', img]).stdout.strip()
        sh(['mount', self.dev, mnt])

    def close(self):
        unmount(self.mnt)
        subprocess.run(['losetup', '-d', self.dev], check=False)
        os.remove(self.img)


def pct(xs, p):
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def proc_cpu(pid):
    """utime+stime of a process and its threads, in seconds."""
    f = open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf('SC_CLK_TCK')


def proc_rss(pid):
    for line in open(f'/proc/{pid}/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) * 1024
    return 0


def children(pid):
    out = []
    for t in os.listdir(f'/proc/{pid}/task'):
        try:
            out += [int(c) for c in open(f'/proc/{pid}/task/{t}/children').read().split()]
        except OSError:
            pass
    return out


def helpers():
    """PIDs of running `devsync helper` processes."""
    out = []
    for p in os.listdir('/proc'):
        if p.isdigit():
            try:
                args = open(f'/proc/{p}/cmdline', 'rb').read().split(b'\0')
            except OSError:
                continue
            if b'helper' in args and any(b'devsync' in a for a in args[:1]):
                out.append(int(p))
    return out


class Env:
    """sshd, a bench user with a slow login shell, and two `devsync serve` gateways."""

    def __init__(self):
        self.R = R = f'{DATA}/env'
        shutil.rmtree(R, ignore_errors=True)
        os.makedirs(R)
        self.procs = []
        ensure_user()
        sh(['usermod', '-p', '*', USER])  # no password, but not locked (sshd refuses those)
        self.home = os.path.expanduser(f'~{USER}')
        # A login shell like a dev box's: pyenv and nvm set up in ~/.bashrc (~0.1 s of work).
        open(f'{self.home}/.bashrc', 'w').write(
            '# pyenv / nvm style init, as dev boxes have\n'
            'export PYENV_ROOT="$HOME/.pyenv"; export PATH="$PYENV_ROOT/bin:$PATH"\n'
            'for i in $(seq 1 20000); do :; done\n'
            'export NVM_DIR="$HOME/.nvm"\n')
        sh(f'ssh-keygen -q -t ed25519 -N "" -f {R}/host')
        open(f'{R}/sshd_config', 'w').write(
            f'Port 22122\nListenAddress 127.0.0.1\nHostKey {R}/host\n'
            f'AuthorizedKeysFile {R}/authorized_keys\nPasswordAuthentication no\nUsePAM no\n'
            f'StrictModes no\nPidFile {R}/sshd.pid\nSubsystem sftp /usr/lib/openssh/sftp-server\n')
        os.makedirs('/run/sshd', exist_ok=True)
        self.procs.append(subprocess.Popen(['/usr/sbin/sshd', '-D', '-f', f'{R}/sshd_config',
                                            '-E', f'{R}/sshd.log']))
        self.env = {}
        for name, gw, api, extra in [
            ('serve', 28543, 28180, []),
            ('openssh', 28544, 28181, ['--upstream', '127.0.0.1:22122', '--user', USER]),
        ]:
            st = f'{R}/state-{name}'
            self.procs.append(subprocess.Popen(
                [DEVSYNC, 'serve', '--no-isolation', '--state', st, '--listen', f'127.0.0.1:{gw}',
                 '--api-listen', f'127.0.0.1:{api}', '--devbox', f'dbx_{name}', '--token', 'bench']
                + extra, stderr=open(f'{R}/serve-{name}.log', 'w')))
            home = f'{R}/client-home-{name}'
            os.makedirs(home)
            self.env[name] = dict(os.environ, HOME=home, RUNLOOP_BASE_URL=f'http://127.0.0.1:{api}',
                                  RUNLOOP_SSH_GATEWAY=f'127.0.0.1:{gw}', RUNLOOP_API_KEY='bench',
                                  DEVSYNC_TLS_CA=f'{st}/ca.pem')
        t0 = time.time()
        key = f'{R}/state-openssh/devboxes/dbx_openssh/key.pem'
        while not os.path.exists(key) and time.time() - t0 < 10:
            time.sleep(0.05)
        pub = sh(['ssh-keygen', '-y', '-f', key]).stdout
        open(f'{R}/authorized_keys', 'w').write(pub)
        time.sleep(0.5)
        # Where each target's copies go (the openssh user must own its own).
        self.remote = {'serve': f'{R}/remote-serve', 'openssh': f'{self.home}/remote'}
        shutil.rmtree(self.remote['openssh'], ignore_errors=True)
        for d in self.remote.values():
            os.makedirs(d, exist_ok=True)
        sh(['chown', '-R', f'{USER}:{USER}', self.remote['openssh']])

    def target(self, name, sub):
        return f'dbx_{name}:{self.remote[name]}/{sub}'

    def official_cli(self):
        """The official devbox CLI's path to the same sshd: ssh -> `openssl s_client`
        ProxyCommand -> TLS terminator (stunnel, stopped by close()) -> sshd, with its own
        client key. Returns an ssh_config whose `Host benchbox` goes that way."""
        R = self.R
        sh(f'ssh-keygen -q -t ed25519 -N "" -f {R}/client')
        with open(f'{R}/authorized_keys', 'a') as f:
            f.write(open(f'{R}/client.pub').read())
        sh(f'openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 '
           f'-subj /CN=ssh.bench.local -keyout {R}/tls.key -out {R}/tls.crt')
        open(f'{R}/stunnel.conf', 'w').write(
            f'foreground = yes\npid =\n[ssh]\naccept = 127.0.0.1:22443\nconnect = 127.0.0.1:22122\n'
            f'cert = {R}/tls.crt\nkey = {R}/tls.key\n')
        self.procs.append(subprocess.Popen(['stunnel4', f'{R}/stunnel.conf'],
                                           stderr=subprocess.DEVNULL))
        open(f'{R}/ssh_config', 'w').write(
            f'Host benchbox\n  User {USER}\n  IdentityFile {R}/client\n'
            '  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n'
            '  ProxyCommand openssl s_client -quiet -servername %h -connect 127.0.0.1:22443\n')
        time.sleep(0.5)
        return f'{R}/ssh_config'

    def close(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


class Watch:
    def __init__(self, src, target, env):
        self.p = subprocess.Popen([DEVSYNC, 'watch', '--json', src, target], env=env,
                                  stdout=subprocess.PIPE, stderr=open(f'{DATA}/watch.log', 'a'),
                                  text=True)
        self.src, self.env = src, env
        ready = json.loads(self.p.stdout.readline())
        assert ready['event'] == 'ready', ready
        self.ready = ready
        self.events = []
        # Drain the rest, or the watch would block on a full pipe.
        threading.Thread(target=lambda: [self.events.append(l) for l in self.p.stdout],
                         daemon=True).start()

    def flush(self):
        subprocess.run([DEVSYNC, 'flush', self.src], env=self.env, check=True,
                       capture_output=True)

    def stop(self):
        self.p.send_signal(2)
        self.p.wait(timeout=60)


def latency(w, src, remote, n):
    rng = random.Random(1)
    lat = []
    name = 'edited.txt'
    for i in range(n):
        body = f'edit {i} {rng.random()}\n' * rng.randint(1, 50)
        with open(f'{src}/{name}', 'w') as f:
            f.write(body)
        t = time.perf_counter()
        while True:
            try:
                with open(f'{remote}/{name}') as f:
                    if f.read() == body:
                        break
            except FileNotFoundError:
                pass
            if time.perf_counter() - t > 10:
                raise SystemExit(f'edit {i} never arrived')
            time.sleep(0.0002)
        lat.append((time.perf_counter() - t) * 1000)
        time.sleep(0.03 + rng.random() * 0.02)
    return lat


def burst_files(src, n, tag):
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(src) for f in fs
                   if f.startswith('file'))[:n]
    t = time.perf_counter()
    for p in files:
        with open(p, 'a') as f:
            f.write(f'// {tag}\n')
    return time.perf_counter() - t


def main():
    os.makedirs(DATA, exist_ok=True)
    big = f'{DATA}/tree50k'
    if not os.path.exists(f'{big}/.done'):
        print('generating a 50,000-file tree...', flush=True)
        shutil.rmtree(big, ignore_errors=True)
        sh([sys.executable, f'{HERE}/gen_tree.py', 'tree', big, '50000', str(300 << 20)])
        open(f'{big}/.done', 'w').close()
    env = Env()
    results = []
    try:
        for name in ['serve', 'openssh']:
            e = env.env[name]
            for size in ['small', '50k']:
                src = f'{DATA}/src-{name}-{size}'
                shutil.rmtree(src, ignore_errors=True)
                if size == 'small':
                    os.makedirs(src)
                    for i in range(100):
                        open(f'{src}/f{i}.txt', 'w').write(f'file {i}\n')
                else:
                    sh(['cp', '-a', big, src])
                sub = f'{size}'
                remote = f'{env.remote[name]}/{sub}'
                # Initial copy by push (the watch's own initial sync is then a no-change one).
                subprocess.run([DEVSYNC, 'push', '-q', src, env.target(name, sub)], env=e, check=True)
                w = Watch(src, env.target(name, sub), e)
                lat = latency(w, src, remote, EDITS)
                r = dict(target=name, tree=size, n=len(lat), p50=pct(lat, 50), p90=pct(lat, 90),
                         p99=pct(lat, 99), max=max(lat))
                print(f'{name:8} {size:6} latency ms: p50 {r["p50"]:.1f}  p90 {r["p90"]:.1f}  '
                      f'p99 {r["p99"]:.1f}  max {r["max"]:.1f}  (n={len(lat)})', flush=True)
                if size == '50k':
                    # Idle: nothing changes for IDLE_S seconds.
                    pids = [w.p.pid] + helpers()
                    cpu0 = sum(proc_cpu(p) for p in pids)
                    rss0 = proc_rss(w.p.pid)
                    time.sleep(IDLE_S)
                    cpu1 = sum(proc_cpu(p) for p in pids)
                    rss1 = proc_rss(w.p.pid)
                    r['idle_cpu_pct'] = (cpu1 - cpu0) / IDLE_S * 100
                    r['idle_rss'] = (rss0, rss1)
                    print(f'{name:8} {size:6} idle {IDLE_S} s: {r["idle_cpu_pct"]:.3f}% of a core '
                          f'(watch + helper), RSS {rss0 >> 20} -> {rss1 >> 20} MiB', flush=True)
                    # Burst vs one-shot push, alternating rounds.
                    tw, tp, tw_write = [], [], []
                    for k in range(ROUNDS):
                        t0 = time.perf_counter()
                        wt = burst_files(src, BURST, f'watch {k}')
                        w.flush()
                        tw.append(time.perf_counter() - t0)
                        tw_write.append(wt)
                        w.stop()
                        burst_files(src, BURST, f'push {k}')
                        t0 = time.perf_counter()
                        subprocess.run([DEVSYNC, 'push', '-q', src, env.target(name, sub)], env=e,
                                       check=True)
                        tp.append(time.perf_counter() - t0)
                        w = Watch(src, env.target(name, sub), e)
                    r['burst_watch'] = statistics.median(tw)
                    r['burst_write'] = statistics.median(tw_write)
                    r['burst_push'] = statistics.median(tp)
                    print(f'{name:8} {size:6} burst of {BURST}: watch {r["burst_watch"]:.2f} s '
                          f'(writing them took {r["burst_write"]:.2f} s) vs one-shot push '
                          f'{r["burst_push"]:.2f} s: {r["burst_watch"] / r["burst_push"]:.2f}x '
                          f'[{min(tw):.2f}-{max(tw):.2f} vs {min(tp):.2f}-{max(tp):.2f}]', flush=True)
                    # Soak: many edits, RSS before and after.
                    rss0 = proc_rss(w.p.pid)
                    rng = random.Random(3)
                    for i in range(SOAK):
                        with open(f'{src}/soak{rng.randint(0, 99)}.txt', 'w') as f:
                            f.write(f'{i}\n' * rng.randint(1, 100))
                        if i % 200 == 199:
                            w.flush()
                    w.flush()
                    rss1 = proc_rss(w.p.pid)
                    r['soak_rss'] = (rss0, rss1)
                    print(f'{name:8} {size:6} soak of {SOAK} edits: RSS {rss0 >> 20} -> '
                          f'{rss1 >> 20} MiB', flush=True)
                w.stop()
                results.append(r)
    finally:
        env.close()
    print('\n| target | tree | p50 | p90 | p99 | max |')
    print('|---|---|---|---|---|---|')
    for r in results:
        print(f'| {r["target"]} | {r["tree"]} | {r["p50"]:.1f} ms | {r["p90"]:.1f} ms | '
              f'{r["p99"]:.1f} ms | {r["max"]:.1f} ms |')
    json.dump(results, open(f'{DATA}/results.json', 'w'), indent=1)


if __name__ == '__main__':
    main()
