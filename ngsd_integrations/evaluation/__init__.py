"""Safety evaluation: datasets, judges, baselines and the runner behind ``ngsd eval``.

Example::

    from ngsd_integrations.models import default_pair
    from ngsd_integrations.evaluation import EvalSettings, run_evaluation

    results = run_evaluation(default_pair(), "eval-out", EvalSettings(limit=5, max_new_tokens=48))
    print(results["metrics"]["per_defence"]["ngsd-risk"]["attack_success_rate"])
"""

from .datasets import BUNDLED, PREFILL_SETS, EvalPrompt, dataset_names, load_dataset, load_user_dataset
from .defences import DEFENCES, Defence, build_defences
from .judges import Judgement, LLMJudge, RefusalJudge
from .report import metrics, render_markdown, write_report
from .runner import EvalSettings, RunMismatchError, build_prefill_prompts, run_evaluation
from .safedecoding import SafeDecoder, safedecoding_distribution

__all__ = [
    "BUNDLED",
    "DEFENCES",
    "PREFILL_SETS",
    "Defence",
    "EvalPrompt",
    "EvalSettings",
    "Judgement",
    "LLMJudge",
    "RefusalJudge",
    "RunMismatchError",
    "SafeDecoder",
    "build_defences",
    "build_prefill_prompts",
    "dataset_names",
    "load_dataset",
    "load_user_dataset",
    "metrics",
    "render_markdown",
    "run_evaluation",
    "safedecoding_distribution",
    "write_report",
]
