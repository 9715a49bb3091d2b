"""GatedDecoder: the KV-cached dual-model decoding loop of neuron-gated safe decoding.

Per token: both models' next-token distributions, their divergence, one step of the LIF
neuron, and on a spike the union-top-k blend; otherwise the base model's token. All state of a
generation (KV caches, neuron, grammar matchers, trace) lives in a ``_Run`` created per call,
so one decoder serves concurrent callers.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Generator, Iterator, Mapping, Sequence, Union

import torch

from .blend import union_top_k_blend
from .config import GenerationOptions, NGSDConfig
from .constraints import GrammarConstraint, GrammarState
from .divergence import get_divergence
from .early_stop import EarlyStopper, contains_refusal, ends_sentence
from .gate import LIFGate
from .models import ModelPair
from .risk import ProbeRater, RiskAssessment, RiskRater
from .trace import SafetyTrace

Message = Mapping[str, Any]
Prompt = Union[str, Sequence[Message]]
"""A raw prompt string (used verbatim) or chat messages (rendered with the chat template)."""


_REFUSAL_TAIL = 200
"""Characters at the end of grammar-bound output searched for a refusal phrase."""


class PromptTooLongError(ValueError):
    """The prompt plus the requested new tokens do not fit the model's context window."""


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of one row, with what the neuron saw when choosing it."""

    row: int
    index: int
    token_id: int
    text: str
    """Newly visible text (may be empty while a possible stop string or partial character is held back)."""
    divergence: float
    potential: float
    spike: bool
    alpha: float
    finish_reason: str | None = None
    """Set on a row's last event: ``stop`` (EOS, stop string or grammar end), ``length``,
    ``early_stop``, ``refused`` (grammar-bound output the gate turned into a refusal) or
    ``cancelled``."""
    trace: SafetyTrace | None = None
    """The row's complete trace, on its last event only."""


@dataclass
class Generation:
    """A finished answer with its safety trace."""

    text: str
    token_ids: list[int]
    finish_reason: str
    trace: SafetyTrace

    @property
    def usage(self) -> dict[str, int]:
        prompt, completion = self.trace.prompt_tokens, len(self.token_ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class GatedDecoder:
    """Generates with a base model, guarded token by token by a safety expert and one neuron.

    Args:
        pair: the base model and its expert (see ``models.load_pair`` / ``models.default_pair``).
        config: neuron, risk rating and early-stop settings; per-call options go to ``generate``.
    """

    def __init__(self, pair: ModelPair, config: NGSDConfig | None = None):
        self.pair = pair
        self.config = config or NGSDConfig()
        self.tokenizer = pair.tokenizer
        self.divergence = get_divergence(self.config.gate.divergence)
        self.vocab_size = int(pair.base.config.get_text_config().vocab_size)
        self.context_window = int(getattr(pair.base.config.get_text_config(), "max_position_embeddings", 0) or 0)
        self.eos_ids, self.pad_id = end_and_pad_ids(pair)
        self._rater: RiskRater | ProbeRater | None = None
        self._rater_lock = threading.Lock()

    # ---------------------------------------------------------------- public API
    def generate(self, prompt: Prompt, options: GenerationOptions | None = None, **kwargs: Any) -> Generation:
        """Generate one answer; keyword arguments are those of ``stream``."""
        return self.generate_batch([prompt], options, **kwargs)[0]

    def generate_batch(
        self, prompts: Sequence[Prompt], options: GenerationOptions | None = None, **kwargs: Any
    ) -> list[Generation]:
        """Generate answers for several prompts in one batch (left-padded, one neuron per row)."""
        run = self._start(prompts, options, **kwargs)
        for _ in self._decode(run):
            pass
        return run.results()

    def stream(
        self, prompt: Prompt, options: GenerationOptions | None = None, **kwargs: Any
    ) -> Generator[TokenEvent, None, Generation]:
        """Yield one ``TokenEvent`` per generated token and return the finished ``Generation``.

        Joined ``text`` equals ``generate().text``; ``result = yield from decoder.stream(...)``
        gets the generation (with its trace) at the end of a stream.

        Keyword arguments: ``constraint`` (a ``GrammarConstraint``), ``assistant_prefix`` (text
        the answer is forced to start with; not part of the output), ``alpha`` (fixed blend
        strength, skips the risk rating), ``risk_request`` (the text to rate instead of the
        last user message), ``cancel`` (a ``threading.Event`` that ends the generation),
        ``tools`` (function specs handed to the chat template, see ``render``).
        """
        run = self._start([prompt], options, **kwargs)
        yield from self._decode(run)
        return run.results()[0]

    def stream_batch(
        self, prompts: Sequence[Prompt], options: GenerationOptions | None = None, **kwargs: Any
    ) -> Iterator[TokenEvent]:
        """Like ``stream`` for several prompts; events of all rows interleave, tagged with ``row``."""
        run = self._start(prompts, options, **kwargs)
        yield from self._decode(run)

    def render(
        self,
        prompt: Prompt,
        tokenizer: Any | None = None,
        assistant_prefix: str = "",
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """The exact text a prompt is turned into before tokenisation.

        ``tools`` (OpenAI-style function specs) are handed to the chat template; templates
        without tool support ignore them, so callers put tools into the system message then.
        """
        tokenizer = tokenizer or self.tokenizer
        if isinstance(prompt, str):
            return prompt + assistant_prefix
        messages = [dict(m) for m in prompt]
        extra = {"tools": [dict(t) for t in tools]} if tools else {}
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
        return rendered + assistant_prefix

    def rate(self, request: str) -> RiskAssessment:
        """Risk rating of a request by the pair itself (the model named by ``rater``)."""
        return self._risk_rater().rate(request)

    # ---------------------------------------------------------------- the loop
    def _decode(self, run: "_Run") -> Iterator[TokenEvent]:
        logits_base, logits_expert = run.prefill()
        while True:
            # Next-token distributions in fp32, restricted by any grammar.
            p_base, p_expert = run.distributions(logits_base, logits_expert)
            # How strongly the expert disagrees, integrated by the neuron.
            divergence = self.divergence(p_base, p_expert)
            spike, potential = run.gate.step(divergence)
            # Base token without a spike; blended union-top-k token with one.
            scores, candidates = union_top_k_blend(p_base, p_expert, run.alpha, self.config.gate.top_k)
            tokens = torch.where(spike, run.pick(scores, candidates), run.pick_base(logits_base, p_base))
            # One host sync per token: ids for text and stop checks, numbers for the trace.
            yield from run.record(tokens, divergence, potential, spike)
            if run.finished:
                return
            logits_base, logits_expert = run.forward(tokens)

    # ---------------------------------------------------------------- set-up
    def _start(
        self,
        prompts: Sequence[Prompt],
        options: GenerationOptions | None,
        *,
        constraint: GrammarConstraint | None = None,
        assistant_prefix: str = "",
        alpha: float | None = None,
        risk_request: str | None = None,
        cancel: threading.Event | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> "_Run":
        options = options or GenerationOptions()
        if isinstance(prompts, (str, bytes)) or not prompts:
            raise ValueError(f"prompts={prompts!r} must be a non-empty list of prompts")
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha={alpha} must be between 0 and 1")
        encode = lambda tok: [self._encode(p, tok, assistant_prefix, tools, options, row) for row, p in enumerate(prompts)]  # noqa: E731
        base_ids = encode(self.tokenizer)
        expert_tok = self.pair.expert_tokenizer
        if self.pair.expert is not None and expert_tok is not None and expert_tok is not self.tokenizer:
            expert_ids = encode(expert_tok)  # the expert may render the prompt with its own template
        else:
            expert_ids = base_ids
        started = time.perf_counter()
        assessments: list[RiskAssessment | None] = []
        alphas: list[float] = []
        for prompt in prompts:
            if alpha is not None or not self.risk_enabled or self.config.gate.mode == "never":
                assessments.append(None)
                alphas.append(self.config.gate.alpha if alpha is None else alpha)
            else:
                assessment = self.rate(risk_request if risk_request is not None else _request_text(prompt))
                assessments.append(assessment)
                alphas.append(assessment.alpha)
        risk_seconds = (time.perf_counter() - started) / len(prompts)
        return _Run(self, base_ids, expert_ids, options, alphas, assessments, risk_seconds, constraint, cancel)

    def _encode(
        self, prompt: Prompt, tokenizer: Any, prefix: str, tools: Any, options: GenerationOptions, row: int
    ) -> list[int]:
        if _is_empty(prompt):
            raise ValueError(f"prompt {row} is empty: {prompt!r}")
        text = self.render(prompt, tokenizer, prefix, tools)
        ids = tokenizer.encode(text, add_special_tokens=isinstance(prompt, str))
        limit = self.config.max_prompt_tokens or (self.context_window - options.max_new_tokens)
        if self.context_window and len(ids) > limit:
            raise PromptTooLongError(
                f"prompt {row} has {len(ids)} tokens; with max_new_tokens={options.max_new_tokens} at most "
                f"{limit} fit (context window {self.context_window}, max_prompt_tokens={self.config.max_prompt_tokens})"
            )
        return ids

    @property
    def rater(self) -> str:
        """How risk is rated: ``probe`` (the pair's risk probe) or ``prompt`` (self-instinct)."""
        choice = self.config.risk.rater
        if choice == "probe" and self.pair.risk_probe is None:
            raise ValueError("RiskPolicy(rater='probe') needs a pair with a risk probe (load_pair(..., risk_probe=FILE))")
        if choice == "auto":
            return "probe" if self.pair.risk_probe is not None else "prompt"
        return choice

    @property
    def risk_enabled(self) -> bool:
        """Whether requests are rated before decoding (``RiskPolicy.enabled``; ``auto``: with a probe)."""
        enabled = self.config.risk.enabled
        return self.pair.risk_probe is not None if enabled == "auto" else bool(enabled)

    def _risk_rater(self) -> RiskRater | ProbeRater:
        with self._rater_lock:
            if self._rater is None:
                if self.rater == "probe":
                    hidden = lambda ids, layer: hidden_state_mean(self.pair, ids, layer)  # noqa: E731
                    self._rater = ProbeRater(self.tokenizer, hidden, self.pair.risk_probe, self.config.risk)
                else:
                    forward = _ModelForward(self.pair)
                    self._rater = RiskRater(self.tokenizer, forward.base_only, forward.new_cache, self.config.risk)
            return self._rater


def drain(events: Generator[TokenEvent, None, Generation]) -> Generation:
    """Run a ``stream()``-style generator to its end and return the Generation it returns."""
    while True:
        try:
            next(events)
        except StopIteration as done:
            return done.value


def end_and_pad_ids(pair: ModelPair) -> tuple[frozenset[int], int]:
    """The token ids that end an answer (generation config and tokenizer) and the padding id."""
    eos = pair.base.generation_config.eos_token_id if pair.base.generation_config else None
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if pair.tokenizer.eos_token_id is not None:
        eos_ids.add(pair.tokenizer.eos_token_id)
    pad = pair.tokenizer.pad_token_id
    return frozenset(eos_ids), pad if pad is not None else min(eos_ids)


def hidden_state_mean(pair: ModelPair, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """The base model's (adapter disabled) activations after ``layer``, mean over the tokens of one row."""
    extra = {"adapter_names": ["__base__"]} if pair.is_adapter_pair else {}
    device = next(pair.base.parameters()).device
    with pair.forward_lock, torch.inference_mode():
        out = pair.base(input_ids=ids.to(device), output_hidden_states=True, logits_to_keep=1, **extra)
    return out.hidden_states[layer][0].float().mean(0).cpu()


def _request_text(prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    users = [m for m in prompt if m.get("role") == "user"]
    content = (users or list(prompt))[-1].get("content", "")
    return content if isinstance(content, str) else str(content)


def _is_empty(prompt: Prompt) -> bool:
    if isinstance(prompt, str):
        return not prompt.strip()
    return not prompt or all(not str(m.get("content") or "").strip() and not m.get("tool_calls") for m in prompt)


class _ModelForward:
    """The forward passes NGSD needs: base and expert rows, one batch when the expert is an adapter."""

    def __init__(self, pair: ModelPair):
        self.pair = pair
        self.device = next(pair.base.parameters()).device

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache()

    def _call(self, model: Any, ids: torch.Tensor, mask: torch.Tensor | None, cache: Any, **extra: Any) -> torch.Tensor:
        ids = ids.to(self.device)
        if mask is not None:
            mask = mask.to(self.device)
            positions = (mask.long().cumsum(-1) - 1).clamp_min(0)[:, -ids.shape[1] :]
            extra.update(attention_mask=mask, position_ids=positions)
        with self.pair.forward_lock, torch.inference_mode():
            out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1, **extra)
        return out.logits[:, -1, :].float()

    def base_only(self, ids: torch.Tensor, cache: Any) -> torch.Tensor:
        """Last-position logits of the base model alone (adapter disabled) for one row."""
        extra = {"adapter_names": ["__base__"]} if self.pair.is_adapter_pair else {}
        return self._call(self.pair.base, ids, None, cache, **extra)[0]

    def dual(
        self, caches: list[Any], base: tuple[torch.Tensor, torch.Tensor], expert: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of base rows and expert rows for new tokens ``(ids, full attention mask)``."""
        n = base[0].shape[0]
        if self.pair.is_adapter_pair:
            ids, mask = torch.cat([base[0], expert[0]]), torch.cat([base[1], expert[1]])
            names = ["__base__"] * n + [self.pair.adapter_name] * n
            logits = self._call(self.pair.base, ids, mask, caches[0], adapter_names=names)
            return logits[:n], logits[n:]
        return (
            self._call(self.pair.base, base[0], base[1], caches[0]),
            self._call(self.pair.expert, expert[0], expert[1], caches[1]),
        )


@dataclass
class _Row:
    """Text assembly, stop strings and bookkeeping of one generated row."""

    tokenizer: Any
    stop: tuple[str, ...]
    trace: SafetyTrace
    early_stop: EarlyStopper | None
    grammar: GrammarState | None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    finish_reason: str | None = None
    started: float = field(default_factory=time.perf_counter)

    def push(self, token_id: int, is_eos: bool) -> str:
        """Add a token; return the newly visible text and set ``finish_reason`` when done."""
        self.token_ids.append(token_id)
        if self.grammar is not None and not is_eos:
            self.grammar.accept(token_id)
        if is_eos:
            self.finish_reason = "stop"
            return self._flush()
        self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.finish_reason = self.text[:cut], "stop"
            return self._flush()
        if self.grammar is not None and self.grammar.finished:
            self.finish_reason = "stop"
            return self._flush()
        if self.grammar is not None and self._gate_refused():
            # The gate turned grammar-bound output into a refusal: the grammar would keep it
            # inside an unclosed string until max_new_tokens, so end it with the sentence.
            self.finish_reason = "refused"
            return self._flush()
        if self.early_stop is not None:
            tail = self.tokenizer.decode(self.token_ids[-self.early_stop.config.window :], skip_special_tokens=True)
            if self.early_stop.update(len(self.token_ids), tail):
                self.finish_reason = "early_stop"
                return self._flush()
        visible = len(self.text) - self._held_back()
        delta, self.emitted = self.text[self.emitted : visible], max(self.emitted, visible)
        return delta

    def _gate_refused(self) -> bool:
        # Cheapest test first: most tokens end no sentence.
        tail = self.text[-_REFUSAL_TAIL:]
        return ends_sentence(tail) and contains_refusal(tail) and any(self.trace.spikes)

    def _held_back(self) -> int:
        # Keep back a tail that may still become a stop string, or half of a multi-byte character.
        hold = 1 if self.text.endswith("\ufffd") else 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        return hold

    def _flush(self) -> str:
        delta, self.emitted = self.text[self.emitted :], len(self.text)
        return delta


class _Run:
    """Everything one generation owns: caches, neuron, rows, sampling generator."""

    def __init__(
        self,
        decoder: GatedDecoder,
        base_ids: list[list[int]],
        expert_ids: list[list[int]],
        options: GenerationOptions,
        alphas: list[float],
        assessments: list[RiskAssessment | None],
        risk_seconds: float,
        constraint: GrammarConstraint | None,
        cancel: threading.Event | None,
    ):
        self.decoder, self.options, self.cancel = decoder, options, cancel
        cfg = decoder.config
        self.forward_passes = _ModelForward(decoder.pair)
        self.caches = [self.forward_passes.new_cache(), self.forward_passes.new_cache()]
        self.shared_prompt = expert_ids is base_ids
        self.base_batch = _left_pad(base_ids, decoder.pad_id)
        self.expert_batch = self.base_batch if self.shared_prompt else _left_pad(expert_ids, decoder.pad_id)
        self.alpha = torch.tensor(alphas, dtype=torch.float32)
        initial = None
        if cfg.gate.initial_potential_from_risk:
            risks = [a.risk if a else 0.0 for a in assessments]
            initial = torch.tensor([cfg.gate.v_reset + r / 10 * (cfg.gate.theta - cfg.gate.v_reset) for r in risks])
        self.gate = LIFGate(cfg.gate, len(base_ids), initial)
        seed = options.seed if options.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator().manual_seed(seed)
        early = cfg.early_stop
        self.rows = [
            _Row(
                tokenizer=decoder.tokenizer,
                stop=options.stop,
                trace=SafetyTrace(alpha=a, risk=r, prompt_tokens=len(ids), risk_seconds=risk_seconds),
                early_stop=EarlyStopper(early, options.max_new_tokens) if early.enabled and a >= early.min_alpha else None,
                grammar=constraint.new_state() if constraint is not None else None,
            )
            for a, r, ids in zip(alphas, assessments, base_ids)
        ]

    @property
    def finished(self) -> bool:
        return all(row.finish_reason is not None for row in self.rows)

    def prefill(self) -> tuple[torch.Tensor, torch.Tensor]:
        started = time.perf_counter()
        logits = self.forward_passes.dual(self.caches, self.base_batch, self.expert_batch)
        for row in self.rows:
            row.trace.prefill_seconds = time.perf_counter() - started
            row.started = time.perf_counter()
        return logits

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        new = tokens.view(-1, 1)
        ones = torch.ones_like(new)
        self.base_batch = (new, torch.cat([self.base_batch[1], ones], dim=1))
        if self.shared_prompt:
            self.expert_batch = self.base_batch
        else:
            self.expert_batch = (new, torch.cat([self.expert_batch[1], ones], dim=1))
        return self.forward_passes.dual(self.caches, self.base_batch, self.expert_batch)

    def distributions(self, logits_base: torch.Tensor, logits_expert: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for i, row in enumerate(self.rows):
            if row.grammar is not None and row.finish_reason is None:
                row.grammar.mask_logits(logits_base[i])
                row.grammar.mask_logits(logits_expert[i])
        return logits_base.softmax(-1), logits_expert.softmax(-1)

    def pick_base(self, logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """The base model's own choice: argmax, or a sample under temperature / top-k / top-p."""
        opts = self.options
        if opts.greedy:
            return probs.argmax(-1)
        logits = logits / opts.temperature
        if opts.top_k:
            kth = logits.topk(min(opts.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(-1)
        if opts.top_p < 1.0:
            sorted_probs, order = probs.sort(-1, descending=True)
            drop = sorted_probs.cumsum(-1) - sorted_probs > opts.top_p
            probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
        return torch.multinomial(probs, 1, generator=self.generator).view(-1)

    def pick(self, scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Choice on a spike: argmax of the blend, or a sample from it restricted to the candidates."""
        if self.options.greedy:
            return scores.argmax(-1)
        weights = scores.clamp_min(0.0).masked_fill(~candidates, 0.0) ** (1.0 / self.options.temperature)
        return torch.multinomial(weights, 1, generator=self.generator).view(-1)

    def record(
        self, tokens: torch.Tensor, divergence: torch.Tensor, potential: torch.Tensor, spike: torch.Tensor
    ) -> Iterator[TokenEvent]:
        values = torch.stack([tokens.float(), divergence, potential, spike.float()], dim=1).tolist()
        cancelled = self.cancel is not None and self.cancel.is_set()
        for i, (row, (token, d, v, s)) in enumerate(zip(self.rows, values)):
            if row.finish_reason is not None:
                continue
            token = int(token)
            row.trace.record(token, d, v, bool(s))
            delta = row.push(token, token in self.decoder.eos_ids and not self.options.ignore_eos)
            if row.finish_reason is None and len(row.token_ids) >= self.options.max_new_tokens:
                row.finish_reason, delta = "length", delta + row._flush()
            if row.finish_reason is None and cancelled:
                row.finish_reason, delta = "cancelled", delta + row._flush()
            if row.finish_reason is not None:
                row.trace.finish_reason = row.finish_reason
                row.trace.decode_seconds = time.perf_counter() - row.started
            yield TokenEvent(
                row=i,
                index=len(row.token_ids) - 1,
                token_id=token,
                text=delta,
                divergence=d,
                potential=v,
                spike=bool(s),
                alpha=float(self.alpha[i]),
                finish_reason=row.finish_reason,
                trace=row.trace if row.finish_reason is not None else None,
            )

    def results(self) -> list[Generation]:
        return [Generation(row.text, row.token_ids, row.finish_reason or "length", row.trace) for row in self.rows]


def _left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[i, width - len(seq) :] = 1
    return ids, mask
