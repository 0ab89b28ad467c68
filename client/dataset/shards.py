"""Shards: one spec made by N independent jobs (``--shard I/N``), then merged into one folder.

An image belongs to shard ``int(sha256("shard:<key>")[:8], big-endian) % N``, where its key is
``<prompt_id>-<k // images_per_request>`` (the request it travels in; its file name's stem when
images_per_request is 1). The hash is sha256, not Python's hash() (salted per process), so every
pod computes the same shards: they are disjoint, cover the plan, and each resumes on its own. A
shard folder is an ordinary dataset folder holding only its shard's images; its dataset.json says
which shard it is (``shard: {index, count}``), so a rerun cannot mix shards in one folder.

``--shard auto/N`` takes I from $JOB_COMPLETION_INDEX, which a Kubernetes Indexed Job sets in each
pod (deploy/kubernetes/dataset-job/).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping

from .plan import Plan, PlannedImage
from .spec import DatasetError

INDEX_VARIABLE = "JOB_COMPLETION_INDEX"
MAX_SHARDS = 100_000  # a Kubernetes Indexed Job allows up to 100000 completions with backoffLimitPerIndex
_SHARD = re.compile(r"\s*(\w+)\s*/\s*(\w+)\s*\Z")


def parse_shard(text: str, environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``I/N`` or ``auto/N`` (I from $JOB_COMPLETION_INDEX) -> (index, count). Raises DatasetError
    naming --shard and what is wrong."""
    environ = os.environ if environ is None else environ
    match = _SHARD.match(text)
    if match is None:
        raise DatasetError(f"--shard {text!r}: expected I/N (e.g. 0/4) or auto/N")
    index_text, count_text = match.groups()
    if not count_text.isdigit() or not 1 <= int(count_text) <= MAX_SHARDS:
        raise DatasetError(f"--shard {text}: N must be an integer from 1 to {MAX_SHARDS}, got {count_text!r}")
    count = int(count_text)
    if index_text == "auto":
        if INDEX_VARIABLE not in environ:
            raise DatasetError(f"--shard {text}: ${INDEX_VARIABLE} is not set (a Kubernetes Indexed Job sets it "
                               f"in each pod); outside one, give the index: --shard 0/{count}")
        index_text = environ[INDEX_VARIABLE].strip()
        source = f" (${INDEX_VARIABLE}={environ[INDEX_VARIABLE]!r})"
    else:
        source = ""
    if not index_text.isdigit() or not 0 <= int(index_text) < count:
        raise DatasetError(f"--shard {text}{source}: I must be an integer from 0 to {count - 1}, got {index_text!r}")
    return int(index_text), count


def shard_of(image: PlannedImage, count: int, images_per_request: int) -> int:
    """The shard that makes ``image`` (see the module's docstring)."""
    key = f"{image.prompt_id}-{image.image_index // images_per_request}"
    digest = hashlib.sha256(f"shard:{key}".encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big") % count


def shard_plan(plan: Plan, shard: tuple[int, int], images_per_request: int) -> Plan:
    """The images of shard ``(index, count)``, in plan order."""
    index, count = shard
    return plan.subset(tuple(i for i in plan.images if shard_of(i, count, images_per_request) == index))
