"""Library noise that says nothing to an lcmserve user, silenced where lcmserve owns the process (the
server's engine process, `lcmserve export`), so that the lines that matter (`listening on ...`, the
export's summary) are not lost among them.

Each filter drops one known message, nothing else of its logger:
  - transformers: "`CLIPImageProcessor` requires torchvision (not installed); falling back to ..." (and
    the same for other image processors) when diffusers' pipeline module is imported: lcmserve uses no
    image processor (the safety checker's feature extractor is never loaded);
  - diffusers: "The config attributes {'block_out_channels': ...} were passed to AutoencoderTiny, but are
    not expected": AutoencoderTiny writes that key into every config.json it saves, then warns about it
    on loading (the tiny preset, and every tiny autoencoder diffusers saved);
  - torch.onnx's registry: "torchvision is not installed. Skipping torchvision::nms" (ops lcmserve never
    exports), and its step lines printed on stdout while it exports (`onnx_export_quietly`).
Loading progress bars (diffusers' "Loading pipeline components", transformers' "Loading weights") are
turned off in those processes too: a server's log is not a terminal, and the export shows its own bar.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator


class _DropMessages(logging.Filter):
    """Drops the records whose message contains one of `needles`."""

    def __init__(self, *needles: str) -> None:
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(needle in message for needle in self.needles)


_FILTERS: dict[str, _DropMessages] = {
    "transformers.utils.import_utils": _DropMessages("requires torchvision (not installed); falling back"),
    "diffusers.configuration_utils": _DropMessages("{'block_out_channels': "),
    "torch.onnx._internal.exporter._registration": _DropMessages("torchvision is not installed"),
}


def quiet_libraries(*, progress_bars: bool = False) -> None:
    """Install the filters of the module doc (once per logger) and, unless `progress_bars`, turn off
    diffusers' and transformers' loading bars. Idempotent; imports diffusers and transformers."""
    for name, drop in _FILTERS.items():
        logger = logging.getLogger(name)
        if drop not in logger.filters:
            logger.addFilter(drop)
    if not progress_bars:
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # untyped in transformers


@contextlib.contextmanager
def onnx_export_quietly() -> Iterator[None]:
    """Around torch.onnx.export: its step lines ("[torch.onnx] Obtain model graph...") go to a buffer
    instead of stdout, and its warnings about itself (unused dynamic-axis names, its pytree's deprecated
    LeafSpec) are not shown; an error still raises, the captured lines logged at debug level."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured), warnings.catch_warnings():
            for category in (UserWarning, FutureWarning, DeprecationWarning):  # torch's own, about itself
                warnings.simplefilter("ignore", category)
            yield
    finally:
        if captured.getvalue():
            logging.getLogger("lcmserve.export.compile").debug("torch.onnx said:\n%s", captured.getvalue().rstrip())
