"""Ray actor calls on this machine, the peer of `scripts/bench.sh tasks`.

One local Ray (``ray.init()`` with its defaults) and one echo actor:
- ``sync``: one synchronous call at a time (``ray.get(a.echo.remote(x))``);
- ``async``: an async actor (``max_concurrency=64``) with 64 calls in
  flight, each caller waiting for its answer before it sends the next (the
  same closed loop as agentmesh's load generator).
Prints one JSON line per mode: requests, per_second, p50_ms, p99_ms.
Usage: tasks_ray.py SECONDS [WARMUP]
"""

import asyncio
import json
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
    lat = []
    while time.perf_counter() < end:
        sent = time.perf_counter()
        ray.get(actor.echo.remote("hello"))
        done = time.perf_counter()
        if sent >= measure_from and done <= end:
            lat.append((done - sent) * 1000)
    return lat


async def run_async(seconds, warmup, clients=64):
    actor = AsyncEcho.remote()
    await actor.echo.remote("warm")
    start = time.perf_counter()
    measure_from, end = start + warmup, start + warmup + seconds
    lat = []

    async def client():
        while time.perf_counter() < end:
            sent = time.perf_counter()
            await actor.echo.remote("hello")
            done = time.perf_counter()
            if sent >= measure_from and done <= end:
                lat.append((done - sent) * 1000)

    await asyncio.gather(*(client() for _ in range(clients)))
    return lat


def report(mode, clients, lat, seconds):
    lat.sort()
    print(json.dumps({
        "system": "ray", "mode": mode, "clients": clients, "requests": len(lat),
        "errors": 0, "per_second": len(lat) / seconds,
        "p50_ms": percentile(lat, 0.5), "p99_ms": percentile(lat, 0.99),
    }), flush=True)


def main():
    seconds = float(sys.argv[1])
    warmup = float(sys.argv[2]) if len(sys.argv) > 2 else 2.0
    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        report("sync", 1, run_sync(seconds, warmup), seconds)
        report("async", 64, asyncio.run(run_async(seconds, warmup)), seconds)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
