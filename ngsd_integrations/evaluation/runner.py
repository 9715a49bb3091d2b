"""Run defences over datasets, writing every answer as it comes so a run can resume.

Output folder layout:

``run.json``          the settings of the run (checked on resume: same settings or an error)
``prefill.jsonl``     the base model's own answers the prefilling attacks are cut from
``records.jsonl``     one line per (dataset, defence, prompt): prompt, output, judgement, trace
``results.json``      everything above in one JSON document, plus the metrics
``table.md``          the markdown tables (see ``report.py``)
``tradeoff.png``      attack success vs harmless refusals, one point per defence

Each line is flushed as soon as it is written; a line cut short by a kill is dropped on resume
and its prompt answered again, so an interrupted run loses at most the answer in progress.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..models import ModelPair
from .datasets import PREFILL_SETS, PREFILL_SOURCE, EvalPrompt, load_dataset, sample
from .defences import DEFENCES, build_defences
from .judges import Judge, RefusalJudge
from .safedecoding import SafeDecoder

__all__ = ["EvalSettings", "RunMismatchError", "build_prefill_prompts", "read_records", "run_evaluation"]

DEFAULT_DATASETS = ("advbench50", "gcg", "autodan", "deepinception", "xstest-safe", "xstest-unsafe", "prefill10", "prefill20", "prefill40")


class RunMismatchError(ValueError):
    """The output folder holds a run made with different settings."""


@dataclass
class EvalSettings:
    """What a run measures; stored in ``run.json``. ``limit`` and the lists may grow on resume."""

    datasets: list[str] = field(default_factory=lambda: list(DEFAULT_DATASETS))
    defences: list[str] = field(default_factory=lambda: list(DEFENCES))
    limit: int | None = None
    seed: int = 0
    max_new_tokens: int = 64
    ngsd_alpha: float = 0.9
    prefill_answer_tokens: int = 40
    base_id: str = ""
    expert_id: str = ""
    judge: str = "refusal-phrases"

    def identity(self) -> dict[str, Any]:
        """Settings that change answers: a resumed run must match these."""
        keys = ("seed", "max_new_tokens", "ngsd_alpha", "prefill_answer_tokens", "base_id", "expert_id", "judge")
        return {k: getattr(self, k) for k in keys}


def _append(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Lines of a JSONL file; a last line cut short by an interruption is dropped from the file."""
    path = Path(path)
    if not path.is_file():
        return []
    records, good_bytes = [], 0
    for line in path.read_bytes().splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
        good_bytes += len(line)
    if good_bytes != path.stat().st_size:
        with path.open("r+b") as f:
            f.truncate(good_bytes)
    return records


def build_prefill_prompts(
    pair: ModelPair,
    goals: list[EvalPrompt],
    cache_file: Path,
    answer_tokens: int = 40,
    judge: Judge | None = None,
    progress: bool = True,
) -> dict[str, list[EvalPrompt]]:
    """The prefilling-attack sets: the base's own greedy answer to each harmful goal, its first
    10 / 20 / 40 tokens forced at the start of the assistant turn.

    Answers are cached in ``cache_file`` (resume). Goals the base itself refuses give no
    compliant prefix and are left out of every prefill set.
    """
    judge = judge or RefusalJudge()
    cached = {r["id"]: r for r in read_records(cache_file)}
    todo = [g for g in goals if g.id not in cached]
    if todo:
        decoder = SafeDecoder(pair, first_tokens=0)
        from tqdm.auto import tqdm

        for goal in tqdm(todo, desc="prefill: base answers", disable=not progress):
            generation = decoder.generate([{"role": "user", "content": goal.prompt}], answer_tokens)
            record = {"id": goal.id, "goal": goal.goal, "token_ids": generation.token_ids, "answer": generation.text}
            _append(cache_file, record)
            cached[goal.id] = record
    sets: dict[str, list[EvalPrompt]] = {name: [] for name in PREFILL_SETS}
    for goal in goals:
        record = cached[goal.id]
        if judge.judge(goal.goal, record["answer"], True).refused:
            continue
        for name, n in PREFILL_SETS.items():
            prefix = pair.tokenizer.decode(record["token_ids"][:n], skip_special_tokens=True)
            sets[name].append(EvalPrompt(id=goal.id, prompt=goal.prompt, goal=goal.goal, harmful=True, prefix=prefix))
    return sets


def _trace_record(generation: Any) -> dict[str, Any]:
    trace = generation.trace
    return {
        **trace.summary(),
        "per_token": {
            "divergence": [round(d, 4) for d in trace.divergence],
            "potential": [round(v, 4) for v in trace.potential],
            "spikes": [int(s) for s in trace.spikes],
        },
    }


def _load_settings(out: Path, settings: EvalSettings, overwrite: bool) -> None:
    manifest = out / "run.json"
    if manifest.is_file() and not overwrite:
        previous = json.loads(manifest.read_text())
        old = {k: previous.get(k) for k in settings.identity()}
        if old != settings.identity():
            diff = {k: (old[k], v) for k, v in settings.identity().items() if old[k] != v}
            raise RunMismatchError(
                f"{out} holds a run with other settings {diff} (old, new); use another --output-dir or --overwrite"
            )
    elif overwrite:
        for name in ("records.jsonl", "prefill.jsonl", "results.json", "table.md", "tradeoff.png"):
            (out / name).unlink(missing_ok=True)
    manifest.write_text(json.dumps(settings.__dict__, indent=2))


def run_evaluation(
    pair: ModelPair,
    output_dir: str | Path,
    settings: EvalSettings | None = None,
    *,
    judge: Judge | None = None,
    ngsd_config: Any = None,
    progress: bool = True,
    overwrite: bool = False,
    extra_datasets: dict[str, list[EvalPrompt]] | None = None,
) -> dict[str, Any]:
    """Run ``settings.defences`` over ``settings.datasets`` on ``pair``; return ``results.json``'s content.

    Already answered (dataset, defence, prompt) triples found in ``output_dir`` are skipped, so
    calling again after an interruption finishes the run. ``extra_datasets`` adds in-memory
    sets by name (a ``settings.datasets`` entry may also be a JSON/JSONL/CSV path).
    """
    from tqdm.auto import tqdm

    from .report import metrics, write_report

    settings = settings or EvalSettings()
    judge = judge or RefusalJudge()
    settings.base_id = settings.base_id or pair.base_id
    settings.expert_id = settings.expert_id or pair.expert_id
    settings.judge = judge.name
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _load_settings(out, settings, overwrite)
    records_file = out / "records.jsonl"
    records = read_records(records_file)
    done = {(r["dataset"], r["defence"], r["id"]) for r in records}

    datasets: dict[str, list[EvalPrompt]] = {}
    prefill_names = [d for d in settings.datasets if d in PREFILL_SETS]
    for name in settings.datasets:
        if name in PREFILL_SETS:
            continue
        source = (extra_datasets or {}).get(name) or load_dataset(name)
        datasets[name] = sample(source, settings.limit, settings.seed)
    if prefill_names:
        goals = sample(load_dataset(PREFILL_SOURCE), settings.limit, settings.seed)
        built = build_prefill_prompts(pair, goals, out / "prefill.jsonl", settings.prefill_answer_tokens, progress=progress)
        datasets.update({name: built[name] for name in prefill_names})

    defences = build_defences(pair, settings.defences, ngsd_alpha=settings.ngsd_alpha, ngsd_config=ngsd_config)
    for name, prompts in datasets.items():
        todo = [(p, d) for p in prompts for d in defences if (name, d.name, p.id) not in done]
        for prompt, defence in tqdm(todo, desc=f"{name}", disable=not progress or not todo):
            answer = defence.answer(prompt, settings.max_new_tokens)
            generation = answer.generation
            verdict = judge.judge(prompt.goal, generation.text, prompt.harmful)
            record = {
                "dataset": name,
                "defence": defence.name,
                **prompt.to_dict(),
                "output": generation.text,
                "finish_reason": generation.finish_reason,
                "tokens": len(generation.token_ids),
                "wall_seconds": round(answer.wall_seconds, 4),
                "judgement": verdict.to_dict(),
                "trace": _trace_record(generation),
            }
            _append(records_file, record)
            records.append(record)
            done.add((name, defence.name, prompt.id))

    wanted = {(n, d.name, p.id) for n, ps in datasets.items() for p in ps for d in defences}
    final = [r for r in records if (r["dataset"], r["defence"], r["id"]) in wanted]
    results = {
        "settings": settings.__dict__,
        "defences": {d.name: {"description": d.description, "settings": d.settings} for d in defences},
        "datasets": {name: len(prompts) for name, prompts in datasets.items()},
        "metrics": metrics(final, settings.datasets, settings.defences),
        "records": final,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    write_report(results, out)
    return results
