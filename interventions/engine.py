"""Apply intervention specs during a forward pass, on either capture path.

:class:`Intervener` runs a batch of equal-length prompts once per *group* of specs in a single
forward pass: the batch ``[b, seq]`` is tiled to ``[groups × b, seq]`` and each group's specs
touch only its own rows. Group 0 is usually the empty list (the clean run), so baseline,
intervention and random controls come out of one pass, and a head sweep puts one head per
group.

* ``path="pattern"`` (short prompts): TransformerLens hooks on the model's bridge,
  ``blocks.{l}.attn.hook_pattern [batch, head, q_pos, k_pos]`` for the pattern kinds and
  ``blocks.{l}.attn.hook_z [batch, q_pos, head, d_head]`` for the output kinds.
* ``path="streamed"`` (any length): the Hugging Face model with the attention function of
  :mod:`interventions.streamed`; the pattern kinds are computed in closed form.
* ``path="auto"``: :func:`workbench.capture.resolve_path` (pattern for short prompts).

Kinds that read another run (resample, patch_output, patch_pattern) name a prompt variant;
``sources`` maps that name to token ids shaped like the batch, and a clean forward pass over
them is recorded first (``z`` for the output kinds; the pattern, or q and k on the streamed
path, for patch_pattern). The variant ``shuffled`` is built here: each prompt reads the next
prompt of the batch. Mean ablation needs ``means`` (see :meth:`Intervener.mean_outputs`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from interventions import ops
from interventions.specs import Intervention, MeanAblation, PatchPattern, Redistribute, spec_source
from interventions.streamed import intervening
from workbench.capture import PATHS, AttentionCall, resolve_path
from workbench.errors import CaptureError, InterventionError, ShapeError
from workbench.models import Model

__all__ = ["PATHS", "Intervener", "RunOutput", "intervene"]
SHUFFLED = "shuffled"


@dataclass
class _Op:
    """One spec on one layer for one group of rows."""

    spec: Intervention
    rows: Tensor  # [R] rows of the tiled forward batch
    source_rows: Tensor  # [R] the same prompts' rows in the base batch (for recorded sources)
    heads: Tensor  # [H] query heads of this layer
    positions: Tensor  # [P] absolute query positions


@dataclass
class RunOutput:
    """``logits [groups, batch, keep, vocab]``; with ``delta=True`` also, per intervened
    layer, ``z_after − z_before`` at the kept positions ``[groups, batch, keep, head, d_head]``
    (the change each layer's intervention made to what its heads write; streamed path)."""

    logits: Tensor
    deltas: dict[int, Tensor] = field(default_factory=dict)


class Intervener:
    """Runs a model with groups of interventions. See the module docstring."""

    def __init__(self, model: Model, *, max_rows: int = 64) -> None:
        self.model = model
        self.max_rows = max_rows  # rows of one forward pass (groups × batch), memory bound

    # -- checks ------------------------------------------------------------------------------

    def _resolve(self, path: str, seq_len: int) -> str:
        """The capture path (:func:`workbench.capture.resolve_path`), except that models with
        latent attention take the streamed path: TransformerLens 4.x splits their per-head
        outputs (``hook_z``) wrongly."""
        resolved = resolve_path(path, seq_len)
        if resolved == "pattern" and self.model.latent_attention:
            if path == "auto":
                return "streamed"
            raise CaptureError(
                f"{self.model.info.architecture} uses multi-head latent attention, whose head "
                "outputs TransformerLens's bridge splits wrongly; use path='streamed' "
                "(--path streamed)"
            )
        return resolved

    def validate(self, specs: Iterable[Intervention]) -> None:
        """Raise `InterventionError` for heads outside the model."""
        info = self.model.info
        for spec in specs:
            for layer, head in spec.heads:
                if layer >= info.n_layers or head >= info.n_heads:
                    raise InterventionError(
                        f"{spec.kind}: head {layer}.{head} is outside {info.name} "
                        f"({info.n_layers} layers × {info.n_heads} heads)"
                    )

    # -- recording ---------------------------------------------------------------------------

    @torch.no_grad()
    def record(
        self, tokens: Tensor, layers: Iterable[int], *, path: str = "auto", attention: bool = False
    ) -> dict[int, dict[str, Tensor]]:
        """A clean forward pass of ``tokens [b, seq]``; per layer ``z [b, seq, head, d_head]`` and,
        with ``attention``, ``pattern [b, head, q, k]`` (pattern path) or post-RoPE ``q [b, head,
        seq, d]`` and ``k [b, kv_head, seq, d]`` (streamed path)."""
        tokens = self._check_tokens(tokens)
        layers = sorted(set(layers))
        path = self._resolve(path, tokens.shape[1])
        out: dict[int, dict[str, Tensor]] = {layer: {} for layer in layers}
        if path == "pattern":

            def keep(name: str):
                def hook(tensor: Tensor, hook) -> None:
                    out[int(hook.name.split(".")[1])][name] = tensor.detach().clone()

                return hook

            hooks = [(f"blocks.{layer}.attn.hook_z", keep("z")) for layer in layers]
            if attention:
                hooks += [
                    (f"blocks.{layer}.attn.hook_pattern", keep("pattern")) for layer in layers
                ]
            self.model.bridge().run_with_hooks(tokens, fwd_hooks=hooks)
        else:

            def work(call: AttentionCall, attn_out: Tensor) -> Tensor:
                z = attn_out.transpose(1, 2)  # [batch, seq, head, d_head]
                out[call.layer]["z"] = z.detach().clone()
                if attention:
                    out[call.layer]["q"] = call.query.detach().clone()
                    out[call.layer]["k"] = call.key.detach().clone()
                return z

            with intervening(self.model.hf, set(layers), work):
                self.model.hf(tokens, logits_to_keep=1)
        return out

    def mean_outputs(
        self, batches: Iterable[Tensor], layers: Iterable[int], *, path: str = "auto"
    ) -> dict[int, Tensor]:
        """Mean head output over every token of ``batches`` (each ``[b, seq]``): per layer
        ``[head, d_head]``, what mean ablation writes."""
        layers = sorted(set(layers))
        sums: dict[int, Tensor] = {}
        count = 0
        for tokens in batches:
            recorded = self.record(tokens, layers, path=path)
            for layer in layers:
                z = recorded[layer]["z"].double()  # [b, seq, head, d_head]
                sums[layer] = sums.get(layer, 0) + z.sum((0, 1))
            count += tokens.shape[0] * tokens.shape[1]
        if count == 0:
            raise InterventionError("mean ablation needs at least one reference prompt")
        return {layer: (s / count).float() for layer, s in sums.items()}

    # -- intervened forward ------------------------------------------------------------------

    @torch.no_grad()
    def run(
        self,
        tokens: Tensor,
        groups: Sequence[Sequence[Intervention]],
        *,
        sources: Mapping[str, Tensor] | None = None,
        means: Mapping[int, Tensor] | None = None,
        keep: int | None = None,
        path: str = "auto",
        delta: bool = False,
    ) -> RunOutput:
        """Logits of ``tokens [b, seq]`` under each group of specs.

        Args:
            groups: one list of specs per group (``[]`` = clean run).
            sources: prompt variants read by resample/patch kinds, each ``[b, seq]``.
            means: per layer ``[head, d_head]`` mean outputs for mean ablation.
            keep: keep the logits of the last ``keep`` positions only (None = all).
            delta: also return what each intervened layer changed (streamed path only).
        """
        tokens = self._check_tokens(tokens)
        batch, seq_len = tokens.shape
        path = self._resolve(path, seq_len)
        if delta and path != "streamed":
            raise InterventionError("delta recording runs on the streamed path")
        specs = [spec for group in groups for spec in group]
        self.validate(specs)
        for group in groups:
            _check_pattern_overlap(group)
        recorded = self._record_sources(tokens, specs, sources or {}, path)
        means = dict(means or {})
        for spec in specs:
            missing = [lay for lay in spec.layers if lay not in means]
            if isinstance(spec, MeanAblation) and missing:
                raise InterventionError(
                    f"mean ablation needs the mean outputs of layers {missing} "
                    "(Intervener.mean_outputs; evaluate() computes them from the task)"
                )
        per_chunk = max(1, self.max_rows // batch)
        logits, deltas = [], []
        for start in range(0, len(groups), per_chunk):
            chunk = groups[start : start + per_chunk]
            plan = self._plan(chunk, batch, seq_len)
            tiled = tokens.repeat(len(chunk), 1)
            if path == "pattern":
                out = self._run_pattern(tiled, plan, recorded, means)
                found: dict[int, Tensor] = {}
            else:
                out, found = self._run_streamed(tiled, plan, recorded, means, keep, delta)
            if keep is not None:
                out = out[:, -keep:]
            logits.append(out.reshape(len(chunk), batch, *out.shape[1:]))
            deltas.append(
                {lay: d.reshape(len(chunk), batch, *d.shape[1:]) for lay, d in found.items()}
            )
        merged = {}
        for layer in {lay for d in deltas for lay in d}:
            parts = []
            for chunk_deltas, chunk_logits in zip(deltas, logits, strict=True):
                if layer in chunk_deltas:
                    parts.append(chunk_deltas[layer])
                else:  # no group of this chunk touched the layer
                    g, b, k = chunk_logits.shape[:3]
                    info = self.model.info
                    parts.append(torch.zeros(g, b, k, info.n_heads, info.d_head))
            merged[layer] = torch.cat([p.to(parts[0].device) for p in parts])
        return RunOutput(torch.cat(logits), merged)

    # -- internals ---------------------------------------------------------------------------

    def _check_tokens(self, tokens: Tensor) -> Tensor:
        if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.numel() == 0:
            shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
            raise ShapeError(f"tokens must be a non-empty [batch, seq] tensor, got {shape}")
        return tokens.to(self.model.device)

    def _record_sources(
        self,
        tokens: Tensor,
        specs: list[Intervention],
        sources: Mapping[str, Tensor],
        path: str,
    ) -> dict[str, dict[int, dict[str, Tensor]]]:
        needed: dict[str, tuple[set[int], bool]] = {}
        for spec in specs:
            name = spec_source(spec)
            if name is None:
                continue
            layers, attention = needed.get(name, (set(), False))
            needed[name] = (layers | set(spec.layers), attention or isinstance(spec, PatchPattern))
        recorded = {}
        for name, (layers, attention) in needed.items():
            if name == SHUFFLED and name not in sources:
                if tokens.shape[0] < 2:
                    raise InterventionError("the 'shuffled' source needs a batch of >= 2 prompts")
                variant = tokens.roll(1, 0)
            elif name in sources:
                variant = sources[name]
            else:
                have = ", ".join([*sources, SHUFFLED])
                raise InterventionError(
                    f"a spec reads the prompt variant {name!r}, which this task does not provide "
                    f"(available: {have})"
                )
            if tuple(variant.shape) != tuple(tokens.shape):
                raise ShapeError(
                    f"prompt variant {name!r} is {tuple(variant.shape)}, the batch is "
                    f"{tuple(tokens.shape)}: a source must align token by token"
                )
            recorded[name] = self.record(variant, layers, path=path, attention=attention)
        return recorded

    def _plan(
        self, groups: Sequence[Sequence[Intervention]], batch: int, seq_len: int
    ) -> dict[int, list[_Op]]:
        device = self.model.device
        plan: dict[int, list[_Op]] = {}
        for g, group in enumerate(groups):
            rows = torch.arange(g * batch, (g + 1) * batch, device=device)
            source_rows = torch.arange(batch, device=device)
            for spec in group:
                positions = self._positions(spec, seq_len)
                if isinstance(spec, Redistribute):
                    spec.check_keys(seq_len)
                for layer in spec.layers:
                    heads = torch.tensor(spec.heads_in(layer), device=device)
                    op = _Op(spec, rows, source_rows, heads, positions)
                    plan.setdefault(layer, []).append(op)
        for layer, layer_ops in plan.items():  # pattern kinds first, each class in list order
            plan[layer] = sorted(layer_ops, key=lambda op: op.spec.acts_on != "pattern")
        return plan

    def _positions(self, spec: Intervention, seq_len: int) -> Tensor:
        if spec.positions is None:
            return torch.arange(seq_len, device=self.model.device)
        resolved = [p + seq_len if p < 0 else p for p in spec.positions]
        bad = [p for p, r in zip(spec.positions, resolved, strict=True) if not 0 <= r < seq_len]
        if bad:
            raise InterventionError(
                f"{spec.kind}: positions {bad} outside a {seq_len}-token prompt"
            )
        return torch.tensor(sorted(set(resolved)), device=self.model.device)

    def _apply_outputs(
        self, z: Tensor, layer: int, layer_ops: list[_Op], recorded, means
    ) -> Tensor:
        """Output kinds on ``z [rows, q_pos, head, d_head]`` (cloned when touched)."""
        touched = False
        for op in layer_ops:
            if op.spec.acts_on != "output":
                continue
            if not touched:
                z, touched = z.clone(), True
            index = (op.rows[:, None, None], op.positions[None, :, None], op.heads[None, None, :])
            source = None
            if (name := spec_source(op.spec)) is not None:
                src = recorded[name][layer]["z"]
                source = src[op.source_rows[:, None, None], index[1], index[2]]
            mean = means[layer][op.heads] if isinstance(op.spec, MeanAblation) else None
            z[index] = ops.new_output(op.spec, z[index], source=source, mean=mean).to(z.dtype)
        return z

    def _run_pattern(self, tokens: Tensor, plan, recorded, means) -> Tensor:
        causal = self.model.info.causal

        def on_pattern(pattern: Tensor, hook) -> Tensor:  # [batch, head, q_pos, k_pos]
            layer = int(hook.name.split(".")[1])
            pattern = pattern.clone()
            for op in plan[layer]:
                if op.spec.acts_on != "pattern":
                    continue
                block = pattern[op.rows][:, op.heads]  # [R, H, q_pos, k_pos]
                source = None
                if isinstance(op.spec, PatchPattern):
                    ref = recorded[op.spec.source][layer]["pattern"]
                    source = ref[op.source_rows][:, op.heads]
                new = ops.new_pattern(op.spec, block, causal=causal, source=source)
                index = (op.rows[:, None, None], op.heads[None, :, None], op.positions[None, None])
                pattern[index] = new[:, :, op.positions].to(pattern.dtype)
            return pattern

        def on_z(z: Tensor, hook) -> Tensor:  # [batch, q_pos, head, d_head]
            layer = int(hook.name.split(".")[1])
            return self._apply_outputs(z, layer, plan[layer], recorded, means)

        hooks = []
        for layer, layer_ops in plan.items():
            kinds = {op.spec.acts_on for op in layer_ops}
            if "pattern" in kinds:
                hooks.append((f"blocks.{layer}.attn.hook_pattern", on_pattern))
            if "output" in kinds:
                hooks.append((f"blocks.{layer}.attn.hook_z", on_z))
        return self.model.bridge().run_with_hooks(tokens, fwd_hooks=hooks)

    def _run_streamed(
        self, tokens: Tensor, plan, recorded, means, keep: int | None, delta: bool
    ) -> tuple[Tensor, dict[int, Tensor]]:
        group = self.model.info.group_size
        deltas: dict[int, Tensor] = {}

        def work(call: AttentionCall, attn_out: Tensor) -> Tensor:
            # q [batch, head, seq, d], k/v [batch, kv_head, seq, d], attn_out [batch, head, seq, d]
            layer, q, k, v = call.layer, call.query, call.key, call.value
            before = attn_out.transpose(1, 2)
            out = attn_out
            for op in plan[layer]:
                if op.spec.acts_on != "pattern":
                    continue
                if not call.plain:
                    raise InterventionError(
                        f"{op.spec.kind} recomputes attention in closed form, which the "
                        f"{type(call.module).__name__} layer {layer} cannot take (local window, "
                        "chunks, softcap or learned sinks); output kinds (zero, mean, resample, "
                        "scale, patch) work on every layer"
                    )
                if out is attn_out:
                    out = attn_out.clone()
                kv = op.heads // group
                source_qk = None
                if isinstance(op.spec, PatchPattern):
                    ref = recorded[op.spec.source][layer]
                    source_qk = (ref["q"][op.source_rows][:, op.heads],
                                 ref["k"][op.source_rows][:, kv])  # fmt: skip
                new = ops.new_attention_output(
                    op.spec, q[op.rows][:, op.heads], k[op.rows][:, kv], v[op.rows][:, kv],
                    causal=call.causal, scale=call.scale, source_qk=source_qk,
                )  # fmt: skip  # [R, H, seq, d]
                index = (op.rows[:, None, None], op.heads[None, :, None], op.positions[None, None])
                out[index] = new[:, :, op.positions].to(out.dtype)
            z = self._apply_outputs(out.transpose(1, 2), layer, plan[layer], recorded, means)
            if delta:
                tail = slice(-keep, None) if keep else slice(None)
                deltas[layer] = (z[:, tail] - before[:, tail]).float()
            return z

        with intervening(self.model.hf, set(plan), work):
            logits = self.model.hf(tokens, logits_to_keep=keep or 0).logits
        return logits, deltas


def _check_pattern_overlap(group: Sequence[Intervention]) -> None:
    """Two pattern kinds on one head do not compose the same way on both paths (the streamed
    forms start from q, k, v); refuse the combination instead of answering differently."""
    seen: dict[tuple[int, int], str] = {}
    for spec in group:
        if spec.acts_on != "pattern":
            continue
        for head in spec.heads:
            if head in seen:
                raise InterventionError(
                    f"head {head[0]}.{head[1]} gets two attention-pattern interventions "
                    f"({seen[head]} and {spec.kind}); give each head at most one"
                )
            seen[head] = spec.kind


def intervene(
    model: Model,
    tokens: Tensor | str,
    interventions: Sequence[Intervention] | Intervention,
    *,
    sources: Mapping[str, Tensor] | None = None,
    means: Mapping[int, Tensor] | None = None,
    keep: int | None = None,
    path: str = "auto",
) -> Tensor:
    """Logits of ``tokens`` (text, ``[seq]`` or ``[batch, seq]``) with ``interventions`` applied:
    ``[batch, seq | keep, vocab]``. ``sources``/``means`` as for :meth:`Intervener.run`."""
    if isinstance(tokens, str):
        tokens = model.tokenize(tokens)
    if isinstance(tokens, Tensor) and tokens.ndim == 1:
        tokens = tokens[None]
    specs = [interventions] if isinstance(interventions, Intervention) else list(interventions)
    out = Intervener(model).run(tokens, [specs], sources=sources, means=means, keep=keep,
                                path=path)  # fmt: skip
    return out.logits[0]
