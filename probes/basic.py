"""The ``basic`` measurement, and small helpers the probes share.

``basic``: per-head statistics of the scan's own prompts from the capture layer (first-token mass,
entropy, normalised entropy, max probability; see :data:`workbench.capture.STATISTICS`). Several
probes read it; it is computed once per scan. How a prompt is captured (pattern or streamed path,
and which of them by length) is :mod:`workbench.capture`'s business.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from workbench.capture import STATISTICS, head_statistics
from workbench.probe import Measurement, ScanContext

BASIC = "basic"


def basic_measurement(ctx: ScanContext) -> Measurement:
    token_ids = ctx.token_ids()
    return Measurement(
        key=BASIC,
        texts=list(ctx.prompts.texts),
        token_ids=token_ids,
        definitions=dict(STATISTICS),
        measure=lambda i: head_statistics(ctx.model, torch.as_tensor(token_ids[i]), path=ctx.path),
    )


def decode(tokenizer: Any, token_ids: np.ndarray) -> str:
    """The text of ``token_ids`` for the run file's ``texts`` (NUL characters, which random
    tokens can decode to and HDF5 strings cannot hold, become U+FFFD)."""
    return tokenizer.decode(token_ids).replace("\x00", "\ufffd")


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A float32 numpy copy of a (possibly GPU) tensor."""
    return t.detach().float().cpu().numpy()
