"""One process-wide place where loaded model pairs live, shared by every adapter.

LangChain and LlamaIndex objects are cheap to build and are built often (10 times in
``langchain-tests``' ``test_init_time``, once per agent or query engine in user code); the
weights are not. Every adapter asks :func:`get_decoder` for its decoder, so all instances of
both frameworks that name the same base, expert, dtype and device share one copy of the weights
(and its ``forward_lock``). Pairs are loaded lazily, on the first request, never at import.
Framework-free: importing this module imports neither LangChain nor LlamaIndex.
"""

from __future__ import annotations

import threading
from pathlib import Path

from .config import NGSDConfig, ToolGuardConfig
from .decoder import GatedDecoder
from .guard import ToolGuard
from .models import ModelPair, default_expert_path, default_pair, embedded_base_path, load_pair

__all__ = ["clear_pairs", "get_decoder", "get_guard", "get_pair", "loaded_pairs", "register_pair"]

PairKey = tuple[str, str, str, str]

_pairs: dict[PairKey, ModelPair] = {}
_decoders: dict[tuple[int, str], GatedDecoder] = {}
_guards: dict[tuple[int, str], ToolGuard] = {}
_key_locks: dict[PairKey, threading.Lock] = {}
_lock = threading.Lock()


def _normalise(source: str | Path | None) -> str | None:
    """Local paths by their absolute form (``./m`` and ``/abs/m`` share weights); hub ids as given."""
    if source is None:
        return None
    path = Path(str(source)).expanduser()
    return str(path.resolve()) if path.exists() else str(source)


def _key(base: str | None, expert: str | None, dtype: str, device: str) -> PairKey:
    # The embedded default pair is keyed by sentinels so it never needs its paths resolved
    # (resolving the default expert would train it).
    return (base or "<embedded>", expert or "<default-expert>", dtype, device)


def get_pair(
    base: str | Path | None = None,
    expert: str | Path | None = None,
    *,
    dtype: str = "float32",
    device: str = "cpu",
) -> ModelPair:
    """The loaded pair for ``(base, expert, dtype, device)``, loading it on first use.

    Args:
        base: hub id, local folder or ``.gguf`` path of the base model; None is the embedded
            SmolLM2-135M-Instruct.
        expert: peft adapter folder or separate same-vocabulary model; None is the default LoRA
            safety expert, which exists only for the embedded base.
        dtype: ``float32``, ``bfloat16``, ``float16`` or ``auto``.
        device: torch device.

    Raises:
        ValueError: ``expert`` is None while ``base`` names another model (NGSD needs an expert).
    """
    base_s, expert_s = _normalise(base), _normalise(expert)
    embedded = str(embedded_base_path()) if base_s is not None and expert_s is None else None
    if base_s is not None and expert_s is None and base_s != embedded:
        raise ValueError(
            f"expert=None with base={base!r}: the default safety expert only fits the embedded "
            "base model; pass expert= (a LoRA adapter folder trained on this base, or a smaller "
            "model sharing its vocabulary)"
        )
    if base_s == embedded:
        base_s = None
    key = _key(base_s, expert_s, dtype, device)
    with _lock:
        if key in _pairs:
            return _pairs[key]
        key_lock = _key_locks.setdefault(key, threading.Lock())
    # One lock per key: two different pairs load in parallel, the same pair loads once.
    with key_lock:
        with _lock:
            if key in _pairs:
                return _pairs[key]
        if base_s is None and expert_s is None and device == "cpu":
            pair = default_pair(dtype=dtype)  # shares the cache of models.default_pair()
        else:
            pair = load_pair(
                base_s if base_s is not None else embedded_base_path(),
                expert_s if expert_s is not None else default_expert_path(),
                dtype=dtype,
                device=device,
            )
        with _lock:
            _pairs[key] = pair
        return pair


def get_decoder(
    base: str | Path | None = None,
    expert: str | Path | None = None,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    config: NGSDConfig | None = None,
) -> GatedDecoder:
    """The shared decoder for these models and this ``config`` (see :func:`get_pair`).

    The pair is loaded once per process; decoders hold no weights but keep the risk rater's
    prefilled instructions, so one decoder per (pair, config) is cached too. A decoder serves
    concurrent callers (all generation state is per call).
    """
    pair = get_pair(base, expert, dtype=dtype, device=device)
    config = config or NGSDConfig()
    key = (id(pair), config.model_dump_json())
    with _lock:
        decoder = _decoders.get(key)
        if decoder is None or decoder.pair is not pair:  # an id() reused after clear_pairs()
            decoder = _decoders[key] = GatedDecoder(pair, config)
        return decoder


def get_guard(decoder: GatedDecoder, config: ToolGuardConfig) -> ToolGuard:
    """The shared tool-call guard for ``decoder`` and ``config`` (its rating cache is reused)."""
    key = (id(decoder), config.model_dump_json())
    with _lock:
        guard = _guards.get(key)
        if guard is None or guard.decoder is not decoder:
            guard = _guards[key] = ToolGuard(decoder, config)
        return guard


def register_pair(
    pair: ModelPair,
    base: str | Path | None = None,
    expert: str | Path | None = None,
    *,
    dtype: str = "float32",
    device: str = "cpu",
) -> None:
    """Make an already loaded pair the one :func:`get_pair` returns for these arguments."""
    key = _key(_normalise(base), _normalise(expert), dtype, device)
    with _lock:
        _pairs[key] = pair


def loaded_pairs() -> dict[PairKey, ModelPair]:
    """A snapshot of the loaded pairs by ``(base, expert, dtype, device)``."""
    with _lock:
        return dict(_pairs)


def clear_pairs() -> None:
    """Forget every loaded pair (their memory is freed once no decoder holds them)."""
    with _lock:
        _pairs.clear()
        _key_locks.clear()
        _decoders.clear()
        _guards.clear()
