"""The command line of `lcmserve dataset` (also `python -m lcmserve.dataset`).

    lcmserve dataset SPEC.yaml --target HOST:PORT --out DIR [--concurrency N] [--limit N]
    lcmserve dataset SPEC.yaml --target HOST:PORT --out DIR --shard I/N     (or --shard auto/N)
    lcmserve dataset merge OUT SHARD_DIR...
    lcmserve dataset SPEC.yaml --out DIR --keep PICKED.txt [--keep-out DIR2]

Exit codes: 0 the folder is complete (or the kept copy written), 1 some requests failed or a
server said no (rerun to finish), 2 bad spec or option, 130 interrupted (rerun to resume).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .._common import DEFAULT_TARGET
from .._connection import ConnectionFlagError, add_security_arguments, read_security_arguments
from ..errors import LcmServeError
from .job import JobConfig, run as run_job
from .keep import keep
from .merge import merge
from .shards import parse_shard
from .spec import DatasetError

DESCRIPTION = ("make a labelled image dataset from a YAML spec (prompt templates x seeds), "
               "resumable and reproducible, in the Hugging Face imagefolder layout")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `lcmserve dataset`."""
    parser.epilog = ("lcmserve dataset merge OUT SHARD_DIR... writes the shard folders of one spec (made with "
                     "--shard I/N, every I once) as one dataset folder OUT, refusing a missing, unfinished or "
                     "duplicate shard or one of another spec or model. Spec keys and layout: docs/dataset.md")
    parser.add_argument("spec", metavar="SPEC.yaml",
                        help="the dataset spec (docs/dataset.md); or `merge`: merge OUT SHARD_DIR... writes the "
                             "shard folders of one spec as one dataset folder")
    parser.add_argument("folders", nargs="*", metavar="OUT SHARD_DIR", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, metavar="DIR", help="the dataset folder (required but with merge)")
    parser.add_argument("--shard", metavar="I/N",
                        help="make only shard I of N (0 <= I < N; auto/N: I from $JOB_COMPLETION_INDEX, as a "
                             "Kubernetes Indexed Job sets it); merge the N folders with `lcmserve dataset merge`")
    parser.add_argument(
        "--target",
        action="append",
        metavar="TARGET",
        help="server (any gRPC target string); repeat for several servers "
        f"(default: $LCMSERVE_TARGET, else {DEFAULT_TARGET})",
    )
    add_security_arguments(parser)  # --secure, --root-certificates, --client-cert, --client-key, --token
    parser.add_argument(
        "--concurrency",
        type=int,
        metavar="N",
        help="requests in flight per target (default: 2 x the server's max_batch_size / rows per request)",
    )
    parser.add_argument("--limit", type=int, metavar="N", help="make at most the first N images of the plan")
    parser.add_argument("--timeout", type=float, default=300.0, metavar="S",
                        help="deadline of one request, its retries included (default 300)")
    parser.add_argument("--retries", type=int, default=4, metavar="N",
                        help="the SDK's retries of a request that got UNAVAILABLE or RESOURCE_EXHAUSTED, with "
                             "the same seeds (default 4; 0: none)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--no-contact-sheets", action="store_true", help="do not write DIR/contact/")
    parser.add_argument("--keep", type=Path, metavar="FILE",
                        help="write a copy of DIR with only the images FILE lists (file names or seeds)")
    parser.add_argument("--keep-out", type=Path, metavar="DIR2", help="where --keep writes (default DIR-kept)")


def _config(args: argparse.Namespace) -> JobConfig:
    for name in ("concurrency", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise DatasetError(f"--{name} {value}: must be >= 1")
    if args.retries < 0 or not args.timeout > 0:
        raise DatasetError("--retries must be >= 0 and --timeout > 0")
    shard = parse_shard(args.shard) if args.shard is not None else None
    connection = read_security_arguments(args)  # ConnectionFlagError: run() reports it
    targets = tuple(args.target or [os.environ.get("LCMSERVE_TARGET", DEFAULT_TARGET)])
    return JobConfig(targets=targets, concurrency=args.concurrency, limit=args.limit,
                     timeout_s=args.timeout, retries=args.retries, progress=not args.no_progress,
                     contact_sheets=not args.no_contact_sheets, secure=connection.secure,
                     root_certificates=connection.root_certificates, client_cert=connection.client_cert,
                     client_key=connection.client_key, token=connection.token, shard=shard)


def run(args: argparse.Namespace) -> int:
    """`lcmserve dataset`; returns the exit code (see the module's docstring)."""
    try:
        if args.spec == "merge":
            if len(args.folders) < 2:
                raise DatasetError("merge: give OUT and the shard folders: lcmserve dataset merge OUT SHARD_DIR...")
            merged = merge(args.folders[0], args.folders[1:], progress=not args.no_progress,
                           contact_sheets=not args.no_contact_sheets)
            print(merged.summary())
            return 0
        if args.folders:
            raise DatasetError(f"unexpected arguments after the spec: {' '.join(args.folders)}")
        if args.out is None:
            raise DatasetError("--out DIR is required")
        args.spec = Path(args.spec)
        if args.keep is not None:
            dest = args.keep_out or args.out.with_name(args.out.name + "-kept")
            counts = keep(args.out, args.keep, dest)
            print(f"kept {sum(counts.values())} images in {dest} "
                  f"({', '.join(f'{s} {n}' for s, n in counts.items())})")
            return 0
        report = run_job(args.spec, args.out, _config(args))
    except DatasetError as exc:
        print(f"lcmserve dataset: error: {exc}", file=sys.stderr)
        return 2
    except ConnectionFlagError as exc:  # 1: a PEM file unreadable, 2: flags that do not go together
        print(f"lcmserve dataset: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except LcmServeError as exc:  # before the first request: a server that did not answer or is not ready
        print(f"lcmserve dataset: error: {exc}; nothing was made", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        print(f"lcmserve dataset: error:{where}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lcmserve dataset: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    print(report.summary())
    return 0 if report.complete or (args.limit is not None and not report.failures) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m lcmserve.dataset ARGS`: the same as `lcmserve dataset ARGS`."""
    parser = argparse.ArgumentParser(prog="lcmserve dataset", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))
