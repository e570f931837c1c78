"""Model loading: one :class:`Model` for every way a user names a transformer.

A *model spec* is a string resolved in this order:

1. a built-in name (``smollm2-135m``, ``minilm``, ``toy-*``), usable offline;
2. a path: a Hugging Face directory (holding ``config.json``) or a ``.gguf`` file;
3. anything else is a Hugging Face hub name (``gpt2``, ``meta-llama/Llama-2-7b-hf``), which needs
   the network.

GGUF files are dequantized by transformers (with the ``gguf`` package). That takes tens of seconds
for a small model on 2 cores, so the dequantized weights are written once as safetensors into the
user cache directory (``$WORKBENCH_CACHE`` or ``~/.cache/attention-head-workbench``) and later loads
read those.

Every model comes back with the same metadata (:class:`ModelInfo`) whatever its family, and with
lazy access to a TransformerLens ``TransformerBridge`` over the *same* Hugging Face module (no
weight copy) for hook-based analysis.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import os
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import torch

from workbench.atomic import atomic_dir
from workbench.builtins import BUILTINS, TOY_MODELS_DIR, Builtin, toy_names
from workbench.errors import (
    CaptureError,
    ModelLoadError,
    ModelNotInstalledError,
    UnknownModelError,
)
from workbench.placement import place, resolve

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Families whose attention is bidirectional; they load with their masked-LM head.
ENCODER_MODEL_TYPES = frozenset(
    {
        "bert",
        "roberta",
        "distilbert",
        "albert",
        "electra",
        "deberta",
        "deberta-v2",
        "mpnet",
        "xlm-roberta",
        "camembert",
        "modernbert",
    }
)
# Config keys that describe where a model came from rather than what it computes.
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "transformers_version",
        "quantization_config",
        "architectures",
        "dtype",
        "torch_dtype",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "output_attentions",
    }
)


def cache_dir() -> Path:
    """Where dequantized weights and other derived files are kept."""
    return Path(
        os.environ.get("WORKBENCH_CACHE", Path.home() / ".cache" / "attention-head-workbench")
    )


@dataclass(frozen=True)
class ModelInfo:
    """Uniform metadata of a loaded model; stored as the run file's model identity."""

    name: str
    source: str  # "builtin", "toy", "local", "gguf", "hub" or "memory"
    revision: str
    architecture: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    causal: bool
    max_context: int
    config_hash: str

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 without grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    def kv_head(self, head: int) -> int:
        """KV head read by query ``head``: ``head // group_size`` (the HF ``repeat_kv`` rule)."""
        return head // self.group_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Model:
    """A loaded transformer: the Hugging Face module, its tokenizer and uniform metadata.

    Attributes:
        info: :class:`ModelInfo` (layers, heads, KV heads, causal or not, ...).
        hf: the ``transformers`` module; forward passes go through it.
        tokenizer: its tokenizer.
    """

    def __init__(
        self, info: ModelInfo, hf: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
    ) -> None:
        self.info = info
        self.hf = hf
        self.tokenizer = tokenizer
        self._bridge: TransformerBridge | None = None
        self._known_tokens: dict[tuple[str, int | None], torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def learned_sinks(self) -> bool:
        """Whether the attention has learned sink logits (gpt-oss ``sinks``): one extra softmax
        slot per head that takes probability but carries no value."""
        return any(
            isinstance(getattr(m, "sinks", None), torch.nn.Parameter) for m in self.hf.modules()
        )

    @property
    def latent_attention(self) -> bool:
        """Multi-head latent attention (DeepSeek-V2/V3): value heads narrower than query/key
        heads, which TransformerLens 4.x's ``hook_z``/``hook_v`` do not split correctly."""
        text = self.hf.config.get_text_config()
        qk = (getattr(text, "qk_nope_head_dim", 0) or 0) + (
            getattr(text, "qk_rope_head_dim", 0) or 0
        )
        return bool(qk) and getattr(text, "v_head_dim", qk) != qk

    def bridge(self) -> TransformerBridge:
        """The TransformerLens bridge over a twin of ``self.hf`` (built once; shares the weights).

        The bridge swaps the attention modules of the model it is given for its own (eager)
        components, so it gets a structural copy whose parameters and buffers *are* those of
        ``self.hf``: no extra weight memory, and ``self.hf`` keeps dispatching attention through
        transformers' AttentionInterface for the streamed path.

        Hook names follow TransformerLens: ``blocks.{l}.attn.hook_pattern`` is
        ``[batch, head, q_pos, k_pos]``, ``blocks.{l}.attn.hook_z`` is
        ``[batch, pos, head, d_head]``, ``blocks.{l}.hook_resid_pre`` is ``[batch, pos, d_model]``.
        """
        if self._bridge is None:
            # TransformerLens takes seconds to import: only the pattern path needs it
            from transformer_lens.model_bridge import TransformerBridge

            tensors = itertools.chain(self.hf.parameters(), self.hf.buffers())
            twin = copy.deepcopy(self.hf, memo={id(t): t for t in tensors})
            try:
                with _quiet_transformers():
                    self._bridge = TransformerBridge.boot_transformers(
                        self.info.name, hf_model=twin, tokenizer=self.tokenizer
                    )
            except (ValueError, NotImplementedError, KeyError) as e:
                reason = (
                    str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
                )
                raise CaptureError(
                    f"TransformerLens has no bridge for {self.info.architecture} ({reason}); the "
                    "pattern path cannot run it: use path='streamed'"
                ) from None
        return self._bridge

    def tokenize(self, text: str, max_tokens: int | None = None) -> torch.Tensor:
        """Token ids ``[seq]`` as the model's own tokenizer makes them (special tokens included),
        truncated to ``max_tokens`` and to the model's context."""
        known = self._known_tokens.get((text, max_tokens))
        if known is not None:
            return known
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        limit = min(max_tokens or self.info.max_context, self.info.max_context)
        return torch.tensor(ids[:limit], dtype=torch.long)

    @contextlib.contextmanager
    def tokenized(self, known: dict[tuple[str, int | None], torch.Tensor]) -> Iterator[None]:
        """Within the block :meth:`tokenize` answers from ``known`` ``{(text, max_tokens): ids}``
        (a data-parallel scan tokenizes its prompts once, split over the ranks)."""
        self._known_tokens = known
        try:
            yield
        finally:
            self._known_tokens = {}

    def __repr__(self) -> str:
        i = self.info
        kind = "causal" if i.causal else "bidirectional"
        return (
            f"Model({i.name!r}: {i.architecture}, {i.n_layers} layers x {i.n_heads} heads "
            f"({i.n_kv_heads} KV), d_head {i.d_head}, {kind}, context {i.max_context})"
        )


# ---------------------------------------------------------------------------------------------
# Loading


def load(
    spec: str,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[int | str, int | str] | None = None,
) -> Model:
    """Load a model by spec (built-in name, HF directory, ``.gguf`` file or hub name).

    Args:
        spec: what to load; see the module docstring for the resolution order.
        device: ``"cpu"``, ``"cuda"``...; default CUDA when available, else CPU.
        dtype: weight dtype (float32 by default: statistics are compared at 1e-4).
        revision: hub revision (branch, tag or commit) for hub names.
        device_map: spread a model too large for one GPU over several, as
            ``from_pretrained(device_map=...)`` does with accelerate: ``"auto"``,
            ``"balanced"``, ``"sequential"`` or ``{module name: device}``. Excludes ``device``.
            The streamed capture path runs across the devices (:mod:`workbench.placement`).
        max_memory: per-device limits for ``device_map``, e.g. ``{0: "60GiB", 1: "60GiB"}``.

    Raises:
        UnknownModelError: nothing of that name exists.
        ModelNotInstalledError: a built-in's package is missing (the message says what to install).
        ModelLoadError: the files exist but cannot be loaded.
    """
    device, placement = resolve(device, device_map, max_memory)
    if spec in BUILTINS:
        model = _load_builtin(BUILTINS[spec], dtype, placement)
    elif spec.startswith("toy-"):
        path = TOY_MODELS_DIR / spec
        if not (path / "config.json").is_file():
            known = ", ".join(toy_names()) or "none shipped"
            raise UnknownModelError(f"unknown reference model {spec!r} (available: {known})")
        model = _load_hf_dir(
            path, name=spec, source="toy", revision="data/models", dtype=dtype, **placement
        )
    elif _looks_like_path(spec):
        model = _load_path(spec, dtype, placement)
    else:
        model = _load_hub(spec, revision, dtype, placement)
    place(model.hf, device)
    model.hf.eval()
    return model


def from_hf(
    hf: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    name: str,
    revision: str = "in memory",
) -> Model:
    """A :class:`Model` over a Hugging Face model that is already in memory, with its tokenizer.

    For models that exist nowhere on disk: built from a config with random weights, trained or
    edited in a notebook. The metadata is read from ``hf.config`` exactly as :func:`load` reads
    it (``info.source`` is ``"memory"``); the model is used as it is (same device, dtype and
    weights, no copy) and put in eval mode. Record ``config.architectures`` (as
    ``save_pretrained`` does, e.g. ``["LlamaForCausalLM"]``) so that ``info.architecture`` and
    :meth:`Model.bridge` know the class.

    Example:
        >>> config = LlamaConfig(architectures=["LlamaForCausalLM"])  # doctest: +SKIP
        >>> model = from_hf(LlamaForCausalLM(config), tokenizer, name="my-llama")  # doctest: +SKIP
    """
    info = _model_info(hf.config, name=name, source="memory", revision=revision)
    return Model(info, hf.eval(), tokenizer)


def _looks_like_path(spec: str) -> bool:
    return (
        spec.endswith(".gguf")
        or spec.startswith((".", "/", "~"))
        or Path(spec).expanduser().exists()
    )


def _load_path(spec: str, dtype: torch.dtype, placement: dict[str, Any]) -> Model:
    path = Path(spec).expanduser()
    if not path.exists():
        raise UnknownModelError(f"no such model file or directory: {spec}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(
                f"{path} is a file but not a .gguf model; pass a GGUF file or a Hugging Face "
                "directory (with config.json)"
            )
        return _load_gguf(
            path,
            name=path.stem,
            source="gguf",
            revision=_file_revision(path),
            dtype=dtype,
            **placement,
        )
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a Hugging Face model directory (no config.json)")
    resolved = path.resolve()  # the name too: reloading from `revision` must give the same one
    return _load_hf_dir(
        path,
        name=resolved.name,
        source="local",
        revision=str(resolved),
        dtype=dtype,
        **placement,
    )


def _load_builtin(builtin: Builtin, dtype: torch.dtype, placement: dict[str, Any]) -> Model:
    weights = builtin.weights()
    if weights is None:
        raise ModelNotInstalledError(
            f"built-in model {builtin.name!r} is not installed; run: {builtin.install}"
        )
    if weights.suffix == ".gguf":
        return _load_gguf(
            weights,
            name=builtin.name,
            source="builtin",
            revision=f"{builtin.install.split()[-1]} ({weights.name})",
            dtype=dtype,
            **placement,
        )
    return _load_hf_dir(
        weights,
        name=builtin.name,
        source="builtin",
        revision=builtin.install.split()[-1],
        dtype=dtype,
        **placement,
    )


def _file_revision(path: Path) -> str:
    stat = path.stat()
    return f"{path.name}:{stat.st_size}:{int(stat.st_mtime)}"


def _load_gguf(
    path: Path, *, name: str, source: str, revision: str, dtype: torch.dtype, **placement: Any
) -> Model:
    """Dequantize a GGUF file once, cache it as a Hugging Face directory, load from the cache."""
    key = hashlib.sha256(f"{path.resolve()}|{_file_revision(path)}".encode()).hexdigest()[:16]
    cached = cache_dir() / "gguf" / f"{path.stem}-{key}"
    if not (cached / "model.safetensors").is_file():
        _dequantize_gguf(path, cached)
    return _load_hf_dir(
        cached, name=name, source=source, revision=revision, dtype=dtype, **placement
    )


def _dequantize_gguf(path: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            hf = AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch.float32
            )
    except ImportError as e:
        raise ModelNotInstalledError(f"loading GGUF files needs the gguf package: {e}") from e
    except Exception as e:
        raise ModelLoadError(f"could not read GGUF file {path}: {e}") from e
    # The weights are now plain float tensors; without this the saved config asks for GGUF again.
    hf.hf_quantizer = None
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    with atomic_dir(target, replace=False) as tmp:  # a concurrent load that finished first wins
        hf.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _load_hf_dir(
    path: Path, *, name: str, source: str, revision: str, dtype: torch.dtype, **placement: Any
) -> Model:
    """``placement``: ``device_map`` and ``max_memory`` for ``from_pretrained``, if any."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(str(path))
            tokenizer = AutoTokenizer.from_pretrained(str(path))
            hf = _auto_class(config).from_pretrained(
                str(path), config=config, dtype=dtype, **placement
            )
    except Exception as e:
        raise ModelLoadError(f"could not load the Hugging Face model in {path}: {e}") from e
    return Model(_model_info(hf.config, name=name, source=source, revision=revision), hf, tokenizer)


def _load_hub(
    spec: str, revision: str | None, dtype: torch.dtype, placement: dict[str, Any]
) -> Model:
    from transformers import AutoConfig, AutoTokenizer

    builtins = ", ".join([*BUILTINS, *toy_names()])
    if not HUB_NAME.fullmatch(spec) or "--" in spec or ".." in spec:
        raise UnknownModelError(
            f"unknown model {spec!r}: not a built-in ({builtins}), not a local path, and not a "
            "Hugging Face hub name (NAME or ORG/NAME)"
        )
    # Offline (HF_HUB_OFFLINE, or no answer from the hub within seconds), only the local hub
    # cache is read: no five retries with backoff before the same answer.
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        offline = "HF_HUB_OFFLINE is set and it is not in the local hub cache"
    elif not _hub_reachable():
        offline = "the Hugging Face hub cannot be reached and it is not in the local hub cache"
    else:
        offline = ""
    local = {"revision": revision, "local_files_only": bool(offline)}
    try:
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(spec, **local)
    except OSError as e:
        reason = offline or "not found on the Hugging Face hub"
        raise UnknownModelError(
            f"unknown model {spec!r}: not a built-in ({builtins}), not a local path, and {reason}"
        ) from e
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(spec, **local)
            hf = _auto_class(config).from_pretrained(
                spec, config=config, dtype=dtype, **local, **placement
            )
    except Exception as e:
        raise ModelLoadError(f"could not load {spec!r} from the Hugging Face hub: {e}") from e
    resolved = getattr(hf.config, "_commit_hash", None) or revision or "main"
    return Model(_model_info(hf.config, name=spec, source="hub", revision=resolved), hf, tokenizer)


# A hub repository id: NAME or ORG/NAME, letters, digits, '-', '_', '.' (at most 96 each).
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host (``HF_ENDPOINT``) accepts a TCP connection within ``timeout``
    seconds, name lookup included; True behind an HTTP proxy, which this cannot test."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")):
        return True
    from huggingface_hub import constants  # only hub loads need it

    url = urlparse(constants.ENDPOINT)
    address = (url.hostname, url.port or (443 if url.scheme == "https" else 80))
    answered: list[bool] = []

    def connect() -> None:
        with contextlib.suppress(OSError), socket.create_connection(address, timeout=timeout):
            answered.append(True)

    thread = threading.Thread(target=connect, daemon=True)  # getaddrinfo has no timeout
    thread.start()
    thread.join(timeout)
    return bool(answered)


def _auto_class(config: Any) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    if config.model_type in ENCODER_MODEL_TYPES:
        # Sentence encoders ship without the MLM head: it is initialised at random, which leaves
        # the attention (all the workbench reads) untouched. The bridge needs the *ForMaskedLM
        # layout, so the architecture is recorded accordingly.
        config.architectures = [f"{type(config).__name__.removesuffix('Config')}ForMaskedLM"]
        return AutoModelForMaskedLM
    return AutoModelForCausalLM


def _kv_heads(text: Any, n_heads: int) -> int:
    """KV heads per layer, whichever way the config says it (Falcon: ``num_kv_heads`` with its
    new decoder architecture, ``multi_query`` for one shared KV head)."""
    if getattr(text, "num_key_value_heads", None):
        return int(text.num_key_value_heads)
    if getattr(text, "new_decoder_architecture", True) is False:  # Falcon's older layouts
        return 1 if getattr(text, "multi_query", False) else n_heads
    return int(getattr(text, "num_kv_heads", None) or n_heads)


def _model_info(config: Any, *, name: str, source: str, revision: str) -> ModelInfo:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_heads = text.num_attention_heads
    d_model = text.hidden_size
    stable = {k: v for k, v in sorted(text.to_dict().items()) if k not in _VOLATILE_CONFIG_KEYS}
    config_hash = hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode())
    return ModelInfo(
        name=name,
        source=source,
        revision=revision,
        architecture=(config.architectures or [type(config).__name__])[0],
        n_layers=text.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=_kv_heads(text, n_heads),
        # the width of a head's output (hook_z): MLA's value heads are narrower than its q/k
        d_head=getattr(text, "v_head_dim", None)
        or getattr(text, "head_dim", None)
        or d_model // n_heads,
        d_model=d_model,
        causal=config.model_type not in ENCODER_MODEL_TYPES,
        max_context=int(getattr(text, "max_position_embeddings", 0) or 2048),
        config_hash=config_hash.hexdigest()[:16],
    )


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports (missing MLM-head weights etc.) during a load."""
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    before, hub_before = hf_logging.get_verbosity(), hub_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hub_logging.set_verbosity_error()  # the hub client's retry warnings
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)
        hub_logging.set_verbosity(hub_before)
        hf_logging.enable_progress_bar()
