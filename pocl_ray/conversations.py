"""Conversation rows: a list of turns -> token ids and the token span of every assistant turn.

Pure functions over plain Python values and a Hugging Face tokenizer; `data.prepare_batch` builds the
labels from the spans (all assistant turns, or the last one: data.train_on).

A turn is {role, content} (OpenAI / TRL `messages`) or {from, value} (ShareGPT `conversations`, whose
roles human / gpt are user / assistant). The tokenizer's own chat template renders the conversation
(`apply_chat_template`), and which tokens an assistant turn owns comes from:
- a template with {% generation %} blocks: the template itself (`return_assistant_tokens_mask`), one
  run of marked tokens per assistant turn;
- any other template: the text that rendering turns[:k+1] adds to rendering turns[:k] with the
  generation prompt is assistant turn k (its content and the template's end-of-turn text, trailing
  whitespace excluded); a template whose renderings of a conversation's beginnings are not beginnings
  of its rendering cannot be read this way, and such a row is rejected saying so.
Both tokenize the whole rendered text at once, as `apply_chat_template` does, and a turn owns every
token that overlaps its text.

Length: a conversation that does not fit keeps its leading system turns and drops its earliest turns
up to a user turn, as few as make the rest fit: the whole conversation within `max_length` tokens and
the part before the last assistant turn (what the difficulty measurer prompts with) within
`max_prompt_length`. Turns after the last assistant turn are dropped before anything else (nothing
would score them).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

from jinja2 import TemplateError

# Accepted role names (case-insensitive) -> the role the chat template receives.
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}
_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


class Encoded(NamedTuple):
    input_ids: list[int]  # the rendered conversation (as kept), up to the end of its last assistant turn
    turns: list[tuple[int, int]]  # [start, end) token span of each kept assistant turn, in order


def check_tokenizer(tokenizer) -> None:
    """Raise ValueError unless the tokenizer can render conversation rows (a chat template, a fast tokenizer)."""
    name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
    if not isinstance(getattr(tokenizer, "chat_template", None), str):
        raise ValueError(f"conversation rows are rendered by the tokenizer's chat template; tokenizer {name} has none")
    if not tokenizer.is_fast:
        raise ValueError(f"conversation rows need a fast tokenizer (token offsets); tokenizer {name} is a slow one")


def marks_assistant_tokens(tokenizer) -> bool:
    """Whether the chat template marks assistant tokens itself ({% generation %} blocks)."""
    return bool(_GENERATION_BLOCK.search(tokenizer.chat_template))


def parse(value: Any, column: str) -> tuple[list[dict[str, str]], str]:
    """(messages as the chat template takes them, "") or ([], the reason the conversation is malformed)."""
    where = f"conversation (column '{column}')"
    if not isinstance(value, (list, tuple)):
        return [], f"{where} must be a list of turns, got {type(value).__name__}: {value!r:.60}"
    messages = []
    for k, turn in enumerate(value):
        at = f"{where} turn {k}"
        if not isinstance(turn, dict):
            return [], f"{at} must be an object with role/content (or from/value), got {type(turn).__name__}"
        # A column of mixed turn styles holds both key pairs, the other one null.
        role_key, content_key = ("role", "content") if turn.get("role") is not None else ("from", "value")
        role, content = turn.get(role_key), turn.get(content_key)
        if role is None:
            return [], f"{at} has no role (neither 'role' nor ShareGPT's 'from')"
        if not isinstance(role, str) or role.lower() not in ROLES:
            return [], f"{at}: unknown role {role!r} (use system, user or assistant; ShareGPT: system, human or gpt)"
        if not isinstance(content, str):
            return [], f"{at} ({role}): '{content_key}' must be a string, got {type(content).__name__}: {content!r:.60}"
        if not content.strip():
            return [], f"{at} ({role}): empty '{content_key}'"
        messages.append({"role": ROLES[role.lower()], "content": content})
    last = max((k for k, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        return [], f"{where} has no assistant turn"
    return messages[: last + 1], ""


def _runs(mask: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of ones."""
    spans: list[tuple[int, int]] = []
    for i, bit in enumerate(mask):
        if bit and spans and spans[-1][1] == i:
            spans[-1] = (spans[-1][0], i + 1)
        elif bit:
            spans.append((i, i + 1))
    return spans


def _marked(tokenizer, messages: list[dict]) -> tuple[list[int], list[tuple[int, int]]]:
    encoding = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return list(encoding["input_ids"]), _runs(encoding["assistant_masks"])


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _by_prefixes(tokenizer, messages: list[dict]) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and assistant spans of a template without {% generation %} blocks (see the module doc)."""
    text = _render(tokenizer, messages)
    char_spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:k], generation_prompt=True)
        through = _render(tokenizer, messages[: k + 1])
        if not (text.startswith(through) and through.startswith(before)):
            raise ValueError(
                f"the chat template renders the conversation up to turn {k} differently from the start of the "
                "whole conversation, so the assistant turns cannot be told apart; give it {% generation %} blocks"
            )
        char_spans.append((len(before), len(through.rstrip())))
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoding["offset_mapping"]
    spans = []
    for start, end in char_spans:
        owned = [t for t, (s, e) in enumerate(offsets) if e > s and e > start and s < end]
        spans.append((owned[0], owned[-1] + 1) if owned else (0, 0))
    return list(encoding["input_ids"]), spans


def _encode(tokenizer, messages: list[dict]) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids up to the end of the last assistant turn, and each assistant turn's token span."""
    ids, spans = (_marked if marks_assistant_tokens(tokenizer) else _by_prefixes)(tokenizer, messages)
    expected = sum(m["role"] == "assistant" for m in messages)
    if len(spans) != expected or any(end <= start for start, end in spans):
        raise ValueError(
            f"the chat template gives {sum(end > start for start, end in spans)} non-empty assistant spans for "
            f"{expected} assistant turns"
        )
    return ids[: spans[-1][1]], spans


def encode(
    messages: list[dict[str, str]], tokenizer, max_length: int, max_prompt_length: int
) -> tuple[Encoded | None, str]:
    """(the conversation encoded, "") or (None, why not): its whole, or the fewest earliest turns dropped
    to fit (see the module doc). `messages` as `parse` returns them."""
    head = next((k for k, m in enumerate(messages) if m["role"] != "system"), len(messages))
    starts = [head] + [k for k in range(head + 1, len(messages)) if messages[k]["role"] == "user"]
    results: dict[int, tuple[list[int], list[tuple[int, int]]]] = {}

    def fits(j: int) -> bool:
        if j not in results:
            results[j] = _encode(tokenizer, messages[:head] + messages[starts[j] :])
        ids, spans = results[j]
        return len(ids) <= max_length and spans[-1][0] <= max_prompt_length

    try:
        # Fewer turns never render longer, so the kept suffixes that fit are a tail of `starts`.
        first = bisect.bisect_left(range(len(starts)), True, key=fits)
    except (TemplateError, ValueError, TypeError) as err:
        return None, f"the chat template cannot render the conversation: {err}"
    if first == len(starts):
        ids, spans = results[len(starts) - 1]
        return None, (
            f"conversation too long: even its last exchange takes {len(ids)} tokens, {spans[-1][0]} of them "
            f"before the last assistant turn (max_length {max_length}, max_prompt_length {max_prompt_length})"
        )
    ids, spans = results[first]
    return Encoded(ids, spans), ""


def stop_token_ids(tokenizer) -> list[int]:
    """The ids that end an assistant turn: the eos id and, when the chat template closes a turn with
    another special token (ChatML's <|im_end|> under an <|endoftext|> eos), that one too."""
    stops = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        try:
            ids, spans = _encode(tokenizer, probe)
        except (TemplateError, ValueError, TypeError):
            return stops
        last = ids[spans[-1][1] - 1]
        added = tokenizer.added_tokens_decoder.get(last)
        if added is not None and added.special and last not in stops:
            stops.append(last)
    return stops
