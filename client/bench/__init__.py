"""`lcmserve bench`: load-test any lcmserve server, and optionally plain diffusers for comparison.

Load comes in levels, one after another:
  closed loop  `--concurrency 1,8,32`: that many clients, each sends its next request as soon as
               its last one finished (what the server sustains at a given number of users);
  open loop    `--rate 1,2,4`: Poisson arrivals at that many requests/s, whatever the server does,
               optionally capped at `--max-concurrency` requests in flight (what users see under a
               given offered load).
Each level runs for `--requests N` or `--duration S` seconds, after `--warmup` requests that are
not counted; one smoke request before everything must succeed. Every request's stream is read, so
besides end-to-end latency we measure the time to the first step event and the gaps between the
step events of image 0 (the cadence a client showing previews sees).

The modules, each importing only those above it:
  config    RequestShape (the SDK's GenerateOptions with values), Level, BenchConfig, BenchError;
  report    Stats (percentiles), RequestResult, LevelReport, BaselineReport, BenchReport, and the
            table, JSON, CSV and plot writers;
  baseline  plain diffusers in this process (`--baseline`): torch and diffusers, imported only then;
  driver    the load itself: run_level, run_bench;
  cli       the options of `lcmserve bench` and `python -m lcmserve.bench`.
Only the SDK (grpcio, protobuf) and tqdm are imported by `import lcmserve.bench`; matplotlib
(`--plot`) and torch + diffusers (`--baseline`) only when asked for.
"""

from .cli import add_arguments, config_from_args, main, run
from .config import DEFAULT_PROMPTS, BenchConfig, BenchError, Level, RequestShape
from .driver import ResultCallback, run_bench, run_level
from .report import (
    BaselineReport,
    BenchReport,
    LevelReport,
    RequestResult,
    Stats,
    format_table,
    write_csv,
    write_json,
    write_plot,
)

__all__ = [
    "DEFAULT_PROMPTS",
    "BaselineReport",
    "BenchConfig",
    "BenchError",
    "BenchReport",
    "Level",
    "LevelReport",
    "RequestResult",
    "RequestShape",
    "ResultCallback",
    "Stats",
    "add_arguments",
    "config_from_args",
    "format_table",
    "main",
    "run",
    "run_bench",
    "run_level",
    "write_csv",
    "write_json",
    "write_plot",
]
