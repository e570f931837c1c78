"""First-token attention sinks (Gu et al., "When Attention Sink Emerges in Language Models",
repo sail-sg/Attention-Sink).

For key k, α_k = mean over the queries i >= k that can see it of A[i, k]. A head has a sink at k
when α_k > ε with ε = 0.3. Gu et al. report k = first token, as the share of (layer, head) pairs
averaged over samples. Here the score of a head is α_first averaged over prompts, and the head is
labelled ``sink`` when that exceeds ε. (In a causal model every query sees the first token, so
α_first is the mean of A[i, 0] over all queries; in a bidirectional model likewise.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from probes.base import Measurement, ScanContext
from probes.basic import BASIC, basic_measurement
from workbench.scores import ScoreTable


@dataclass(frozen=True)
class FirstTokenSinkProbe:
    epsilon: float = 0.3
    name: str = "sink"

    def measurements(self, ctx: ScanContext) -> list[Measurement]:
        return [basic_measurement(ctx)]

    def score(self, stats: dict[str, dict[str, np.ndarray]]) -> list[ScoreTable]:
        alpha = stats[BASIC]["first_token_mass"]  # [n_prompts, n_layers, n_heads]
        table = ScoreTable(
            name=self.name,
            values=alpha.mean(axis=0),
            definition="first-token sink: alpha_1 = mean over queries of the attention on the "
            "first token, averaged over prompts; sink when alpha_1 > epsilon (Gu et al. 2024)",
            threshold=self.epsilon,
            label="sink",
            parameters={
                "epsilon": self.epsilon,
                "sink_token": 0,
                "sink_rate_per_prompt": float((alpha > self.epsilon).mean()),
            },
        )
        return [table]
