#!/usr/bin/env python3
"""Round trips of a one-file no-change push: a delaying TCP relay (DELAY_MS each way, default
25, so 50 ms of round trip) in front of the devbox API and the TLS gateway of benches/watch.py's
Env (real OpenSSH behind `devsync serve --upstream`, and `devsync serve`). Each push is timed
with and without the relay in the same rounds; (delayed - direct) / RTT is the number of round
trips its latency costs. RUNS=5; cold (`--keep-connection 0`) and kept.
"""
import asyncio, os, shutil, statistics, subprocess, sys, threading, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import watch  # noqa: E402

DATA = os.environ.get('BENCH_DIR', '/tmp/devsync-bench')
RUNS = int(os.environ.get('RUNS', '5'))
DELAY = int(os.environ.get('DELAY_MS', '25')) / 1000


async def pipe(reader, writer):
    """Forwards reader to writer, every piece DELAY after it arrived, in order."""
    q = asyncio.Queue()

    async def send():
        while True:
            due, data = await q.get()
            await asyncio.sleep(max(0, due - time.monotonic()))
            if not data:
                writer.close()
                return
            writer.write(data)
            await writer.drain()

    task = asyncio.ensure_future(send())
    try:
        while True:
            data = await reader.read(65536)
            q.put_nowait((time.monotonic() + DELAY, data))
            if not data:
                break
        await task
    except (ConnectionError, OSError):
        task.cancel()


def relay(listen_port, upstream_port):
    async def handle(r, w):
        try:
            ur, uw = await asyncio.open_connection('127.0.0.1', upstream_port)
        except OSError:
            w.close()
            return
        await asyncio.gather(pipe(r, uw), pipe(ur, w), return_exceptions=True)

    async def main():
        server = await asyncio.start_server(handle, '127.0.0.1', listen_port)
        async with server:
            await server.serve_forever()

    threading.Thread(target=lambda: asyncio.run(main()), daemon=True).start()


def main():
    watch.DATA = f'{DATA}/rtt-env'
    env = watch.Env()
    try:
        src = f'{DATA}/rtt-src'
        shutil.rmtree(src, ignore_errors=True)
        os.makedirs(src)
        open(f'{src}/f', 'w').write('hello\n')
        ports = {'serve': (28543, 28180), 'openssh': (28544, 28181)}
        for name, (gw, api) in ports.items():
            relay(gw + 1000, gw)
            relay(api + 1000, api)
        time.sleep(0.3)
        for name, (gw, api) in ports.items():
            direct = env.env[name]
            # Its own HOME, so its own state dir and keeper: a keeper is found by devbox id,
            # and one made without the relay would otherwise answer the delayed runs.
            home = direct['HOME'] + '-delayed'
            os.makedirs(home, exist_ok=True)
            delayed = dict(direct, HOME=home, RUNLOOP_BASE_URL=f'http://127.0.0.1:{api + 1000}',
                           RUNLOOP_SSH_GATEWAY=f'127.0.0.1:{gw + 1000}')
            target = env.target(name, 'rtt')

            def run(e, keep):
                subprocess.run([watch.DEVSYNC, 'push', '-q', '--keep-connection', keep, src, target],
                               check=True, capture_output=True, env=e)
            run(direct, '0')
            run(delayed, '0')
            times = {k: [] for k in ('cold direct', 'cold delayed', 'kept direct', 'kept delayed')}
            for _ in range(RUNS):
                for kind, e, keep in (('cold direct', direct, '0'), ('cold delayed', delayed, '0'),
                                      ('kept direct', direct, '300'), ('kept delayed', delayed, '300')):
                    if keep == '300':
                        run(e, '300')  # the keeper for this path (the relay is part of it)
                    t = time.perf_counter()
                    run(e, keep)
                    times[kind].append(time.perf_counter() - t)
            m = {k: statistics.median(v) for k, v in times.items()}
            for k, v in times.items():
                print(f'{name:8} {k:13} {m[k] * 1000:7.1f} ms ({min(v) * 1000:.1f}–{max(v) * 1000:.1f})')
            for kind in ('cold', 'kept'):
                rt = (m[f'{kind} delayed'] - m[f'{kind} direct']) / (2 * DELAY)
                print(f'{name:8} {kind}: {rt:.1f} round trips of {2 * DELAY * 1000:.0f} ms', flush=True)
    finally:
        env.close()
        shutil.rmtree(f'{DATA}/rtt-src', ignore_errors=True)


if __name__ == '__main__':
    main()
