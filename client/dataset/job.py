"""The dataset job: plan the spec, skip what the folder already has, keep the servers' batches
full, write every image as its request ends, then contact sheets and dataset.json.

Closed loop like `lcmserve bench --concurrency N`: per target, N workers each send their next
request when the last one ended. N defaults to two batches' worth of requests from the server's
GetModelInfo limits (``2 * max_batch_size / rows per request``, a guided image takes two rows), so
one batch can be queued while the other runs; ``concurrency`` overrides it.

Retries are the SDK's (lcmserve/retry.py): each AsyncClient gets ``retries=``, and
``AsyncClient.generate`` retries UNAVAILABLE and RESOURCE_EXHAUSTED (with a RetryInfo) with
backoff inside the request's one deadline (``timeout_s``). Every request carries its fixed seeds,
so a retry makes the same images. A request that still fails is reported and left for the next
run; the others go on. Before the first request the job asks each server's health once: where
nothing answers it stops at once (nothing was made); a server that answers but is not SERVING yet
(still loading its model) gets up to ``_READY_S``. Then it reads its GetModelInfo.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm  # type: ignore[import-untyped, unused-ignore]

from .. import __version__
from .._connection import unavailable_hint
from ..aio import AsyncClient
from ..errors import LcmServeError, UnavailableError
from ..options import GenerateOptions
from ..types import Image, ModelInfo
from .checks import check_sdk_supports, check_servers, scorer_of
from .contact import ContactSheets
from .plan import Plan, PlannedImage, make_plan
from .shards import shard_plan
from .spec import DatasetError, DatasetSpec, load_spec
from .store import Outcome, Store, write_manifest

_READY_S = 30.0  # how long a server may take to turn SERVING before the job gives up on it


@dataclass(frozen=True)
class JobConfig:
    """How to run a spec (what to make is the spec's)."""

    targets: tuple[str, ...] = ("127.0.0.1:50051",)  # gRPC target strings, one client each
    concurrency: int | None = None  # requests in flight per target; None: from GetModelInfo
    limit: int | None = None  # make at most the first N images of the plan (expansion order)
    timeout_s: float = 300.0  # deadline of one request
    retries: int = 4  # the SDK's retries of a request (UNAVAILABLE, RESOURCE_EXHAUSTED); 0: none
    progress: bool = True  # tqdm bar on stderr
    contact_sheets: bool = True  # DIR/contact/*.png (needs Pillow)
    secure: bool = False  # TLS with the system's roots
    root_certificates: bytes | None = field(default=None, repr=False)  # PEM roots to trust (implies TLS)
    client_cert: bytes | None = field(default=None, repr=False)  # mTLS: PEM chain, with client_key
    client_key: bytes | None = field(default=None, repr=False)  # mTLS: its PEM private key
    token: str | None = field(default=None, repr=False)  # bearer token; None: $LCMSERVE_TOKEN, if set
    client_options: tuple[tuple[str, Any], ...] = ()  # more AsyncClient keyword arguments, as pairs; they win
    shard: tuple[int, int] | None = None  # (index, count): make only this shard's images (shards.py)


@dataclass(frozen=True)
class Failure:
    """A request that failed after its retries: its images are left for the next run."""

    file_names: tuple[str, ...]
    code: str  # gRPC status code name, or an exception's class name
    detail: str


@dataclass(frozen=True)
class DatasetReport:
    """What a run did and what the folder holds after it."""

    out: Path
    planned: int  # images of the whole spec
    done: int  # images in the folder now
    generated: int  # made by this run
    skipped: int  # already there (sha256 checked)
    removed: int  # stale files of an older spec removed
    failures: tuple[Failure, ...]
    counts: dict[str, int]  # images per split in the folder
    concurrency: int  # requests in flight, all targets together
    generate_s: float  # from the first request sent to the last image written
    wall_s: float  # the whole run
    contact_sheets: int  # sheets written by this run
    warnings: tuple[str, ...] = field(default=())
    limit: int | None = None  # --limit: this run was asked for the first N images of the plan only
    rejected: int = 0  # best-of-N, on_fail: skip: images left out for good (rejected.jsonl)
    shard: tuple[int, int] | None = None  # (index, count) of a --shard run; planned is the shard's
    below: int = 0  # best-of-N with min_score: images of this run below it after max_rounds (kept or left out)
    retried: int = 0  # best-of-N with min_score: images of this run that took more than one round

    @property
    def complete(self) -> bool:
        """Every planned image is in the folder (or, on_fail: skip, left out for good)."""
        return self.done + self.rejected == self.planned

    @property
    def images_per_s(self) -> float:
        """Images made by this run per second of generate_s."""
        return self.generated / self.generate_s if self.generate_s > 0 else 0.0

    def summary(self) -> str:
        """A few lines for the end of the CLI's output."""
        splits = ", ".join(f"{name} {n}" for name, n in self.counts.items())
        shard = f" of shard {self.shard[0]}/{self.shard[1]}" if self.shard is not None else ""
        rejected = f"; {self.rejected} left out below min_score (rejected.jsonl)" if self.rejected else ""
        lines = [
            f"{self.out}: {self.done} of {self.planned} images{shard} ({splits}){rejected}",
            f"this run: generated {self.generated} in {self.generate_s:.1f} s ({self.images_per_s:.2f} "
            f"images/s at concurrency {self.concurrency}), skipped {self.skipped} already done, "
            f"{len(self.failures)} requests failed; wall {self.wall_s:.1f} s",
        ]
        if self.below or self.retried:
            lines.append(f"min_score: {self.retried} images took more than one round, {self.below} stayed below it "
                         f"({'left out' if self.rejected else 'kept with passed: false'})")
        if self.removed:
            lines.append(f"removed {self.removed} stale files (of another spec or a broken run)")
        for failure in self.failures[:5]:
            lines.append(f"failed: {', '.join(failure.file_names)}: {failure.code}: {failure.detail}")
        if len(self.failures) > 5:
            lines.append(f"... and {len(self.failures) - 5} more failed requests")
        if not self.complete and self.limit is not None and not self.failures:
            lines.append(f"--limit {self.limit}: the first {min(self.limit, self.planned)} images of the plan are "
                         f"done; run without --limit (or with a larger one) to make the other "
                         f"{self.planned - self.done}")
        elif not self.complete:
            lines.append("not complete: rerun the same command to make the rest")
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)


@dataclass(frozen=True)
class _Request:
    images: tuple[PlannedImage, ...]  # consecutive seeds of one expanded prompt


def _requests(todo: list[PlannedImage], per_request: int) -> Iterator[_Request]:
    """Groups images into requests: runs of consecutive seeds of one expanded prompt."""
    run: list[PlannedImage] = []
    for image in todo:
        if run and (image.prompt_id != run[-1].prompt_id or image.seed != run[-1].seed + 1
                    or image.init_image != run[-1].init_image or len(run) == per_request):
            yield _Request(tuple(run))
            run = []
        run.append(image)
    if run:
        yield _Request(tuple(run))


def _options(spec: DatasetSpec) -> GenerateOptions:
    """The options every request shares; the seed, count, size, adapters and init/mask images are
    per request; ``candidates`` only when it is more than 1 (a server older than it still serves the rest)."""
    extra: dict[str, Any] = {"candidates": spec.per_image} if spec.per_image > 1 else {}
    return GenerateOptions(
        num_inference_steps=spec.num_inference_steps,
        guidance_scale=spec.guidance_scale,
        output_format=spec.format,
        quality=spec.quality,
        **extra,
    )


class _Job:
    """One run: the clients, the store, the work list and the counters."""

    def __init__(self, spec: DatasetSpec, plan: Plan, store: Store, config: JobConfig) -> None:
        self.spec = spec
        self.plan = plan
        self.store = store
        self.config = config
        self.base = _options(spec)
        self.failures: list[Failure] = []
        self.generated = 0
        self.rejected = 0
        self.below = 0  # images below min_score after max_rounds
        self.retried = 0  # images that took more than one round
        self.sheets: ContactSheets | None = None
        self._files: dict[Path, bytes] = {}  # init images and masks, read once
        self._by_prompt: dict[str, list[PlannedImage]] = {}
        for image in plan.images:
            self._by_prompt.setdefault(image.prompt_id, []).append(image)

    def _finished(self, image: PlannedImage) -> None:
        if self.sheets is not None:
            done = self.store.done
            self.sheets.finished(image.prompt_id,
                                 lambda: [(i, done[i.file_name]) for i in self._by_prompt[image.prompt_id]
                                          if i.file_name in done])

    def _read(self, path: Path) -> bytes:
        if path not in self._files:
            self._files[path] = path.read_bytes()
        return self._files[path]

    def options(self, request: _Request, seed: int | None = None) -> GenerateOptions:
        first = request.images[0]
        extra: dict[str, Any] = {"adapters": list(first.adapters)} if self.spec.uses_adapters else {}
        if first.init_image is not None:
            extra["init_image"] = self._read(first.init_image)
            if self.spec.strength is not None:
                extra["strength"] = self.spec.strength
        if first.mask is not None:
            extra["mask_image"] = self._read(first.mask)
        return dataclasses.replace(self.base, negative_prompt=first.negative_prompt,
                                   seed=first.seed if seed is None else seed,
                                   num_images=len(request.images), width=first.width, height=first.height,
                                   **extra)

    async def generate(self, client: AsyncClient, request: _Request) -> list[Image]:
        """The request's images, ordered by index. The SDK's generate() retries the whole request
        (UNAVAILABLE, RESOURCE_EXHAUSTED) with its seeds, even after step events came."""
        result = await client.generate(request.images[0].prompt, self.options(request),
                                       timeout=self.config.timeout_s)
        images = result.images  # ordered by index
        seeds = [image.seed for image in images]
        wanted = [image.seed for image in request.images]
        if seeds != wanted:
            raise LcmServeError(f"the server sent images with seeds {seeds}, asked for {wanted}", "PROTOCOL")
        return images

    async def best_of(self, client: AsyncClient, request: _Request) -> tuple[Image, Outcome]:
        """Best-of-N for one image: round r sends its K seeds from seed + r * K; stops at the first
        round whose best candidate reaches min_score; returns the best of all rounds (the smaller
        seed on a tie) and what was picked."""
        (planned,) = request.images
        k, min_score = self.spec.per_image, self.spec.min_score
        best: Image | None = None
        best_score: float | None = None
        rounds = 0
        for rounds in range(1, self.spec.max_rounds + 1):
            first = planned.seed + (rounds - 1) * k
            result = await client.generate(planned.prompt, self.options(request, first), timeout=self.config.timeout_s)
            (image,) = result.images
            if not first <= image.seed < first + k:
                raise LcmServeError(f"the server sent seed {image.seed}, not one of the candidates {first} to "
                                    f"{first + k - 1}", "PROTOCOL")
            score: float | None = getattr(image, "score", None)
            if best is None or (score is not None and (best_score is None or score > best_score)):
                best, best_score = image, score  # a later round wins only with a higher score
            if min_score is None or (score is not None and score >= min_score):
                break
        assert best is not None
        passed = None if min_score is None else best_score is not None and best_score >= min_score
        return best, Outcome(best.seed, best_score, rounds, passed)

    async def run_one(self, client: AsyncClient, request: _Request, bar: Any) -> None:
        """Sends one request and writes its images; a failure is recorded, not raised."""
        try:
            if self.spec.best_of_n:
                image, outcome = await self.best_of(client, request)
                self._picked(request.images[0], image, outcome, bar)
                return
            images = await self.generate(client, request)
        except LcmServeError as exc:
            self._fail(request, exc.code, exc.details or str(exc), bar)
            return
        except (ValueError, TypeError) as exc:  # refused by the SDK before sending
            self._fail(request, type(exc).__name__, str(exc), bar)
            return
        for planned, image in zip(request.images, images):
            self.store.write(planned, image.data)
            self.generated += 1
            bar.update(1)
            self._finished(planned)

    def _picked(self, planned: PlannedImage, image: Image, outcome: Outcome, bar: Any) -> None:
        self.below += outcome.passed is False
        self.retried += outcome.rounds > 1
        if outcome.passed is False and self.spec.on_fail == "skip":
            self.store.reject(planned, outcome)
            self.rejected += 1
        else:
            self.store.write(planned, image.data, outcome)
            self.generated += 1
        bar.update(1)
        self._finished(planned)

    def _fail(self, request: _Request, code: str, detail: str, bar: Any) -> None:
        self.failures.append(Failure(tuple(i.file_name for i in request.images), code, detail))
        bar.set_postfix(failed=len(self.failures), refresh=False)
        for planned in request.images:
            self._finished(planned)


def default_concurrency(limits_batch: int, spec: DatasetSpec, queue: int) -> int:
    """Requests in flight per target: two batches' worth (see the module's docstring)."""
    rows = (2 if spec.guidance_scale > 1 else 1) * spec.images_per_request  # per request
    return max(1, min(2 * limits_batch // rows, limits_batch + queue))


async def _model_info(client: AsyncClient, config: JobConfig) -> ModelInfo:
    """The server's GetModelInfo once it is SERVING. Raises UnavailableError at once where nothing
    answers (its message says what that most likely means), DeadlineExceededError when it is still
    not SERVING after _READY_S."""
    try:
        if await client.health_status(timeout=10) != "SERVING":
            await client.wait_until_ready(timeout=_READY_S)
        return await client.model_info(timeout=30)
    except UnavailableError as exc:
        tls = bool(config.secure or config.root_certificates or config.client_cert)
        hint = unavailable_hint(client.target, exc.details or str(exc), tls=tls,
                                client_cert=config.client_cert is not None)
        raise UnavailableError(f"{hint} ({exc})", exc.code, exc.details) from exc


async def run_async(spec: DatasetSpec | str | Path | Mapping[str, Any], out: str | Path,
                    config: JobConfig | None = None) -> DatasetReport:
    """Makes (or completes) the dataset of ``spec`` in ``out``; see ``run``. For notebooks whose
    event loop is running: ``report = await run_async(...)``."""
    started = time.perf_counter()
    config = config or JobConfig()
    if not config.targets:
        raise DatasetError("give at least one target")
    spec = spec if isinstance(spec, DatasetSpec) else load_spec(spec)
    check_sdk_supports(spec)
    full_plan = make_plan(spec)
    plan = full_plan if config.shard is None else shard_plan(full_plan, config.shard, spec.images_per_request)
    out = Path(out)
    connection: dict[str, Any] = dict(
        secure=config.secure, root_certificates=config.root_certificates, client_cert=config.client_cert,
        client_key=config.client_key, token=config.token, retries=config.retries,
    )
    connection.update(config.client_options)  # they win
    clients = [AsyncClient(t, **connection) for t in config.targets]
    try:
        infos = [await _model_info(client, config) for client in clients]
        models = [dataclasses.asdict(info) for info in infos]
        check_servers(spec, plan, config.targets, infos)
        store = Store(out, spec, plan)
        store.check_model(models, config.shard, scorer_of(infos[0]) if spec.best_of_n else None)
        store.scan()
        context = _Context(spec, full_plan, plan, store, config, models, scorer_of(infos[0]))
        write_manifest(out, context.manifest(None))  # the model, from the start
        wanted = plan.images[: config.limit] if config.limit is not None else plan.images
        settled = store.settled
        todo = [image for image in wanted if image.file_name not in settled]
        job = _Job(spec, plan, store, config)
        warnings: list[str] = []
        if config.contact_sheets:
            try:
                job.sheets = ContactSheets(out, todo)
            except ImportError as exc:
                warnings.append(f"no contact sheets: {exc}")
        per_request = min(spec.images_per_request, *(info.limits.max_images for info in infos))
        work = _requests(todo, per_request)
        slots = [config.concurrency or default_concurrency(info.limits.max_batch_size, spec,
                                                           info.limits.max_queued_requests)
                 for info in infos]
        bar = tqdm(total=len(todo), unit="img", desc="dataset", file=sys.stderr, disable=not config.progress,
                   dynamic_ncols=True)
        t0 = time.perf_counter()
        try:
            first = next(work, None)
            if first is not None:  # alone first: a request the server refuses fails the job once
                await job.run_one(clients[0], first, bar)
                if job.failures and job.failures[0].code not in ("UNAVAILABLE", "RESOURCE_EXHAUSTED"):
                    f = job.failures[0]
                    raise DatasetError(f"the first request failed: {f.code}: {f.detail}")

            async def worker(client: AsyncClient) -> None:
                for request in work:  # one iterator shared by every worker (one event loop)
                    await job.run_one(client, request, bar)

            await asyncio.gather(*(worker(c) for c, n in zip(clients, slots) for _ in range(n)))
        finally:
            bar.close()
            store.rewrite_metadata()  # plan order; also on Ctrl-C
            generate_s = time.perf_counter() - t0
            sheets = 0
            if job.sheets is not None:
                sheets = job.sheets.close((i, store.done[i.file_name]) for i in store.done_images())
        counts = store.counts()
        report = DatasetReport(
            out=out, planned=len(plan.images), done=len(store.done), generated=job.generated,
            skipped=len(wanted) - len(todo), removed=store.removed, failures=tuple(job.failures),
            counts=counts, concurrency=sum(slots), generate_s=generate_s,
            wall_s=time.perf_counter() - started, contact_sheets=sheets, warnings=tuple(warnings),
            limit=config.limit, rejected=len(store.rejected), shard=config.shard, below=job.below,
            retried=job.retried,
        )
        write_manifest(out, context.manifest(report))
        return report
    finally:
        for client in clients:
            await client.close()


@dataclass(frozen=True)
class _Context:
    """What dataset.json is made of (see docs/dataset.md)."""

    spec: DatasetSpec
    full_plan: Plan
    plan: Plan  # the shard's, or the full plan
    store: Store
    config: JobConfig
    models: list[dict[str, Any]]
    scorer: dict[str, Any] | None

    def manifest(self, report: DatasetReport | None) -> dict[str, Any]:
        """The content of dataset.json; ``report`` None while the run is going. ``runs`` counts the
        runs started on the folder; ``total_wall_s`` adds up the wall time of those that finished."""
        counts = self.store.counts()
        previous = self.store.previous
        runs, total = int(previous.get("runs") or 0), float(previous.get("total_wall_s") or 0.0)
        last_run = None if report is None else {
            "generated": report.generated, "skipped": report.skipped, "rejected": report.rejected,
            "failed_requests": len(report.failures), "concurrency": report.concurrency,
            "generate_s": round(report.generate_s, 3), "wall_s": round(report.wall_s, 3),
            "images_per_s": round(report.images_per_s, 3),
        }
        done = sum(counts.values()) + len(self.store.rejected)
        shard = self.config.shard
        return {
            "lcmserve_version": __version__,
            "spec": self.spec.as_json(),
            "targets": list(self.config.targets),
            "models": self.models,
            "scorer": self.scorer,
            "shard": None if shard is None else {"index": shard[0], "count": shard[1],
                                                  "spec_planned": len(self.full_plan.images)},
            "counts": counts,
            "images": sum(counts.values()),
            "rejected": len(self.store.rejected),
            "planned": len(self.plan.images),
            "complete": done == len(self.plan.images) and report is not None,
            "columns": list(self.store.row(self.full_plan.images[0], "", "" if self.spec.masks else None)),
            "runs": runs + 1,  # started, a killed one included (its wall time is lost with it)
            "total_wall_s": round(total + (report.wall_s if report is not None else 0.0), 3),
            "last_run": last_run,
        }


def run(spec: DatasetSpec | str | Path | Mapping[str, Any], out: str | Path,
        config: JobConfig | None = None, **options: Any) -> DatasetReport:
    """Makes (or completes) the dataset of ``spec`` (a YAML path, a mapping, or a DatasetSpec) in
    ``out`` and returns what it did. ``options`` are JobConfig fields (``targets=("host:port",)``,
    ``concurrency=8``, ``limit=100``...), changing ``config``. Rerun it to resume.

    Raises DatasetError for a bad spec or folder, LcmServeError when no server answers. Inside a
    running event loop (Jupyter), use ``await run_async(...)``.
    """
    config = dataclasses.replace(config or JobConfig(), **options)
    return asyncio.run(run_async(spec, out, config))
