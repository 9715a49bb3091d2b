"""Baselines decoded on the same models as NGSD: the base alone, and SafeDecoding's rule.

SafeDecoding (Xu et al., ACL 2024), written from the paper's description: for each of the first
``first_tokens`` output tokens, the sample space is the intersection of the base's and the
expert's top-``k`` tokens, with ``k`` starting at ``top_k`` and grown until the intersection
holds at least ``min_common`` tokens; on it the probability is
``p_base + alpha * (p_expert - p_base)`` (floored at 1e-8, renormalised) and the greedy token is
its argmax. After those tokens the base model continues alone. With ``first_tokens=0`` this is
plain KV-cached greedy decoding of the base model (adapter disabled): the speed baseline.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..decoder import Generation, _left_pad, _ModelForward, end_and_pad_ids
from ..divergence import total_variation
from ..models import ModelPair
from ..trace import SafetyTrace

__all__ = ["SafeDecoder", "safedecoding_distribution"]


def safedecoding_distribution(
    p_base: torch.Tensor, p_expert: torch.Tensor, alpha: float = 3.0, top_k: int = 10, min_common: int = 5
) -> tuple[torch.Tensor, torch.Tensor]:
    """SafeDecoding's sample space and its probabilities for one position (1-D probability rows).

    Returns ``(token_ids, probs)``: the common tokens in increasing id order and their
    renormalised constructed probabilities. Inputs are not modified.
    """
    if p_base.dim() != 1 or p_base.shape != p_expert.shape:
        raise ValueError(f"expected two 1-D rows of equal size, got {tuple(p_base.shape)} and {tuple(p_expert.shape)}")
    if top_k < 1 or min_common < 1:
        raise ValueError(f"top_k={top_k} and min_common={min_common} must be at least 1")
    vocab = p_base.shape[0]
    positions = torch.arange(vocab)
    rank_base = torch.empty(vocab, dtype=torch.long)
    rank_base[torch.argsort(p_base, descending=True, stable=True)] = positions
    rank_expert = torch.empty(vocab, dtype=torch.long)
    rank_expert[torch.argsort(p_expert, descending=True, stable=True)] = positions
    # A token is in both top-k lists exactly when its worse rank is below k: the smallest k
    # with min_common such tokens is one past the min_common-th smallest worse rank.
    worse = torch.maximum(rank_base, rank_expert)
    needed = int(worse.kthvalue(min(min_common, vocab)).values) + 1
    k = max(top_k, needed)
    token_ids = torch.nonzero(worse < k).view(-1)
    constructed = p_base[token_ids] + alpha * (p_expert[token_ids] - p_base[token_ids])
    constructed = constructed.clamp_min(1e-8)
    return token_ids, constructed / constructed.sum()


class SafeDecoder:
    """KV-cached greedy decoding guided by SafeDecoding's rule for the first tokens.

    Args:
        pair: the base model and its expert (the expert is unused when ``first_tokens=0``).
        alpha, first_tokens, top_k, min_common: the rule's settings (paper defaults 3, 2, 10, 5).
    """

    def __init__(self, pair: ModelPair, alpha: float = 3.0, first_tokens: int = 2, top_k: int = 10, min_common: int = 5):
        if first_tokens < 0:
            raise ValueError(f"first_tokens={first_tokens} must not be negative")
        if first_tokens and pair.expert is None and not pair.is_adapter_pair:
            raise ValueError("SafeDecoding needs an expert; this pair has none")
        self.pair, self.alpha, self.first_tokens, self.top_k, self.min_common = pair, alpha, first_tokens, top_k, min_common
        self.tokenizer = pair.tokenizer
        self.eos_ids, self.pad_id = end_and_pad_ids(pair)
        self._forward = _ModelForward(pair)

    def _encode(self, messages: list[dict[str, Any]], tokenizer: Any, assistant_prefix: str) -> list[int]:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + assistant_prefix
        return tokenizer.encode(text, add_special_tokens=False)

    def _base_step(self, ids: torch.Tensor, mask: torch.Tensor, cache: Any) -> torch.Tensor:
        extra = {"adapter_names": ["__base__"]} if self.pair.is_adapter_pair else {}
        return self._forward._call(self.pair.base, ids, mask, cache, **extra)[0]

    def generate(self, messages: list[dict[str, Any]], max_new_tokens: int = 64, assistant_prefix: str = "") -> Generation:
        """Greedy answer to chat ``messages``; ``assistant_prefix`` is forced and not returned."""
        base = _left_pad([self._encode(messages, self.tokenizer, assistant_prefix)], self.pad_id)
        expert_tok = self.pair.expert_tokenizer
        if expert_tok is not None and expert_tok is not self.tokenizer:
            expert = _left_pad([self._encode(messages, expert_tok, assistant_prefix)], self.pad_id)
        else:
            expert = base
        trace = SafetyTrace(alpha=self.alpha if self.first_tokens else 0.0, prompt_tokens=base[0].shape[1])
        guided = self.first_tokens > 0
        started = time.perf_counter()
        if guided:
            caches = [self._forward.new_cache(), self._forward.new_cache()]
            logits_base, logits_expert = self._forward.dual(caches, base, expert)
        else:
            caches = [self._forward.new_cache()]
            logits_base, logits_expert = self._base_step(*base, caches[0]), None
        trace.prefill_seconds = time.perf_counter() - started
        started = time.perf_counter()
        mask, expert_mask = base[1], expert[1]
        finish = "length"
        while True:
            step = trace.tokens
            if guided:
                # First tokens: SafeDecoding's constructed distribution over the common top-k.
                p_base, p_expert = logits_base.view(-1).softmax(-1), logits_expert.view(-1).softmax(-1)
                ids, probs = safedecoding_distribution(p_base, p_expert, self.alpha, self.top_k, self.min_common)
                token = int(ids[probs.argmax()])
                trace.record(token, float(total_variation(p_base, p_expert)), 0.0, True)
            else:
                # Afterwards (or throughout for the base alone): the base's greedy token.
                token = int(logits_base.view(-1).argmax())
                trace.record(token, 0.0, 0.0, False)
            if token in self.eos_ids:
                finish = "stop"
                break
            if trace.tokens >= max_new_tokens:
                break
            new = torch.tensor([[token]])
            mask = torch.cat([mask, torch.ones_like(new)], dim=1)
            if guided and step + 1 < self.first_tokens:
                expert_mask = torch.cat([expert_mask, torch.ones_like(new)], dim=1)
                logits_base, logits_expert = self._forward.dual(caches, (new, mask), (new, expert_mask))
                continue
            if guided:
                # Guidance is over: keep only the base rows of the cache and go on alone.
                guided = False
                if self.pair.is_adapter_pair:
                    caches[0].batch_select_indices(torch.tensor([0]))
                caches = caches[:1]
            logits_base = self._base_step(new, mask, caches[0])
        trace.decode_seconds = time.perf_counter() - started
        trace.finish_reason = finish
        token_ids = trace.token_ids
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        return Generation(text, list(token_ids), finish, trace)
