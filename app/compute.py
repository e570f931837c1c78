"""Model work for the explorer: one loaded copy of each model per server process, and one
forward pass per prompt and layer for every view of it.

:class:`ModelPool` loads the model a run was made with (from the run's model identity) the first
time a page needs it, warms it up with one short forward pass, and keeps it; every later request
and background job of the same server process reuses it. Forward passes that install hooks or
swap the attention function take the model's lock, so two browser tabs never interleave their
hooks on one model.

The Head page's views of one layer on one prompt come from :func:`layer_forward`, cached by
(model, token ids, layer, query window) in :class:`ForwardCache`:

* per-position statistics of every head of the layer (first-token mass, entropy, the
  :data:`TOP_KEYS` keys each query attends to most with their weights, attention received per
  key) from the streamed path (:class:`workbench.capture.StreamedRecorder` and
  :func:`kernels.top_keys`): no L×L matrix, any length;
* the exact pattern rows of a window of at most :data:`PATTERN_WINDOW` queries, every head of
  the layer, from the pattern path (:func:`workbench.capture.run_with_patterns`; the whole
  prompt when it is that short), when :func:`workbench.capture.resolve_path` picks the pattern
  path for the prompt's length;
* what each head writes, as the unembedding reads it (:attr:`LayerForward.writes`): direct logit
  attribution per position is ``writes[head] @ W_U`` (:func:`logit_attribution`).

Switching heads within a layer, or hovering tokens, needs no new forward pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

import workbench
from kernels import top_keys
from workbench.capture import (
    AttentionCall,
    QueryLayout,
    StreamedRecorder,
    resolve_path,
    run_with_patterns,
)
from workbench.errors import CaptureError, ModelLoadError, WorkbenchError
from workbench.models import Model, ModelInfo
from workbench.store import check_run_model
from workbench.tasks import get_task

# Above this many tokens the browser gets no full pattern, only the rows of a query window.
PATTERN_WINDOW = 64
# Keys per query the kernels report (kernels.top_keys) for the queries outside that window.
TOP_KEYS = 4
WARM_UP_TEXT = "The first forward pass of a model initialises what later passes reuse."


def model_spec(info: ModelInfo) -> str:
    """The :func:`workbench.load` spec that reloads the model a run was made with."""
    if info.source in ("builtin", "toy", "hub"):
        return info.name
    if info.source == "local":
        return info.revision  # the resolved directory (see workbench.models._load_path)
    raise ModelLoadError(
        f"the run's model {info.name!r} came from a {info.source} file whose path the run does "
        "not record; scan from a Hugging Face directory or a built-in model to use model views"
    )


class ModelPool:
    """Models loaded once per server process, keyed by their run identity."""

    def __init__(self, device: str | None = None) -> None:
        self.device = device
        self._models: dict[tuple[str, str], Model] = {}
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._guard = threading.Lock()
        self.loads = 0  # how many times a model was actually loaded (the UI shows it)

    def get(self, info: ModelInfo) -> Model:
        """The model of a run; loads it on first use. Raises a WorkbenchError if it cannot be
        loaded or is not the model the run was made with
        (:func:`workbench.store.check_run_model`)."""
        key = (model_spec(info), info.config_hash)
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:  # one load per model even when two requests ask at once
            if key not in self._models:
                model = workbench.load(key[0], device=self.device)
                check_run_model(info, model.info, f"the run (its model reloaded from {key[0]!r})")
                # the first pass through each capture path initialises it (seconds on a CPU:
                # the TransformerLens bridge, the attention swap); pay that here, once, not on
                # the first pattern a user asks for
                warm_up = model.tokenize(WARM_UP_TEXT)
                run_with_patterns(model, warm_up, lambda *_: None)
                layer_positions(model, warm_up, 0)
                self._models[key] = model
                self.loads += 1
            return self._models[key]

    def lock(self, info: ModelInfo) -> threading.Lock:
        """Held around forward passes that hook or patch the model."""
        key = (model_spec(info), info.config_hash)
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def loaded(self) -> list[str]:
        return sorted(model.info.name for model in self._models.values())


_POOL = ModelPool()


def configure(device: str | None) -> None:
    """Set the device models of this server process load on (before any is loaded)."""
    global _POOL, _FORWARDS, _SURVEYS
    _POOL = ModelPool(device)
    _FORWARDS = ForwardCache()
    _SURVEYS = SurveyCache()


def pool() -> ModelPool:
    return _POOL


def server_threads(cores: int, pool_size: int, omp_num_threads: str | None) -> int:
    """How many intra-op threads PyTorch gets in the explorer's server process.

    ``cores``: the CPUs this process may run on; ``pool_size``: the threads PyTorch would use
    (``torch.get_num_threads()``, by default one per core); ``omp_num_threads``: the
    ``OMP_NUM_THREADS`` environment variable, which wins when set (the user's choice).
    Otherwise one core is left to the rest of the server and the browser: ``cores - 1``, at
    least 1, never more than ``pool_size``.

    Why: PyTorch's pool runs every operation of a forward pass on all its threads and waits for
    the last one at the end of each. In the server those threads share the cores with Flask's
    request threads (the Head page polls its job every 250 ms), with the job's progress writes
    and usually with the browser, so on a small machine one of them is often descheduled and the
    others wait for it. On the 2-core CPU machine the server's work for a new 64-token SmolLM2
    prompt took up to 10.6 s with two threads and at most 1.2 s with one, while the same pass
    alone in a worker thread took 0.7-0.8 s with two and 0.6-0.7 s with one (docs/explorer.md,
    *Speed*).
    """
    if omp_num_threads and omp_num_threads.strip():
        return pool_size
    return max(1, min(pool_size, cores - 1))


def use_server_threads() -> int:
    """Apply :func:`server_threads` to this process (before any job thread starts: each thread
    takes PyTorch's setting on its first parallel operation); returns the number of threads."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = server_threads(cores or 1, torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS"))
    torch.set_num_threads(threads)
    return threads


# Per-position statistics a head can be ranked by across prompts: name -> (query or key, what
# it is). The query ones are the terms whose mean over a prompt's queries is the run's
# statistic of the same name (workbench.capture.STATISTICS).
POSITION_STATISTICS: dict[str, tuple[str, str]] = {
    "first_token_mass": ("query", "A[i, 0]: the attention query i gives the first token"),
    "max_prob": ("query", "max_j A[i, j]: the largest weight of query i"),
    "entropy": ("query", "-sum_j A[i, j] log A[i, j]: how spread query i's attention is (nats)"),
    "normalized_entropy": ("query", "entropy_i / log(keys i sees): 1 = uniform, 0 = one key"),
    "received_rate": ("key", "sum_i A[i, k] / (queries that see k): the attention key k receives"),
}


@dataclass
class PositionStats:
    """One head's statistics along the positions of one prompt (any length), from the kernels."""

    first_token_mass: np.ndarray  # [q_pos]: A[i, 0]
    entropy: np.ndarray  # [q_pos]: -sum_j A[i, j] log A[i, j] (nats)
    # [q_pos, TOP_KEYS]: the keys each query attends to most, largest weight first, and those
    # weights A[i, key]; -1 and 0 where a query sees fewer keys (kernels.top_keys)
    attended_keys: np.ndarray
    attended_weights: np.ndarray
    received: np.ndarray  # [k_pos]: sum_i A[i, k] (column sums)
    received_rate: np.ndarray  # [k_pos]: received / number of queries that see key k
    visible: np.ndarray  # [q_pos]: how many keys query i sees (the layer's mask)
    seen_by: np.ndarray  # [k_pos]: how many queries see key k

    @property
    def max_prob(self) -> np.ndarray:
        """[q_pos]: the largest weight of each query."""
        return self.attended_weights[:, 0]

    @property
    def argmax(self) -> np.ndarray:
        """[q_pos]: the key each query attends to most (ties: the earlier key)."""
        return self.attended_keys[:, 0]

    def attended(self, query: int) -> list[tuple[int, float]]:
        """(key, weight) of the keys ``query`` attends to most, largest first."""
        keys, weights = self.attended_keys[query], self.attended_weights[query]
        return [(int(k), float(w)) for k, w in zip(keys, weights, strict=True) if k >= 0]

    def top_keys(self, k: int = 10) -> list[tuple[int, float, float]]:
        """(position, received rate, column sum) of the ``k`` keys with the highest rate."""
        order = np.argsort(-self.received_rate, kind="stable")[:k]
        return [(int(p), float(self.received_rate[p]), float(self.received[p])) for p in order]

    def top_queries(self, k: int = 10) -> list[tuple[int, list[tuple[int, float]]]]:
        """(query, :meth:`attended`) of the ``k`` most focused queries (largest weight)."""
        order = np.argsort(-self.max_prob, kind="stable")[:k]
        return [(int(q), self.attended(int(q))) for q in order]

    def values(self, statistic: str) -> np.ndarray:
        """One of :data:`POSITION_STATISTICS` at every position (query or key), NaN where a
        position says nothing about the head: a query that sees a single key gives it all its
        weight whatever the head does, and a key seen by a single query is one weight, not a
        rate."""
        informative = self.visible >= 2
        if statistic == "first_token_mass":
            values = self.first_token_mass
        elif statistic == "max_prob":
            values = self.max_prob
        elif statistic == "entropy":
            values = self.entropy
        elif statistic == "normalized_entropy":
            values = self.entropy / np.log(np.maximum(self.visible, 2))
        elif statistic == "received_rate":
            values, informative = self.received_rate, self.seen_by >= 2
        else:
            raise WorkbenchError(
                f"no per-position statistic {statistic!r}; choose one of "
                f"{', '.join(POSITION_STATISTICS)}"
            )
        return np.where(informative, values, np.nan).astype(np.float64)


def _blocks(model: Model) -> tuple[torch.nn.Module, str, torch.nn.ModuleList]:
    """(parent, attribute, the ModuleList of the model's n_layers transformer blocks)."""
    for name, module in model.hf.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == model.info.n_layers:
            parent, _, attribute = name.rpartition(".")
            return (model.hf.get_submodule(parent) if parent else model.hf), attribute, module
    raise ModelLoadError(f"cannot find the {model.info.n_layers} blocks of {model.info.name}")


@contextlib.contextmanager
def first_blocks(
    model: Model, n: int, on_block: Callable[[int, int], None] | None = None
) -> Iterator[None]:
    """Run only the first ``n`` transformer blocks (layer n-1's attention needs nothing after
    it); ``on_block(i, n)`` is called before block i (progress, and where a job is cancelled).
    Hold the model's lock: the block list is swapped for the duration."""
    parent, attribute, blocks = _blocks(model)
    kept = torch.nn.ModuleList(list(blocks)[:n])
    hooks = []
    if on_block is not None:
        for i, block in enumerate(kept):
            hooks.append(block.register_forward_pre_hook(lambda *_, i=i: on_block(i, n)))
    setattr(parent, attribute, kept)
    try:
        yield
    finally:
        setattr(parent, attribute, blocks)
        for hook in hooks:
            hook.remove()


@torch.no_grad()
def layer_positions(
    model: Model,
    token_ids: torch.Tensor,
    layer: int,
    on_block: Callable[[int, int], None] | None = None,
) -> list[PositionStats]:
    """Streamed per-position statistics of every head of ``layer`` (``token_ids: [seq]``), one
    :class:`PositionStats` per head; no L×L tensor. Only blocks 0..layer run; ``on_block``
    reports each (see :func:`first_blocks`). The keys each query attends to most come from
    :func:`kernels.top_keys` on the layer's own post-RoPE queries and keys, with the row
    log-sum-exp the statistics pass computed."""
    calls: dict[int, AttentionCall] = {}

    def keep_call(at: int, call: AttentionCall, _output: torch.Tensor) -> None:
        if at == layer:
            calls[at] = call

    with (
        first_blocks(model, layer + 1, on_block),
        StreamedRecorder(model.hf, sink_size=1, received=True, on_attention=keep_call) as recorder,
    ):
        model.hf(token_ids[None].to(model.device), use_cache=False)
    stats = recorder.stats[layer]  # fields [batch, n_heads, q_pos]
    call = calls[layer]
    weights, keys = top_keys(
        call.query, call.key, stats.lse, k_top=TOP_KEYS, **call.kernel_options()
    )  # [batch, n_heads, q_pos, TOP_KEYS] each
    weights, keys = weights[0].float().cpu().numpy(), keys[0].cpu().numpy()
    received = recorder.received[layer][0].float().numpy()  # [n_heads, k_pos]
    mask = recorder.masks[layer]  # the layer's own window or chunk, as the kernels saw it
    layout = QueryLayout.from_mask(
        received.shape[1], causal=model.info.causal, window=mask.window, chunk=mask.chunk
    )
    seen_by = layout.seen_by.numpy()  # [k_pos] queries that see key k
    return [
        PositionStats(
            first_token_mass=stats.sink_mass[0, head].float().numpy(),
            entropy=stats.entropy[0, head].float().numpy(),
            attended_keys=keys[head],
            attended_weights=weights[head],
            received=received[head],
            received_rate=received[head] / np.maximum(seen_by, 1),
            visible=layout.visible.numpy(),
            seen_by=seen_by,
        )
        for head in range(model.info.n_heads)
    ]


def query_window(n_tokens: int, start: int | None) -> tuple[int, int]:
    """The query rows ``[start, stop)`` whose pattern the page draws: the whole prompt up to
    :data:`PATTERN_WINDOW` tokens, else :data:`PATTERN_WINDOW` rows from ``start`` (default:
    the last rows), kept inside the prompt."""
    if n_tokens <= PATTERN_WINDOW:
        return 0, n_tokens
    last = n_tokens - PATTERN_WINDOW
    start = last if start is None else min(max(int(start), 0), last)
    return start, start + PATTERN_WINDOW


@dataclass
class LayerForward:
    """Every view of one layer on one prompt (``token_ids [seq]``)."""

    token_ids: np.ndarray  # [seq]
    layer: int
    window: tuple[int, int]  # the query rows [start, stop) of ``pattern``
    positions: list[PositionStats]  # one per head of the layer, from the kernels
    # [n_heads, stop - start, seq] exact pattern rows; None when the prompt is too long for the
    # pattern path (resolve_path)
    pattern: np.ndarray | None
    # [n_heads, seq, d_model]: each head's output z_h W_O^h as the unembedding reads it (final
    # norm at the run's own scale, frozen, times its weight); None with ``pattern``
    writes: np.ndarray | None
    unembed: torch.Tensor | None  # [d_model, vocab], the model's W_U (shared, not a copy)


@torch.no_grad()
def layer_forward(
    model: Model,
    token_ids: torch.Tensor,
    layer: int,
    window_start: int | None = None,
    on_block: Callable[[int, int], None] | None = None,
) -> LayerForward:
    """One pass of each capture path over ``token_ids [seq]`` for the views of ``layer``.

    The pattern path runs when :func:`workbench.capture.resolve_path` picks it for this length;
    it keeps only ``layer``'s pattern rows of the query window (:func:`query_window`) and the
    layer's ``hook_z`` and the final norm's scale, from which :attr:`LayerForward.writes` is
    the direct logit attribution's input (as in TransformerLens's ``cache.stack_head_results``
    followed by ``logit_attrs``). Hold the model's lock.
    """
    if not 0 <= layer < model.info.n_layers:
        raise CaptureError(f"layer {layer} is outside the model's {model.info.n_layers} layers")
    n = int(token_ids.numel())
    positions = layer_positions(model, token_ids, layer, on_block)
    window = query_window(n, window_start)
    if resolve_path("auto", n) != "pattern":
        return LayerForward(token_ids.numpy(), layer, window, positions, None, None, None)
    kept: dict[str, torch.Tensor] = {}

    def keep_pattern(at: int, pattern: torch.Tensor) -> None:  # [head, q_pos, k_pos]
        if at == layer:
            kept["pattern"] = pattern[:, window[0] : window[1]].cpu().clone()

    def keep(name: str) -> Callable[[torch.Tensor, object], None]:
        return lambda tensor, hook: kept.__setitem__(name, tensor[0].detach().float().cpu())

    run_with_patterns(
        model,
        token_ids,
        keep_pattern,
        extra=[
            (f"blocks.{layer}.attn.hook_z", keep("z")),  # [pos, head, d_head]
            ("ln_final.hook_scale", keep("scale")),  # [pos, 1]
        ],
    )
    bridge = model.bridge()
    w_o = bridge.W_O[layer].detach().float().cpu()  # [head, d_head, d_model]
    out = torch.einsum("phd,hdm->hpm", kept["z"], w_o)  # [head, pos, d_model]
    if bridge.cfg.normalization_type in ("LN", "LNPre"):
        out = out - out.mean(-1, keepdim=True)  # LayerNorm centres before it scales
    out = out / kept["scale"][None]  # the run's own final-norm scale per position, frozen
    norm = getattr(bridge.ln_final, "_original_component", bridge.ln_final)
    weight = getattr(norm, "weight", None)
    if weight is not None:
        out = out * weight.detach().float().cpu()
    unembed = bridge.W_U.detach().float().cpu()  # [d_model, vocab]
    return LayerForward(
        token_ids.numpy(), layer, window, positions, kept["pattern"].numpy(), out.numpy(), unembed
    )


def logit_attribution(forward: LayerForward, head: int) -> np.ndarray:
    """``[seq, vocab]``: what ``head`` adds to every logit at every position through the direct
    path (its output read by the unembedding at the frozen final-norm scale)."""
    if forward.writes is None or forward.unembed is None:
        raise CaptureError("the prompt is too long for the pattern path: no head outputs kept")
    return (torch.from_numpy(forward.writes[head]) @ forward.unembed).numpy()


class ForwardCache:
    """The last few :class:`LayerForward` results, keyed by (model, token ids, layer, window):
    moving between the heads of a layer, or back to a prompt, runs no model."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._items: OrderedDict[tuple, LayerForward] = OrderedDict()
        self._lock = threading.Lock()
        self.misses = 0  # forward passes actually run (the page shows whether one was reused)

    def get(
        self,
        model: Model,
        token_ids: torch.Tensor,
        layer: int,
        window_start: int | None = None,
        on_block: Callable[[int, int], None] | None = None,
    ) -> tuple[LayerForward, bool]:
        """(the views of ``layer`` on ``token_ids``, whether they came from the cache). Hold the
        model's lock when it may run."""
        window = query_window(int(token_ids.numel()), window_start)
        key = (
            model.info.name,
            model.info.config_hash,
            token_ids.numpy().astype(np.int64).tobytes(),
            layer,
            window,
        )
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key], True
        forward = layer_forward(model, token_ids, layer, window[0], on_block)
        with self._lock:
            self.misses += 1
            self._items[key] = forward
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return forward, False


_FORWARDS = ForwardCache()


def forwards() -> ForwardCache:
    return _FORWARDS


@dataclass(frozen=True)
class SurveyPrompt:
    """One prompt of a set a head is ranked over: where the Head page finds it again (its
    prompt choice, e.g. ``scan:basic``, and example number) and its tokens."""

    source: str
    item: int
    token_ids: torch.Tensor  # [seq]


@dataclass
class Survey:
    """One layer's per-position statistics on every prompt of a set, all heads at once, so
    that ranking another head of the layer or by another statistic runs no model."""

    layer: int
    prompts: list[SurveyPrompt]
    positions: list[list[PositionStats]]  # [prompt][head]


@dataclass(frozen=True)
class RankedPosition:
    """A position of one prompt of a :class:`Survey` and the head's value there."""

    prompt: int  # index into Survey.prompts
    position: int  # a query (or, for a key statistic, a key) of that prompt
    value: float


def survey_layer(
    model: Model,
    prompts: list[SurveyPrompt],
    layer: int,
    on_prompt: Callable[[int, int], None] | None = None,
    lock: threading.Lock | None = None,
) -> Survey:
    """:func:`layer_positions` of ``layer`` on each prompt (blocks 0..layer, streamed path, no
    L×L tensor). ``on_prompt(i, n)`` is called before prompt i (progress, cancelling);
    ``lock`` (the model's) is held for one prompt at a time, so that other views of the model
    can run between them."""
    positions = []
    for i, prompt in enumerate(prompts):
        if on_prompt is not None:
            on_prompt(i, len(prompts))
        with lock or contextlib.nullcontext():
            positions.append(layer_positions(model, prompt.token_ids, layer))
    return Survey(layer, list(prompts), positions)


def top_positions(survey: Survey, head: int, statistic: str, n: int = 20) -> list[RankedPosition]:
    """The ``n`` (prompt, position) pairs of the survey where ``head`` has the highest value of
    ``statistic`` (:data:`POSITION_STATISTICS`), highest first; equal values keep the earlier
    prompt, then the earlier position. Positions without a value (:meth:`PositionStats.values`)
    are left out."""
    values = [stats[head].values(statistic) for stats in survey.positions]
    if not values:
        return []
    flat = np.concatenate(values)
    prompt_of = np.repeat(np.arange(len(values)), [len(v) for v in values])
    position_of = np.concatenate([np.arange(len(v)) for v in values])
    kept = np.flatnonzero(np.isfinite(flat))
    order = kept[np.argsort(-flat[kept], kind="stable")[:n]]
    return [RankedPosition(int(prompt_of[i]), int(position_of[i]), float(flat[i])) for i in order]


class SurveyCache:
    """The last few :class:`Survey` results, keyed by (model, layer, the prompts' token ids)."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._items: OrderedDict[tuple, Survey] = OrderedDict()
        self._lock = threading.Lock()
        self.misses = 0

    def get(
        self,
        model: Model,
        prompts: list[SurveyPrompt],
        layer: int,
        on_prompt: Callable[[int, int], None] | None = None,
        lock: threading.Lock | None = None,
    ) -> tuple[Survey, bool]:
        """(the survey, whether it came from the cache); arguments as for :func:`survey_layer`."""
        digest = hashlib.sha256()
        for prompt in prompts:
            ids = prompt.token_ids.numpy().astype(np.int64)
            digest.update(len(ids).to_bytes(8, "little") + ids.tobytes())
        key = (model.info.name, model.info.config_hash, layer, digest.hexdigest())
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key], True
        survey = survey_layer(model, prompts, layer, on_prompt, lock)
        with self._lock:
            self.misses += 1
            self._items[key] = survey
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return survey, False


_SURVEYS = SurveyCache()


def surveys() -> SurveyCache:
    return _SURVEYS


@dataclass(frozen=True)
class TaskPrompt:
    """One prompt of a task, as the Head page shows it."""

    token_ids: torch.Tensor  # [seq]
    target: int | None  # the answer's token id after the last position (templated tasks)
    foil: int | None  # the competing token id (the subject, in IOI)


_TASK_PROMPTS: dict[tuple, list[TaskPrompt]] = {}


def task_prompts(model: Model, name: str, **options: object) -> list[TaskPrompt]:
    """The prompts of task ``name`` (:func:`workbench.tasks.get_task` with ``options``) for this
    model's tokenizer, in the task's example order; built once per process."""
    key = (model.info.name, model.info.config_hash, name, tuple(sorted(options.items())))
    if key not in _TASK_PROMPTS:
        task = get_task(name, kind="metric", **options)
        found: list[tuple[int, TaskPrompt]] = []
        for order, batch in enumerate(task.batches(model, 1)):  # one prompt per batch
            target, foil = batch.data.get("target"), batch.data.get("foil")
            found.append(
                (
                    batch.index[0] if batch.index is not None else order,
                    TaskPrompt(
                        batch.tokens[0].cpu(),
                        None if target is None else int(target[0]),
                        None if foil is None else int(foil[0]),
                    ),
                )
            )
        _TASK_PROMPTS[key] = [prompt for _, prompt in sorted(found, key=lambda item: item[0])]
    return _TASK_PROMPTS[key]
