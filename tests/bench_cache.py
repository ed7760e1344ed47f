"""Cache figure: the hit ratio of the agent's LFU-with-aging policy (``agent.cache.ModuleCache``
itself, on a simulated clock) against LRU and Belady's optimal policy.

The trace: requests for models whose popularity follows a Zipf law (exponent 0.9) over a ranking
that drifts: every ``period`` requests a few models move to the top of the ranking (new models
everyone starts using) and the rest slide down. One request a second; every model is the same
size, so Belady's policy (evict the model needed furthest in the future) is the optimum.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Any

import numpy as np

from agent.cache import LfuAging, ModuleCache
from tests.support.figures import Figure


def zipf_trace(models: int, requests: int, period: int, movers: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, models + 1) ** 0.9
    weights /= weights.sum()
    ranking = list(rng.permutation(models))
    trace: list[int] = []
    while len(trace) < requests:
        ranks = rng.choice(models, size=period, p=weights)
        trace += [int(ranking[r]) for r in ranks]
        risers = [int(m) for m in rng.choice(ranking[models // 2 :], movers, replace=False)]
        ranking = risers + [m for m in ranking if m not in risers]
    return trace[:requests]


def lfu_aging(trace: list[int], slots: int, half_life_s: float) -> float:
    clock = [0.0]
    cache: ModuleCache[int] = ModuleCache(slots, LfuAging(half_life_s), lambda: clock[0])
    for t, model in enumerate(trace):
        clock[0] = float(t)
        if cache.get(str(model)) is None:
            cache.put(str(model), model, 1, ())
    return cache.hits / len(trace)


def lru(trace: list[int], slots: int) -> float:
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for model in trace:
        if model in cache:
            hits += 1
            cache.move_to_end(model)
            continue
        if len(cache) >= slots:
            cache.popitem(last=False)
        cache[model] = None
    return hits / len(trace)


def belady(trace: list[int], slots: int) -> float:
    """Evict the cached model whose next request is furthest away (optimal for equal sizes)."""
    never = len(trace)
    following = [never] * len(trace)
    last: dict[int, int] = {}
    for t in range(len(trace) - 1, -1, -1):
        following[t] = last.get(trace[t], never)
        last[trace[t]] = t
    cached: dict[int, int] = {}  # model -> its next request
    heap: list[tuple[int, int]] = []  # (-next request, model); stale entries skipped
    hits = 0
    for t, model in enumerate(trace):
        if model in cached:
            hits += 1
        elif len(cached) >= slots:
            while True:
                neg_next, victim = heapq.heappop(heap)
                if cached.get(victim) == -neg_next:
                    del cached[victim]
                    break
        cached[model] = following[t]
        heapq.heappush(heap, (-following[t], model))
    return hits / len(trace)


def figures(quick: bool) -> list[Figure]:
    models, requests, period = (200, 20_000, 2_000) if quick else (1000, 200_000, 10_000)
    trace = zipf_trace(models, requests, period, movers=models // 20)
    short, long = period // 20, period // 2
    fig = Figure(
        "cache",
        "Cache hit ratio: LFU with aging vs LRU vs optimal (Belady)",
        ["cache slots", f"LFU-aging, half-life {short}", f"LFU-aging, half-life {long}", "LRU",
         "Belady (optimal)"],
    )  # fmt: skip
    for fraction in (0.02, 0.05, 0.1, 0.2):
        slots = int(models * fraction)
        fig.rows.append(
            [slots, lfu_aging(trace, slots, short), lfu_aging(trace, slots, long),
             lru(trace, slots), belady(trace, slots)]
        )  # fmt: skip
    fig.notes.append(
        f"{requests} requests over {models} equal-sized models, Zipf 0.9, {models // 20} models "
        f"rise to the top every {period} requests, one request a second; the half-life is the "
        "agent's [agent.cache] half_life_s in requests"
    )

    def plot(ax: Any) -> None:
        xs = [r[0] for r in fig.rows]
        for column, label in enumerate(fig.columns[1:], start=1):
            ax.plot(xs, [r[column] for r in fig.rows], marker="o", label=label)
        ax.set_xlabel("cache slots (models)")
        ax.set_ylabel("hit ratio")
        ax.legend()

    fig.plot = plot
    return [fig]
