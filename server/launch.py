"""Where `lcmserve serve` puts the edge and the engine together (the composition root).

The edge (server/edge/) imports neither the engine nor the model: it is given, per device, an
EngineEntry to run in each engine process it spawns. This module makes them: the engine's main
(server/engine/main.py) with the model to load bound in, `functools.partial(load_runtime, MODEL,
device=..., ...)`. Both are picklable (spawn sends them to the new process) and import their heavy
modules only when called, in the engine process: the serve CLI imports this module without torch.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing.connection
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .config import EngineConfig
from .edge.engine_process import EngineEntry
from .logs import LogSettings
from .placement import CpuSplit

if TYPE_CHECKING:
    from .model.runtime import Runtime


def load_runtime(model: str, *, loras: Sequence[str] = (), backend: str = "auto", device: str | None = None,
                 dtype: str | None = None, allow_partial_lora: bool = False, tiny_vae: str | None = None,
                 default_decoder: str = "vae", scorer: str | None = None) -> Runtime:
    """server/model/loader.py's load_runtime, imported when called (in the engine process)."""
    from .model import loader

    return loader.load_runtime(model, loras=loras, backend=backend, device=device, dtype=dtype,
                               allow_partial_lora=allow_partial_lora, tiny_vae=tiny_vae,
                               default_decoder=default_decoder, scorer=scorer)


def engine_entry(make_runtime: Callable[[], Runtime]) -> EngineEntry:
    """What an engine process runs: the engine's main, loading `make_runtime()` there."""
    return functools.partial(run_engine, make_runtime)


def run_engine(make_runtime: Callable[[], Runtime], conn: multiprocessing.connection.Connection,
               config: EngineConfig, threads: int | None, log_settings: LogSettings, warm_up: bool, capture_side: int,
               split: CpuSplit | None) -> None:
    """The engine's main, then straight out of the process. By the time engine_main returns, it has
    sent everything (the pipe is closed or gone) and its threads are stopped; what is left is the
    interpreter's teardown, whose garbage collection of the model's and torch's objects takes
    seconds (2-5 s for `tiny` on 2 cores), and the edge waits for this process to exit."""
    from .engine.main import engine_main

    engine_main(conn, make_runtime, config, threads, log_settings, warm_up, capture_side, split)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
