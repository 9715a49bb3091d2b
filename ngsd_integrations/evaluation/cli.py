"""``ngsd eval``: run defences over datasets on a model pair and write results, tables and plot.

The lead's ``ngsd_integrations.cli`` wires this in with ``add_parser(subparsers)`` and calls
``run_from_args(args)`` for the ``eval`` command.
"""

from __future__ import annotations

import argparse
import importlib
import json
from typing import Any

from .datasets import BUNDLED, PREFILL_SETS
from .defences import DEFENCES
from .runner import DEFAULT_DATASETS

__all__ = ["add_parser", "run_from_args"]

_EPILOG = f"""datasets: {', '.join([*BUNDLED, *PREFILL_SETS])}, or a JSON / JSONL / CSV file with a prompt column
defences: {', '.join(DEFENCES)}

example (the README table):
  ngsd eval --limit 10 --max-new-tokens 48 --output-dir docs/eval
"""


def _csv(value: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"{value!r} names nothing")
    return items


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``eval`` sub-command to an ``argparse`` sub-parser collection."""
    p = subparsers.add_parser(
        "eval",
        help="measure attack success, over-refusal and speed of the defences on a model pair",
        description="Run defences over safety datasets; results are written as they come, so rerunning the "
        "same command resumes an interrupted run.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--base", help="base model: hub id, folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--expert", help="expert: peft adapter folder or a causal LM sharing the base's vocabulary (default: the embedded LoRA expert)")
    p.add_argument("--risk-probe", help="risk probe file trained on --base (`ngsd train-probe`); the embedded base has one")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--datasets", type=_csv, default=",".join(DEFAULT_DATASETS), help="comma-separated names or files (default: %(default)s)")
    p.add_argument("--defences", type=_csv, default=",".join(DEFENCES), help="comma-separated (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="at most N prompts per dataset, a seeded random choice")
    p.add_argument("--seed", type=int, default=0, help="seed of the --limit choice")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--alpha", type=float, default=0.9, help="blend strength of the fixed-alpha ngsd defence")
    p.add_argument("--harmless", action="store_true", help="user files without a label column hold harmless prompts (default: harmful)")
    p.add_argument("--llm-judge", metavar="MODULE:NAME", help="LangChain chat model class/factory to judge with, e.g. langchain_ollama:ChatOllama")
    p.add_argument("--llm-judge-kwargs", default="{}", metavar="JSON", help='its keyword arguments, e.g. \'{"model": "llama3.1"}\'')
    p.add_argument("--output-dir", default="ngsd-eval", help="folder for run.json, records.jsonl, results.json, table.md, tradeoff.png")
    p.add_argument("--overwrite", action="store_true", help="discard an earlier run in --output-dir instead of resuming it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_from_args)
    return p


def _llm_judge(spec: str, kwargs_json: str) -> Any:
    from .judges import LLMJudge

    module, _, name = spec.partition(":")
    if not name:
        raise SystemExit(f"--llm-judge={spec!r} must look like MODULE:NAME")
    target = getattr(importlib.import_module(module), name)
    kwargs = json.loads(kwargs_json)
    # A class or factory is called with the keyword arguments; a ready chat model is used as is.
    is_factory = isinstance(target, type) or (callable(target) and not hasattr(target, "invoke"))
    return LLMJudge(target(**kwargs) if is_factory else target)


def run_from_args(args: argparse.Namespace) -> int:
    """Run ``ngsd eval`` with parsed arguments; print the table; return the exit status."""
    from ..models import default_pair, load_pair
    from ..risk import RiskProbe
    from .datasets import load_user_dataset
    from .runner import EvalSettings, run_evaluation

    if args.limit is not None and args.limit < 1:
        raise SystemExit(f"--limit={args.limit} must be at least 1")
    unknown = [d for d in args.defences if d not in DEFENCES]
    if unknown:
        raise SystemExit(f"unknown defence(s) {unknown}: use {', '.join(DEFENCES)}")
    extra = {}
    for name in args.datasets:
        if name not in BUNDLED and name not in PREFILL_SETS:
            try:
                extra[name] = load_user_dataset(name, harmful=not args.harmless)
            except (OSError, ValueError) as error:
                raise SystemExit(f"dataset {name!r}: {error}") from error
    judge = _llm_judge(args.llm_judge, args.llm_judge_kwargs) if args.llm_judge else None
    if args.base:
        pair = load_pair(args.base, args.expert, dtype=args.dtype, device=args.device, risk_probe=args.risk_probe)
    elif args.expert:
        from ..models import embedded_base_path, default_probe_path

        pair = load_pair(embedded_base_path(), args.expert, dtype=args.dtype, device=args.device, risk_probe=args.risk_probe)
        if pair.risk_probe is None:
            pair.risk_probe = RiskProbe.load(default_probe_path(pair))
    else:
        pair = default_pair(dtype=args.dtype)
    settings = EvalSettings(
        datasets=list(args.datasets),
        defences=list(args.defences),
        limit=args.limit,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        ngsd_alpha=args.alpha,
    )
    results = run_evaluation(
        pair, args.output_dir, settings, judge=judge, progress=not args.no_progress, overwrite=args.overwrite, extra_datasets=extra
    )
    from .report import render_markdown

    print(render_markdown(results))
    print(f"written: {args.output_dir}/results.json, table.md, tradeoff.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: ``python -m ngsd_integrations.evaluation.cli ...``."""
    parser = argparse.ArgumentParser(prog="ngsd")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
