"""Early stop: notice when an answer's tail has turned into a refusal or junk, and end it soon.

Between output tokens ``start`` and ``end``, every ``every`` tokens, the last ``window`` tokens
are checked. A refusal phrase, three or more trailing spaces, emoji or control characters
cap the budget at the current length + ``extra_budget``; past half of that extra budget the
generation ends at the next sentence end.
"""

from __future__ import annotations

import re
import unicodedata

from .config import EarlyStopConfig

# Lower-case, apostrophes normalised to "'". Shared by early stop, training checks and the judge.
REFUSAL_PHRASES = (
    "i cannot",
    "i can't",
    "i can not",
    "i won't",
    "i will not",
    "i'm sorry",
    "i am sorry",
    "i apologize",
    "i'm not able",
    "i am not able",
    "i'm unable",
    "i am unable",
    "i'm not going to",
    "cannot provide",
    "can't provide",
    "cannot assist",
    "can't assist",
    "can't help",
    "cannot help",
    "not able to provide",
    "not something i can",
    "is illegal and unethical",
    "as an ai",
    "i must decline",
)

_SENTENCE_END = re.compile(r"[.!?。\n]\s*$")


def contains_refusal(text: str) -> bool:
    """True when ``text`` contains a refusal phrase anywhere."""
    lowered = text.lower().replace("\u2019", "'")
    return any(phrase in lowered for phrase in REFUSAL_PHRASES)


def ends_sentence(text: str) -> bool:
    """True when ``text`` ends at the end of a sentence (or a line)."""
    return _SENTENCE_END.search(text) is not None


def refusal_excerpt(text: str) -> str:
    """The refusal inside ``text``, from its first refusal phrase on, as plain prose.

    Used when the gate turned grammar-bound output (a tool call's arguments, structured output)
    into a refusal: the JSON around it is dropped, along with escapes and unclosed quotes.
    """
    lowered = text.lower().replace("\u2019", "'")
    starts = [i for i in (lowered.find(p) for p in REFUSAL_PHRASES) if i >= 0]
    if not starts:
        return text.strip()
    excerpt = text[min(starts) :]
    excerpt = excerpt.replace('\\"', '"').replace("\\n", " ")
    return excerpt.split('"', 1)[0].strip()


def is_refusal_or_junk(text: str) -> bool:
    """True when ``text`` contains a refusal phrase, ends in 3+ spaces, or holds emoji/control chars."""
    if contains_refusal(text):
        return True
    if text.endswith("   "):
        return True
    for ch in text:
        category = unicodedata.category(ch)
        if (category == "Cc" and ch not in "\n\t\r") or category == "So":
            return True
    return False


class EarlyStopper:
    """Per-generation early-stop state for one row."""

    def __init__(self, config: EarlyStopConfig, max_new_tokens: int):
        self.config = config
        self.budget = max_new_tokens
        self.triggered_at: int | None = None

    def update(self, n_tokens: int, tail_text: str) -> bool:
        """Called after each output token; True when the generation should end now."""
        cfg = self.config
        if self.triggered_at is None:
            checkpoint = cfg.start <= n_tokens <= cfg.end and (n_tokens - cfg.start) % cfg.every == 0
            if checkpoint and is_refusal_or_junk(tail_text):
                self.triggered_at = n_tokens
                self.budget = min(self.budget, n_tokens + cfg.extra_budget)
            return False
        past_half = n_tokens >= self.triggered_at + cfg.extra_budget // 2
        return n_tokens >= self.budget or (past_half and ends_sentence(tail_text))
