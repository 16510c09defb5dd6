"""Ray actor calls on this machine, the peer of `scripts/bench.sh tasks`.

One local Ray (a plain ``ray.init()``: its recommended defaults) and one
echo actor per mode:
- ``sync``: one synchronous call at a time (``ray.get(a.echo.remote(x))``)
  on a plain actor;
- ``async``: an async actor (``max_concurrency=64``) with 64 calls in
  flight: 64 callers in the driver's event loop, each awaiting its answer
  before it sends the next (the same closed loop as agentmesh's load
  generator, bench/src/loadgen.rs).
Prints one JSON line per mode: requests, errors, per_second, p50_ms, p99_ms.
Usage: tasks_ray.py SECONDS [WARMUP]
"""

import asyncio
import json
import signal
import sys
import time

import ray


def percentile(sorted_ms, p):
    if not sorted_ms:
        return float("nan")
    return sorted_ms[round((len(sorted_ms) - 1) * p)]


@ray.remote
class Echo:
    def echo(self, x):
        return x


@ray.remote(max_concurrency=64)
class AsyncEcho:
    async def echo(self, x):
        return x


def run_sync(seconds, warmup):
    actor = Echo.remote()
    ray.get(actor.echo.remote("warm"))
    start = time.perf_counter()
    measure_from, end = start + warmup, start + warmup + seconds
    lat, errors = [], 0
    while time.perf_counter() < end:
        sent = time.perf_counter()
        try:
            ok = ray.get(actor.echo.remote("hello"), timeout=30) == "hello"
        except Exception:  # a failed call counts as an error, like loadgen's
            ok = False
        done = time.perf_counter()
        if sent >= measure_from and done <= end:
            if ok:
                lat.append((done - sent) * 1000)
            else:
                errors += 1
    return lat, errors


async def run_async(seconds, warmup, clients=64):
    actor = AsyncEcho.remote()
    await actor.echo.remote("warm")
    start = time.perf_counter()
    measure_from, end = start + warmup, start + warmup + seconds
    lat, errors = [], [0]

    async def client():
        while time.perf_counter() < end:
            sent = time.perf_counter()
            try:
                ok = await asyncio.wait_for(actor.echo.remote("hello"), 30) == "hello"
            except Exception:
                ok = False
            done = time.perf_counter()
            if sent >= measure_from and done <= end:
                if ok:
                    lat.append((done - sent) * 1000)
                else:
                    errors[0] += 1

    await asyncio.gather(*(client() for _ in range(clients)))
    return lat, errors[0]


def report(mode, clients, result, seconds):
    lat, errors = result
    lat.sort()
    print(json.dumps({
        "system": "ray", "mode": mode, "clients": clients, "requests": len(lat),
        "errors": errors, "per_second": len(lat) / seconds,
        "p50_ms": percentile(lat, 0.5), "p99_ms": percentile(lat, 0.99),
    }), flush=True)


def main():
    seconds = float(sys.argv[1])
    warmup = float(sys.argv[2]) if len(sys.argv) > 2 else 2.0
    # A SIGTERM (the bench stopping) shuts the local Ray down too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ray.init()
    try:
        report("sync", 1, run_sync(seconds, warmup), seconds)
        report("async", 64, asyncio.run(run_async(seconds, warmup)), seconds)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
