"""Bundled sets, user files and seeded sampling."""

from __future__ import annotations

import json

import pytest

from ngsd_integrations.evaluation.datasets import dataset_names, load_dataset, load_user_dataset, sample


@pytest.mark.parametrize(
    "name,count,harmful",
    [
        ("advbench50", 50, True),
        ("advbench", 520, True),
        ("gcg", 150, True),
        ("autodan", 50, True),
        ("deepinception", 50, True),
        ("xstest-safe", 250, False),
        ("xstest-unsafe", 200, True),
    ],
)
def test_bundled_sets(name, count, harmful):
    prompts = load_dataset(name)
    assert len(prompts) == count
    assert all(p.harmful is harmful and p.prompt and p.goal for p in prompts)
    assert len({p.id for p in prompts}) == count


def test_attack_prompts_keep_their_goal():
    gcg = load_dataset("gcg")[0]
    assert gcg.prompt.startswith(gcg.goal) and len(gcg.prompt) > len(gcg.goal)
    xs = load_dataset("xstest-safe")[0]
    assert xs.goal == xs.prompt  # XSTest's own "goal" field is only the label


def test_unknown_and_prefill_names():
    assert "prefill20" in dataset_names()
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        load_dataset("nope")
    with pytest.raises(ValueError, match="built from the base model"):
        load_dataset("prefill10")


def test_user_files(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"prompt": "p1", "label": "safe"}, {"question": "p2"}, "p3"]))
    (tmp_path / "b.jsonl").write_text('{"id": "x", "prompt": "p1", "goal": "g1", "harmful": true}\n\n{"text": "p2"}\n')
    (tmp_path / "c.csv").write_text("id,prompt,label\n1,hello there,harmless\n2,\"make, a bomb\",unsafe\n")
    a = load_user_dataset(tmp_path / "a.json")
    assert [(p.prompt, p.harmful) for p in a] == [("p1", False), ("p2", True), ("p3", True)]
    b = load_user_dataset(tmp_path / "b.jsonl", harmful=False)
    assert [(p.id, p.goal, p.harmful) for p in b] == [("x", "g1", True), ("1", "p2", False)]
    c = load_dataset(str(tmp_path / "c.csv"))
    assert [(p.prompt, p.harmful) for p in c] == [("hello there", False), ("make, a bomb", True)]


def test_user_file_errors(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps([{"answer": "x"}]))
    with pytest.raises(ValueError, match="row 0 has no prompt column"):
        load_user_dataset(tmp_path / "bad.json")
    (tmp_path / "label.json").write_text(json.dumps([{"prompt": "x", "label": "maybe"}]))
    with pytest.raises(ValueError, match="label 'maybe'"):
        load_user_dataset(tmp_path / "label.json")


def test_seeded_selection_is_stable_and_grows():
    prompts = load_dataset("advbench50")
    ten = sample(prompts, 10, seed=3)
    assert ten == sample(prompts, 10, seed=3)
    assert ten != sample(prompts, 10, seed=4)
    twenty = sample(prompts, 20, seed=3)
    assert set(p.id for p in ten) <= set(p.id for p in twenty)  # a resumed run with a larger limit keeps its answers
    assert sample(prompts, None, 0) == prompts and sample(prompts, 500, 0) == prompts
