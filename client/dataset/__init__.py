"""lcmserve.dataset: a labelled image dataset from one YAML spec, made by lcmserve servers.

    from lcmserve.dataset import run

    report = run("examples/cracks.yaml", "data/cracks", targets=("127.0.0.1:50051",))
    print(report.summary())

The same job as ``lcmserve dataset SPEC.yaml --target HOST:PORT --out DIR``: expand prompt
templates, give every image a stable seed and split, keep the servers' batches full, write the
Hugging Face imagefolder layout (``datasets.load_dataset("imagefolder", data_dir=DIR)``), resume
after an interruption, draw contact sheets. Spec reference and layout: docs/dataset.md.

Needs the plain install plus PyYAML for YAML specs (a mapping works without it), and Pillow for
contact sheets only. No torch.
"""

from .job import DatasetReport, Failure, JobConfig, run, run_async
from .keep import keep
from .plan import Plan, PlannedImage, make_plan
from .spec import DatasetError, DatasetSpec, PromptSpec, load_spec, parse_spec

__all__ = [
    "DatasetError",
    "DatasetReport",
    "DatasetSpec",
    "Failure",
    "JobConfig",
    "Plan",
    "PlannedImage",
    "PromptSpec",
    "keep",
    "load_spec",
    "make_plan",
    "parse_spec",
    "run",
    "run_async",
]
