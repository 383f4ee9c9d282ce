"""Build data/chat_quickstart from the English conversations of the chatterbot-corpus wheel on PyPI.

    pip download --no-deps chatterbot-corpus==1.3.3 -d DIR
    python data/chat_quickstart/build_data.py DIR/chatterbot_corpus-1.3.3-py2.py3-none-any.whl

Standard library plus PyYAML; the same wheel gives byte-identical files (README.md says what they hold).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import zipfile
from pathlib import Path

import yaml

WHEEL_SHA256 = "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154"
PREFIX = "chatterbot_corpus/data/english/"
# Opinions on guns and impeachment, not small talk.
SKIPPED = ("politics.yml",)
MAX_TURN_CHARS = 300
SHAREGPT = {"user": "human", "assistant": "gpt"}
TEST_GROUPS, DEV_GROUPS = 60, 60
OUT = Path(__file__).resolve().parent


def _conversations(wheel: Path) -> list[tuple[str, int, list[str]]]:
    """(category, index in its file, statements) of every English conversation, in file order."""
    found = []
    with zipfile.ZipFile(wheel) as archive:
        names = sorted(n for n in archive.namelist() if n.startswith(PREFIX) and n.endswith(".yml"))
        for name in names:
            if name[len(PREFIX) :] in SKIPPED:
                continue
            # BaseLoader keeps every scalar a string: "Yes" stays "Yes", "1963" stays "1963".
            document = yaml.load(archive.read(name).decode("utf-8"), Loader=yaml.BaseLoader)
            category = name[len(PREFIX) : -len(".yml")]
            for index, statements in enumerate(document.get("conversations") or []):
                found.append((category, index, [" ".join(s.split()) for s in statements]))
    return found


def _messages(statements: list[str]) -> list[dict[str, str]] | None:
    """Alternate user / assistant turns, a trailing user turn dropped; None when unusable."""
    statements = [s for s in statements if s]
    if len(statements) % 2:
        statements = statements[:-1]
    if not statements or any(len(s) > MAX_TURN_CHARS for s in statements):
        return None
    return [{"role": "user" if k % 2 == 0 else "assistant", "content": s} for k, s in enumerate(statements)]


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def build(wheel: Path) -> dict[str, int]:
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise SystemExit(f"{wheel}: sha256 {digest}, expected {WHEEL_SHA256} (chatterbot-corpus 1.3.3)")
    seen: set[tuple[str, ...]] = set()
    groups: dict[str, list[dict]] = {}
    for category, index, statements in _conversations(wheel):
        messages = _messages(statements)
        if messages is None or tuple(m["content"] for m in messages) in seen:
            continue
        seen.add(tuple(m["content"] for m in messages))
        row = {"id": f"chatterbot-{category}-{index:03d}", "source": category, "messages": messages}
        # Conversations ending on the same question stay in one split (the measurer prompts with it).
        groups.setdefault(_key(messages[-2]["content"]), []).append(row)
    keys = sorted(groups)
    rng = random.Random("chatterbot-corpus-1.3.3")
    rng.shuffle(keys)
    splits = {
        "test_chatterbot.jsonl": keys[:TEST_GROUPS],
        "dev.jsonl": keys[TEST_GROUPS : TEST_GROUPS + DEV_GROUPS],
        "train.jsonl": keys[TEST_GROUPS + DEV_GROUPS :],
    }
    counts = {}
    for name, split_keys in splits.items():
        rows = [row for key in split_keys for row in groups[key]]
        rng.shuffle(rows)
        if name.startswith("test"):  # the evaluation set in ShareGPT form, the other two as messages
            rows = [
                {
                    "id": r["id"],
                    "source": r["source"],
                    "conversations": [{"from": SHAREGPT[m["role"]], "value": m["content"]} for m in r["messages"]],
                }
                for r in rows
            ]
        (OUT / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        counts[name] = len(rows)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheel", type=Path, help="chatterbot_corpus-1.3.3-py2.py3-none-any.whl")
    print(json.dumps(build(parser.parse_args().wheel)))


if __name__ == "__main__":
    main()
