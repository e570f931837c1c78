"""The ``basic`` measurement: per-head statistics of the scan's own prompts from the capture layer
(first-token mass, entropy, normalised entropy, max probability; see
:data:`workbench.capture.STATISTICS`). Several probes read it; it is computed once per scan."""

from __future__ import annotations

import torch

from probes.base import Measurement, ScanContext
from workbench.capture import STATISTICS, head_statistics

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
