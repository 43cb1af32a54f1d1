"""Run one function over every case in worker processes, with a progress bar."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Sequence, TypeVar

from tqdm import tqdm

T = TypeVar("T")
R = TypeVar("R")


def map_cases(function: Callable[[T], R], jobs: Sequence[T], workers: int, desc: str, progress: bool = True,
              chunksize: int = 4) -> list[R]:
    """Results in job order; in this process when `workers` <= 1 (easier to debug, no start-up cost).

    `function` must be a module-level function so worker processes can import it.
    """
    bar = dict(total=len(jobs), desc=desc, unit="case", disable=not progress)
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers) as pool:
            return list(tqdm(pool.map(function, jobs, chunksize=chunksize), **bar))
    return [function(job) for job in tqdm(jobs, **bar)]
