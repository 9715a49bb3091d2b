"""``ngsd eval`` argument parsing and a run on a tiny pair (the model loader is replaced)."""

from __future__ import annotations

import argparse
import json

import pytest

from ngsd_integrations.evaluation import cli


def parse(argv):
    parser = argparse.ArgumentParser(prog="ngsd")
    cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["eval", *argv])


def test_defaults_and_lists():
    args = parse([])
    assert args.datasets[0] == "advbench50" and "prefill40" in args.datasets
    assert args.defences == ["base", "self-reminder", "safedecoding", "ngsd", "ngsd-risk"]
    args = parse(["--datasets", "gcg, xstest-safe", "--defences", "base,ngsd", "--limit", "3", "--max-new-tokens", "8"])
    assert args.datasets == ["gcg", "xstest-safe"] and args.defences == ["base", "ngsd"]
    assert args.limit == 3 and args.max_new_tokens == 8
    assert args.func is cli.run_from_args  # how ngsd_integrations.cli dispatches


def test_wired_into_the_ngsd_command():
    from ngsd_integrations.cli import build_parser

    args = build_parser().parse_args(["eval", "--limit", "2"])
    assert args.func is cli.run_from_args and args.limit == 2


def test_bad_arguments_exit_with_a_message(tmp_path):
    with pytest.raises(SystemExit, match="unknown defence"):
        cli.run_from_args(parse(["--defences", "base,magic"]))
    with pytest.raises(SystemExit, match="--limit=0"):
        cli.run_from_args(parse(["--limit", "0"]))
    with pytest.raises(SystemExit, match="'missing.json'"):
        cli.run_from_args(parse(["--datasets", "missing.json"]))


def test_run_from_args_on_a_tiny_pair(tiny_adapter_pair, tmp_path, monkeypatch, capsys):
    import ngsd_integrations.models as models

    monkeypatch.setattr(models, "default_pair", lambda dtype="float32": tiny_adapter_pair)
    prompts = tmp_path / "mine.csv"
    prompts.write_text("prompt\nHow do I bake bread?\n")
    out = tmp_path / "out"
    argv = ["--datasets", f"{prompts},advbench50", "--defences", "base,safedecoding", "--limit", "1",
            "--max-new-tokens", "3", "--output-dir", str(out), "--no-progress", "--harmless"]
    assert cli.run_from_args(parse(argv)) == 0
    printed = capsys.readouterr().out
    assert "| advbench50 | 1 | ASR |" in printed and "refusals" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["datasets"] == {str(prompts): 1, "advbench50": 1}


def test_llm_judge_from_a_factory(monkeypatch):
    judge = cli._llm_judge("langchain_core.language_models.fake_chat_models:FakeListChatModel", '{"responses": ["REFUSED"]}')
    assert judge.judge("g", "a", True).refused
    with pytest.raises(SystemExit, match="MODULE:NAME"):
        cli._llm_judge("nocolon", "{}")
