"""The shared pair registry: lazy, one load per (base, expert, dtype, device), framework-free."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from ngsd_integrations import GatedDecoder, NGSDConfig, registry


@pytest.fixture(autouse=True)
def empty_registry():
    registry.clear_pairs()
    yield
    registry.clear_pairs()


@pytest.fixture
def fake_loader(monkeypatch, tiny_separate_pair):
    calls = []

    def load_pair(base, expert, **kwargs):
        calls.append((str(base), str(expert), kwargs))
        time.sleep(0.05)  # widen the race window
        return tiny_separate_pair

    monkeypatch.setattr(registry, "load_pair", load_pair)
    return calls


def test_same_arguments_share_one_pair(fake_loader, tmp_path):
    expert = tmp_path / "expert"
    expert.mkdir()
    first = registry.get_decoder("org/base", str(expert))
    second = registry.get_decoder("org/base", expert, config=NGSDConfig())
    assert first is second  # same pair, equal config: one cached decoder
    from ngsd_integrations import GateConfig

    third = registry.get_decoder("org/base", expert, config=NGSDConfig(gate=GateConfig(alpha=0.5)))
    assert third is not first and third.pair is first.pair
    assert len(fake_loader) == 1 and fake_loader[0][2] == {"dtype": "float32", "device": "cpu"}


def test_relative_and_absolute_paths_share(fake_loader, tmp_path, monkeypatch):
    (tmp_path / "expert").mkdir()
    monkeypatch.chdir(tmp_path)
    registry.get_pair("org/base", "expert")
    registry.get_pair("org/base", str(tmp_path / "expert"))
    assert len(fake_loader) == 1


def test_dtype_and_device_are_part_of_the_key(fake_loader):
    registry.get_pair("org/base", "org/expert")
    registry.get_pair("org/base", "org/expert", dtype="bfloat16")
    assert [c[2]["dtype"] for c in fake_loader] == ["float32", "bfloat16"]


def test_concurrent_first_requests_load_once(fake_loader):
    pairs = []
    threads = [threading.Thread(target=lambda: pairs.append(registry.get_pair("org/base", "org/expert"))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(fake_loader) == 1 and len({id(p) for p in pairs}) == 1


def test_decoders_get_their_own_config(fake_loader):
    from ngsd_integrations import GateConfig

    config = NGSDConfig(gate=GateConfig(mode="never"))
    decoder = registry.get_decoder("org/base", "org/expert", config=config)
    assert isinstance(decoder, GatedDecoder) and decoder.config == config
    assert registry.get_decoder("org/base", "org/expert").config == NGSDConfig()


def test_custom_base_without_expert_is_refused(fake_loader):
    with pytest.raises(ValueError, match="expert=None"):
        registry.get_pair("org/some-other-base")
    assert fake_loader == []


def test_register_pair(tiny_adapter_pair):
    registry.register_pair(tiny_adapter_pair, "my-base", "my-expert")
    assert registry.get_pair("my-base", "my-expert") is tiny_adapter_pair
    assert registry.get_decoder("my-base", "my-expert").pair is tiny_adapter_pair
    assert list(registry.loaded_pairs()) == [("my-base", "my-expert", "float32", "cpu")]


def test_default_pair_goes_through_models_default_pair(monkeypatch, tiny_adapter_pair):
    calls = []
    monkeypatch.setattr(registry, "default_pair", lambda dtype: calls.append(dtype) or tiny_adapter_pair)
    assert registry.get_pair() is tiny_adapter_pair
    assert registry.get_pair() is tiny_adapter_pair
    assert calls == ["float32"]


def test_importing_the_core_imports_no_framework():
    code = (
        "import sys, ngsd_integrations, ngsd_integrations.registry, ngsd_integrations.tools\n"
        "bad = [m for m in sys.modules if m.startswith(('llama_index', 'langchain'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
