"""Grammar constraints (xgrammar) that keep tool-call and structured output valid.

A ``GrammarConstraint`` is a compiled grammar, shared and immutable; every generated row gets
its own matcher from ``new_state()``, so one constraint can serve concurrent generations.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import torch

_compilers: dict[tuple[int, int], tuple[Any, Any]] = {}
_compilers_lock = threading.Lock()


def _compiler(tokenizer: Any, vocab_size: int) -> Any:
    import xgrammar as xgr

    key = (id(tokenizer), vocab_size)
    with _compilers_lock:
        if key not in _compilers:
            info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
            # Keep the tokenizer alive with its compiler so its id() is never reused.
            _compilers[key] = (tokenizer, xgr.GrammarCompiler(info))
        return _compilers[key][1]


class GrammarState:
    """One row's position in the grammar."""

    def __init__(self, compiled: Any, vocab_size: int):
        import xgrammar as xgr

        self._matcher = xgr.GrammarMatcher(compiled)
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self._apply = xgr.apply_token_bitmask_inplace

    def mask_logits(self, logits: torch.Tensor) -> None:
        """Set the logits of tokens the grammar forbids next to -inf, in place (1-D or (1, V))."""
        self._matcher.fill_next_token_bitmask(self._bitmask)
        self._apply(logits.view(1, -1), self._bitmask)

    def accept(self, token_id: int) -> None:
        if not self._matcher.accept_token(token_id):
            raise RuntimeError(f"token_id={token_id} was rejected by the grammar")

    @property
    def finished(self) -> bool:
        return self._matcher.is_terminated()


class GrammarConstraint:
    """A compiled grammar for one tokenizer; build it with one of the ``from_*`` constructors."""

    def __init__(self, compiled: Any, vocab_size: int):
        self.compiled = compiled
        self.vocab_size = vocab_size

    @classmethod
    def from_json_schema(cls, tokenizer: Any, vocab_size: int, schema: dict[str, Any] | str) -> "GrammarConstraint":
        """Output must be one JSON value matching ``schema`` (compact, no free whitespace)."""
        text = schema if isinstance(schema, str) else json.dumps(schema)
        compiled = _compiler(tokenizer, vocab_size).compile_json_schema(text, any_whitespace=False, strict_mode=False)
        return cls(compiled, vocab_size)

    @classmethod
    def from_ebnf(cls, tokenizer: Any, vocab_size: int, grammar: str, root: str = "root") -> "GrammarConstraint":
        """Output must match an EBNF grammar (GBNF dialect, see xgrammar)."""
        compiled = _compiler(tokenizer, vocab_size).compile_grammar(grammar, root_rule_name=root)
        return cls(compiled, vocab_size)

    @classmethod
    def from_structural_tag(cls, tokenizer: Any, vocab_size: int, structural_tag: dict[str, Any]) -> "GrammarConstraint":
        """Free text, with JSON constrained only inside the tagged regions (e.g. tool calls)."""
        compiled = _compiler(tokenizer, vocab_size).compile_structural_tag(json.dumps(structural_tag))
        return cls(compiled, vocab_size)

    def new_state(self) -> GrammarState:
        return GrammarState(self.compiled, self.vocab_size)
