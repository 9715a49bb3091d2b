"""Evaluation prompt sets: the bundled attack / over-refusal sets and user files.

Every set becomes a list of :class:`EvalPrompt`. ``prompt`` is what is sent to the model,
``goal`` the plain request behind it (what a judge compares against) and ``harmful`` says which
metric the prompt feeds: attack success (harmful) or over-refusal (harmless).

The prefilling-attack sets (``prefill10`` / ``prefill20`` / ``prefill40``) are built on the fly
by the runner (they need the base model's own answers, see ``runner.build_prefill_prompts``);
here they are only named.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = [
    "BUNDLED",
    "PREFILL_SETS",
    "EvalPrompt",
    "dataset_names",
    "load_dataset",
    "load_user_dataset",
    "sample",
]


@dataclass(frozen=True)
class EvalPrompt:
    """One evaluation prompt."""

    id: str
    prompt: str
    """Text sent as the user message."""
    goal: str
    """The plain request behind ``prompt`` (equal to it for plain sets)."""
    harmful: bool
    """True: a compliant answer is an attack success; False: a refusal is an over-refusal."""
    prefix: str = ""
    """Text forced at the start of the assistant turn (prefilling attack); not part of the output."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Bundled:
    file: str
    description: str
    harmful: bool
    label: str | None = None  # keep only XSTest rows with this label


BUNDLED: dict[str, _Bundled] = {
    "advbench50": _Bundled("advbench_subset50.json", "AdvBench 50-behaviour subset (Zou et al. 2023; SafeDecoding subset), MIT", True),
    "advbench": _Bundled("advbench_harmful_behaviors.json", "AdvBench harmful behaviours, all 520 (Zou et al. 2023), MIT", True),
    "gcg": _Bundled("attack_gcg.json", "GCG adversarial-suffix attacks on AdvBench-50 goals (SafeDecoding attacker set), MIT", True),
    "autodan": _Bundled("attack_autodan.json", "AutoDAN jailbreak prompts (SafeDecoding attacker set), MIT", True),
    "deepinception": _Bundled("attack_deepinception.json", "DeepInception nested-fiction jailbreaks (SafeDecoding attacker set), MIT", True),
    "xstest-safe": _Bundled("xstest.json", "XSTest safe prompts: over-refusal (Röttger et al. 2024), CC-BY-4.0", False, "safe"),
    "xstest-unsafe": _Bundled("xstest.json", "XSTest unsafe contrast prompts: compliance (Röttger et al. 2024), CC-BY-4.0", True, "unsafe"),
}

PREFILL_SETS: dict[str, int] = {"prefill10": 10, "prefill20": 20, "prefill40": 40}
"""Prefilling attack sets and how many tokens of the base's own compliant answer they force."""

PREFILL_SOURCE = "advbench50"
"""Harmful requests the prefilling attacks are built from."""

_PROMPT_FIELDS = ("prompt", "goal", "question", "instruction", "text", "input")


def dataset_names() -> list[str]:
    """Names accepted by :func:`load_dataset` and ``ngsd eval --datasets``."""
    return [*BUNDLED, *PREFILL_SETS]


def _read_bundled(file: str) -> list[dict[str, Any]]:
    text = resources.files("ngsd_integrations").joinpath("data", file).read_text(encoding="utf-8")
    return json.loads(text)


def load_dataset(name: str) -> list[EvalPrompt]:
    """A bundled set by name (see :data:`BUNDLED`), or a user file path (see :func:`load_user_dataset`)."""
    if name in PREFILL_SETS:
        raise ValueError(f"dataset {name!r} is built from the base model's answers; use runner.build_prefill_prompts")
    spec = BUNDLED.get(name)
    if spec is None:
        if Path(name).expanduser().is_file():
            return load_user_dataset(name)
        raise ValueError(f"unknown dataset {name!r}: use one of {', '.join(dataset_names())} or a JSON/JSONL/CSV file")
    rows = _read_bundled(spec.file)
    out = []
    for i, row in enumerate(rows):
        if spec.label is not None and row.get("label") != spec.label:
            continue
        goal = str(row.get("goal") or row.get("prompt"))
        prompt = str(row.get("prompt") or row.get("goal"))
        if spec.label is not None:  # XSTest's "goal" field is only the label
            goal = prompt
        out.append(EvalPrompt(id=str(row.get("id", i)), prompt=prompt, goal=goal, harmful=spec.harmful))
    return _unique_ids(out)


def _unique_ids(prompts: list[EvalPrompt]) -> list[EvalPrompt]:
    """Suffix repeated ids (GCG has three suffixes per goal) so results can be keyed by id."""
    seen: dict[str, int] = {}
    out = []
    for p in prompts:
        n = seen.get(p.id, 0)
        seen[p.id] = n + 1
        out.append(p if n == 0 else EvalPrompt(f"{p.id}.{n}", p.prompt, p.goal, p.harmful, p.prefix))
    return out


def _parse_label(value: Any) -> bool | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "unsafe", "harmful"}:
        return True
    if text in {"0", "false", "no", "safe", "harmless", "benign"}:
        return False
    raise ValueError(f"label {value!r} is not one of safe/unsafe, harmless/harmful, true/false")


def load_user_dataset(path: str | Path, harmful: bool = True, prompt_field: str | None = None) -> list[EvalPrompt]:
    """Prompts from a JSON list, JSONL or CSV file.

    The prompt is read from ``prompt_field`` or the first of ``prompt``, ``goal``, ``question``,
    ``instruction``, ``text``, ``input`` present. Optional per-row columns: ``id``, ``goal``
    (the plain request behind an attack prompt), ``harmful`` or ``label`` (``safe``/``unsafe``,
    ``harmless``/``harmful``, ``true``/``false``); rows without one get ``harmful``. A JSON list
    of plain strings is accepted too.
    """
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix == ".csv":
        rows: list[Any] = list(csv.DictReader(text.splitlines()))
    elif suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        data = json.loads(text)
        rows = data if isinstance(data, list) else data.get("data") or data.get("prompts") or []
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, str):
            row = {"prompt": row}
        fields = [prompt_field] if prompt_field else [f for f in _PROMPT_FIELDS if row.get(f)]
        if not fields or not row.get(fields[0]):
            raise ValueError(f"{path}: row {i} has no prompt column (looked for {prompt_field or ', '.join(_PROMPT_FIELDS)})")
        prompt = str(row[fields[0]])
        label = _parse_label(row.get("harmful", row.get("label")))
        out.append(
            EvalPrompt(
                id=str(row.get("id") or i),
                prompt=prompt,
                goal=str(row.get("goal") or prompt),
                harmful=harmful if label is None else label,
            )
        )
    if not out:
        raise ValueError(f"{path} holds no prompts")
    return _unique_ids(out)


def sample(prompts: list[EvalPrompt], limit: int | None, seed: int = 0) -> list[EvalPrompt]:
    """``limit`` prompts from a ``seed``-ed shuffle, kept in file order; all when ``limit`` is None.

    A larger limit with the same seed extends a smaller one's choice, so a resumed run with a
    higher ``--limit`` keeps every answer it already has.
    """
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    return [prompts[i] for i in sorted(order if limit is None else order[:limit])]
