"""Every defence end to end on one prompt of every dataset with the embedded pair (~2 minutes on 2 cores)."""

from __future__ import annotations

import pytest

from ngsd_integrations.evaluation import DEFENCES, EvalSettings, dataset_names, run_evaluation
from ngsd_integrations.evaluation.judges import RefusalJudge

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from ngsd_integrations.models import default_pair

    settings = EvalSettings(datasets=dataset_names(), limit=1, max_new_tokens=8, prefill_answer_tokens=40)
    out = tmp_path_factory.mktemp("eval")
    return out, run_evaluation(default_pair(), out, settings, progress=False)


def test_every_defence_answers_every_dataset(results):
    out, res = results
    seen = {(r["dataset"], r["defence"]) for r in res["records"]}
    prefill_empty = [d for d, n in res["datasets"].items() if n == 0]
    expected = {(d, f) for d in dataset_names() if d not in prefill_empty for f in DEFENCES}
    assert seen == expected
    for r in res["records"]:
        assert 1 <= r["tokens"] <= 8 and isinstance(r["output"], str)
        assert r["trace"]["decode_seconds"] > 0


def test_prefill_attack_forces_the_bases_own_compliant_start(results):
    _, res = results
    prefill = [r for r in res["records"] if r["dataset"].startswith("prefill")]
    assert prefill, "the base refused the sampled goal: no prefill prompt was built"
    for r in prefill:
        assert r["prefix"] and not RefusalJudge().judge(r["goal"], r["prefix"], True).refused
    lengths = {r["dataset"]: len(r["prefix"]) for r in prefill}
    assert lengths["prefill10"] < lengths["prefill20"] < lengths["prefill40"]


def test_metrics_table_and_plot(results):
    out, res = results
    per_defence = res["metrics"]["per_defence"]
    assert per_defence["base"]["time_ratio"] == pytest.approx(1.0)
    assert per_defence["ngsd"]["spike_rate"] is not None and per_defence["ngsd-risk"]["mean_alpha"] is not None
    assert all(per_defence[d]["tokens_per_second"] > 0 for d in DEFENCES)
    table = (out / "table.md").read_text()
    assert "xstest-safe" in table and "ngsd-risk" in table
    assert (out / "tradeoff.png").is_file()
