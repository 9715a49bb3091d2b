"""Throughput of NGSD against plain decoding, measured side by side in one process.

Four ways of producing the same number of greedy tokens (EOS ignored) from one prompt:

* ``generate``: plain ``model.generate()`` of the base alone (no adapter wrappers) with its cache;
* ``forwards``: a bare loop of exactly the forward passes NGSD needs (the same batched
  base+expert forward), with no gate, divergence or blend: the floor for our loop;
* ``ngsd``: ``GatedDecoder.generate`` with the risk rating and the neuron;
* ``strawman``: both models recompute the whole sequence every step (no KV cache), the way the
  reference implementation decodes. Its per-step cost grows with the length, so it is timed
  at evenly spaced lengths and summed by linear interpolation (``strawman_samples``).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]


def _timed(fn: Any) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def measure_throughput(
    new_tokens: int, *, pair: Any = None, plain_base: Any = None, repeats: int = 1, strawman_samples: int = 12
) -> dict[str, float]:
    """Seconds per token of each way (best of ``repeats``) for ``new_tokens`` greedy tokens."""
    from .config import GenerationOptions, NGSDConfig
    from .decoder import GatedDecoder, _ModelForward
    from .models import default_pair, embedded_base_path

    pair = pair or default_pair()
    if plain_base is None:
        from transformers import AutoModelForCausalLM

        plain_base = AutoModelForCausalLM.from_pretrained(embedded_base_path(), dtype=pair.base.dtype).eval()
    decoder = GatedDecoder(pair, NGSDConfig())
    prompt_ids = decoder.tokenizer.encode(decoder.render(PROMPT), add_special_tokens=False)
    forward = _ModelForward(pair)

    def plain() -> None:
        with torch.inference_mode():
            plain_base.generate(
                torch.tensor([prompt_ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
            )

    def bare_forwards() -> None:
        caches = [forward.new_cache(), forward.new_cache()]
        ids = torch.tensor([prompt_ids])
        mask = torch.ones_like(ids)
        batch = (ids, mask)
        for _ in range(new_tokens):
            logits_base, _ = forward.dual(caches, batch, batch)
            token = logits_base.argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            batch = (token, mask)

    def ngsd() -> None:
        decoder.generate(PROMPT, GenerationOptions(max_new_tokens=new_tokens, ignore_eos=True))

    def strawman_step(length: int) -> float:
        ids = torch.tensor([(prompt_ids * (length // len(prompt_ids) + 1))[:length]])
        with torch.inference_mode():
            def step() -> None:
                if pair.is_adapter_pair:
                    pair.base(input_ids=torch.cat([ids, ids]), adapter_names=["__base__", pair.adapter_name])
                else:
                    pair.base(input_ids=ids)
                    pair.expert(input_ids=ids)
            return _timed(step)

    def strawman_total() -> float:
        lengths = torch.linspace(len(prompt_ids), len(prompt_ids) + new_tokens - 1, strawman_samples).round().long()
        samples = [strawman_step(int(n)) for n in lengths]
        every = torch.arange(len(prompt_ids), len(prompt_ids) + new_tokens, dtype=torch.float64)
        return float(torch.tensor(_interp(every.tolist(), lengths.tolist(), samples)).sum())

    ngsd()  # warm-up: the risk rater's prefix cache and the first-call allocations
    results = {
        "generate": min(_timed(plain) for _ in range(repeats)),
        "forwards": min(_timed(bare_forwards) for _ in range(repeats)),
        "ngsd": min(_timed(ngsd) for _ in range(repeats)),
        "strawman": strawman_total(),
    }
    return {name: seconds / new_tokens for name, seconds in results.items()}


def _interp(xs: Sequence[float], known_x: Sequence[int], known_y: Sequence[float]) -> list[float]:
    out = []
    for x in xs:
        j = max(i for i in range(len(known_x)) if known_x[i] <= x) if x >= known_x[0] else 0
        if j == len(known_x) - 1:
            out.append(known_y[j])
            continue
        x0, x1, y0, y1 = known_x[j], known_x[j + 1], known_y[j], known_y[j + 1]
        out.append(y0 + (y1 - y0) * (x - x0) / max(1, x1 - x0))
    return out


def print_throughput(new_tokens: Sequence[int] = (128, 512), *, repeats: int = 1, dtype: str = "float32") -> None:
    """Measure and print tokens/s and the ratios for each length."""
    from .models import default_pair

    pair = default_pair(dtype=dtype)
    print(f"threads: {torch.get_num_threads()}, dtype: {dtype}, expert: {'LoRA adapter (one batched forward)' if pair.is_adapter_pair else 'separate model'}")
    print(f"{'tokens':>6} {'generate':>9} {'forwards':>9} {'ngsd':>9} {'strawman':>9}   ngsd/forwards  ngsd/generate  strawman/ngsd")
    for n in new_tokens:
        r = measure_throughput(n, pair=pair, repeats=repeats)
        tps = {k: 1.0 / v for k, v in r.items()}
        print(
            f"{n:>6} {tps['generate']:>9.2f} {tps['forwards']:>9.2f} {tps['ngsd']:>9.2f} {tps['strawman']:>9.2f}"
            f"   {r['ngsd'] / r['forwards']:>13.3f}  {r['ngsd'] / r['generate']:>13.3f}  {r['strawman'] / r['ngsd']:>13.2f}"
        )
    print("columns 2-5: tokens/s (greedy, EOS ignored); ratios are time per token.")
