"""The peers aviato's functions are measured against: Ray tasks, Dask distributed and
ProcessPoolExecutor, each started, measured into a ``Result`` and shut down."""

from __future__ import annotations

import platform
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from benchmarks._fn_common import (
    SETTLE_SECONDS,
    SLEEP_WORKERS,
    TIMEOUT,
    Plan,
    Result,
    SleepRun,
    descendants,
    memory_of,
    noop,
    sequential,
    sleep10,
    timed_rate,
    warm_to,
)
from benchmarks._ray import ray_started

# ---------------------------------------------------------------------- Ray


def run_ray(res: Result, plan: Plan) -> None:
    t0 = time.perf_counter()
    with ray_started(by_value=noop.__module__) as ray:
        res.version = f"ray {ray.__version__}"
        res.start_s = time.perf_counter() - t0
        res.start_note = "ray.init(num_cpus=2)"
        time.sleep(SETTLE_SECONDS)
        res.idle = memory_of(descendants())
        rnoop = ray.remote(noop)
        rsleep = ray.remote(sleep10)

        def gather(n: int) -> list[int]:
            return list(ray.get([rnoop.remote(i) for i in range(n)], timeout=TIMEOUT))

        t0 = time.perf_counter()
        gather(plan.warm_calls)
        res.first_s = time.perf_counter() - t0
        gather(plan.warm_calls)
        for _ in range(plan.noop_reps):
            res.noop_rates.append(timed_rate(lambda: gather(plan.noop_calls), plan.noop_calls))
        res.noop_workers = 2
        res.seq = sequential(lambda i: ray.get(rnoop.remote(i), timeout=TIMEOUT), plan.seq_n)
        res.warm = memory_of(descendants())
        res.memory_note = "all of ray.init's processes (gcs, raylet, agents, workers)"

        for k in SLEEP_WORKERS:
            task = rsleep.options(num_cpus=2 / k)

            def run(n: int, task: Any = task) -> list[str]:
                return list(ray.get([task.remote(i) for i in range(n)], timeout=TIMEOUT))

            warm_to(run, k, f"ray k={k}")
            n = plan.sleep_calls(k)
            t0 = time.perf_counter()
            who = run(n)
            res.sleep[k] = SleepRun(n, time.perf_counter() - t0, len(set(who)))


# ---------------------------------------------------------------------- Dask


def run_dask(res: Result, plan: Plan) -> None:
    import dask
    import distributed
    from distributed import Client, LocalCluster

    res.version = f"dask {dask.__version__}, distributed {distributed.__version__}"

    t0 = time.perf_counter()
    cluster = LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    )
    try:
        client = Client(cluster)
        try:
            res.start_s = time.perf_counter() - t0
            res.start_note = "LocalCluster(n_workers=2) + Client"
            time.sleep(SETTLE_SECONDS)
            res.idle = memory_of(descendants())

            def gather(n: int) -> list[int]:
                return list(client.gather(client.map(noop, range(n), pure=False)))

            t0 = time.perf_counter()
            gather(plan.warm_calls)
            res.first_s = time.perf_counter() - t0
            gather(plan.warm_calls)
            for _ in range(plan.noop_reps):
                res.noop_rates.append(timed_rate(lambda: gather(plan.noop_calls), plan.noop_calls))
            res.noop_workers = len(client.scheduler_info()["workers"])
            res.seq = sequential(
                lambda i: client.submit(noop, i, pure=False).result(timeout=TIMEOUT), plan.seq_n
            )
            res.warm = memory_of(descendants())
            res.memory_note = (
                "worker processes + resource tracker (scheduler and nannies run in the client)"
            )

            def run(n: int) -> list[str]:
                return list(client.gather(client.map(sleep10, range(n), pure=False)))

            for k in SLEEP_WORKERS:
                cluster.scale(k)
                client.wait_for_workers(k, timeout=120)
                warm_to(run, k, f"dask k={k}")
                n = plan.sleep_calls(k)
                t0 = time.perf_counter()
                who = run(n)
                res.sleep[k] = SleepRun(n, time.perf_counter() - t0, len(set(who)))
        finally:
            client.close()
    finally:
        cluster.close()


# ---------------------------------------------------------------------- ProcessPoolExecutor


def run_ppe(res: Result, plan: Plan) -> None:
    res.version = f"Python {platform.python_version()}"
    t0 = time.perf_counter()
    ex = ProcessPoolExecutor(2)
    try:
        ex.submit(noop, 0).result(timeout=TIMEOUT)  # its processes start at the first submit
        res.start_s = time.perf_counter() - t0
        res.start_note = "ProcessPoolExecutor(2) + first call"
        time.sleep(SETTLE_SECONDS)
        res.idle = memory_of(descendants())

        def gather(n: int) -> list[int]:
            futures = [ex.submit(noop, i) for i in range(n)]
            return [f.result(timeout=TIMEOUT) for f in futures]

        t0 = time.perf_counter()
        gather(plan.warm_calls)
        res.first_s = time.perf_counter() - t0
        for _ in range(plan.noop_reps):
            res.noop_rates.append(timed_rate(lambda: gather(plan.noop_calls), plan.noop_calls))
        res.noop_workers = 2
        res.seq = sequential(lambda i: ex.submit(noop, i).result(timeout=TIMEOUT), plan.seq_n)
        res.warm = memory_of(descendants())
        res.memory_note = "its 2 worker processes"
    finally:
        ex.shutdown(wait=True, cancel_futures=True)

    for k in SLEEP_WORKERS:
        with ProcessPoolExecutor(k) as pool:

            def run(n: int, pool: ProcessPoolExecutor = pool) -> list[str]:
                futures = [pool.submit(sleep10, i) for i in range(n)]
                return [f.result(timeout=TIMEOUT) for f in futures]

            warm_to(run, k, f"ppe k={k}")
            n = plan.sleep_calls(k)
            t0 = time.perf_counter()
            who = run(n)
            res.sleep[k] = SleepRun(n, time.perf_counter() - t0, len(set(who)))
