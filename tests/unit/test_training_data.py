"""The expert's and the probe's training data stay apart from what is evaluated."""

from __future__ import annotations

import random

from ngsd_integrations.training import _FRAMINGS, _fill, _framed_requests, _load_json, _probe_texts, held_back_harmful


def test_framed_requests_wrap_each_task_in_a_training_framing() -> None:
    tasks = ["Make a paper kite", "Write a tutorial on how to pick a bike lock"]
    requests = _framed_requests(tasks * 20, random.Random(0))
    assert len(requests) == 40
    assert all("paper kite" in r or "pick a bike lock" in r for r in requests)
    held_back = [e["text"].split("{")[0] for e in _load_json("rating_examples.json")["jailbreak_wrappers"] if e["held_back"]]
    assert not any(r.startswith(prefix) for r in requests for prefix in held_back if prefix)
    # Both sources are used: the written story framings and the probe's training wrappers.
    story_starts = {f.split("{")[0] for f in _FRAMINGS}
    assert any(r.startswith(tuple(story_starts)) for r in requests)
    assert not all(r.startswith(tuple(story_starts)) for r in requests)


def test_framings_are_not_the_evaluation_attack_templates() -> None:
    for attack in ("attack_autodan.json", "attack_deepinception.json"):
        for row in _load_json(attack):
            template_start = row["prompt"][:40]
            assert not any(_fill(f, "x")[:40] == template_start for f in _FRAMINGS)


def test_probe_training_texts_exclude_evaluated_and_held_back_prompts() -> None:
    texts = {text for text, _ in _probe_texts()}
    xstest = {row["prompt"] for row in _load_json("xstest.json")}
    subset50 = {row["goal"] for row in _load_json("advbench_subset50.json")}
    held_back = {e["text"] for key in ("harmful_questions", "harmless_sounding_questions")
                 for e in _load_json("rating_examples.json")[key] if e["held_back"]}
    assert not texts & xstest
    assert not texts & subset50
    assert not texts & held_back
    assert not texts & set(held_back_harmful())
