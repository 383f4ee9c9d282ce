"""Instruction and conversation records -> token ids with masked labels; readers for the inputs.

Pure functions over plain Python / numpy / pyarrow values, so the same code runs on the driver
(`validate_and_tokenize`) and inside Ray Data (`read_ray_dataset(...).map_batches(prepare_batch)`).

Two row forms (data.row_form; auto: conversation when a data.fields.messages column is present):
- instruction rows: instruction / context / response, rendered by the `dolly` or `chat` template;
- conversation rows: a list of turns rendered by the tokenizer's chat template (`conversations.py`);
  the labels cover the assistant turns (data.train_on: all of them or the last one).
Either way a prepared row's prompt (input_ids[:num_prompt_tokens]) is what the model is asked to
continue and `response` is the reference text it should produce: for a conversation, everything
before the last assistant turn's content and that turn's content, so the difficulty measurer and
evaluation generate and score the last assistant turn. num_response_tokens counts the scored tokens.

Conventions:
- Every input row yields one output row; a bad row is not dropped but carries a human-readable
  `reject_reason` (naming the field or the line) and empty token lists, so callers can count and
  report it.
- Row id: the id column's value as a string; without one, "h:" + the first 16 hex digits of
  sha1(instruction NUL context NUL response) (of the conversation's [role, content] pairs for a
  conversation), so exact duplicate rows share an id and the second one is rejected as a duplicate.
- Instruction rows: the prompt is cut to `max_prompt_length` tokens by keeping its END (a leading
  BOS token is kept): the end holds the template's "### Response:" cue (or the chat generation
  prompt) and, for continuation tasks, the text the response continues. The response then fills the
  room left up to `max_length`; EOS is appended and is lost only when the response itself is cut.
- Conversation rows keep whole turns: the earliest are dropped until the rest fits (`conversations.encode`).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pocl_ray import conversations, hf_datasets, storage
from pocl_ray.config import HFDataset, is_uri

IGNORE_INDEX = -100  # a label no loss scores: prompt tokens and padding

# Marker columns added by the JSONL reader. ERROR_COLUMN holds "line N: invalid JSON: ..." for a
# line that is not a JSON object (RAW_COLUMN keeps its text); JSON_COLUMN lists, per row, the
# columns whose value was not a string in a column that otherwise holds strings: Arrow cannot store
# such a mixed column, so those cells hold the value's JSON text and are decoded back before use.
ERROR_COLUMN = "_pocl_error"
RAW_COLUMN = "_pocl_raw"
JSON_COLUMN = "_pocl_json"
MARKER_COLUMNS = (ERROR_COLUMN, RAW_COLUMN, JSON_COLUMN)

OUTPUT_COLUMNS = (
    "id",
    "prompt",
    "response",
    "input_ids",
    "attention_mask",
    "labels",
    "num_prompt_tokens",
    "num_response_tokens",
    "reject_reason",
)

DOLLY_WITH_CONTEXT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
)
DOLLY_NO_CONTEXT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
_PARQUET_SUFFIXES = (".parquet",)
_HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


# ---------------------------------------------------------------------------------------------
# Reading


def _file_format(path: str | Path) -> str | None:
    name = _name(path).lower()
    if name.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    return None


def resolve_source(source: str | Path | HFDataset, fmt: str = "auto") -> tuple[str, Sequence[str | Path]]:
    """The format of `source` ("jsonl", "parquet", "hf" or "dataset") and its data files in read order.

    A dataset by name (`config.HFDataset`) is "dataset" with no files; its split is checked here
    (`hf_datasets.check_split`: a missing one fails naming those the dataset has). A directory holding
    dataset_info.json / state.json / dataset_dict.json is a `datasets` save_to_disk folder (its file
    list is [path]); any other directory contributes its .jsonl, .jsonl.gz and .parquet files
    (recursively, sorted by path) of one format.
    """
    if isinstance(source, HFDataset):
        hf_datasets.check_split(source)
        return "dataset", []
    if fmt not in ("auto", "jsonl", "parquet", "hf"):
        raise ValueError(f"unknown data format {fmt!r}; use auto, jsonl, parquet or hf")
    if is_uri(str(source)):
        return _resolve_uri(str(source), fmt)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"data path not found: {path}")
    if path.is_dir() and (fmt == "hf" or (fmt == "auto" and any((path / m).exists() for m in _HF_MARKERS))):
        return "hf", [path]
    if fmt == "hf":
        raise ValueError(f"{path} is not a datasets save_to_disk directory (no {' / '.join(_HF_MARKERS)})")
    if path.is_file():
        found = _file_format(path)
        if fmt == "auto":
            if found is None:
                raise ValueError(
                    f"unknown data format of {path}: expected .jsonl, .jsonl.gz or .parquet (or set data.format)"
                )
            return found, [path]
        return fmt, [path]
    by_file = {p: f for p in sorted(path.rglob("*")) if p.is_file() and (f := _file_format(p)) is not None}
    if fmt != "auto":
        by_file = {p: f for p, f in by_file.items() if f == fmt}
    if not by_file:
        raise ValueError(f"no .jsonl, .jsonl.gz or .parquet data files in directory {path}")
    formats = set(by_file.values())
    if len(formats) > 1:
        raise ValueError(f"directory {path} mixes JSONL and parquet files; set data.format to pick one")
    return formats.pop(), list(by_file)


def _decode_lines(data: bytes) -> list[str]:
    if data[:2] == b"\x1f\x8b":  # gzip magic: Ray may hand us the raw bytes of a .gz file
        data = gzip.decompress(data)
    return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="replace", newline=None).read().splitlines()


def _column_array(values: list[Any]) -> tuple[pa.Array, list[bool]]:
    """An Arrow array for one column, and which cells had to be stored as JSON text."""
    try:
        return pa.array(values), [False] * len(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        encoded = [v is not None and not isinstance(v, str) for v in values]
        texts = [json.dumps(v, ensure_ascii=False) if enc else v for v, enc in zip(values, encoded)]
        return pa.array(texts, type=pa.string()), encoded


def parse_jsonl(data: bytes, source_name: str | None = None, max_rows: int | None = None) -> pa.Table:
    """JSONL bytes (optionally gzip) -> a table with one row per non-blank line.

    A line that is not a JSON object becomes a row with ERROR_COLUMN = "line N: invalid JSON: ..."
    (prefixed by `source_name` when given) and RAW_COLUMN = the line; blank lines are skipped.
    The marker columns are always present so tables from several files concatenate.
    """
    records: list[dict[str, Any]] = []
    errors: list[str | None] = []
    raws: list[str | None] = []
    prefix = f"{source_name}: " if source_name else ""
    for number, line in enumerate(_decode_lines(data), start=1):
        if max_rows is not None and len(records) >= max_rows:
            break
        if not line.strip():
            continue
        try:
            value = json.loads(line)
            problem = None if isinstance(value, dict) else f"not a JSON object (got {type(value).__name__})"
        except json.JSONDecodeError as err:
            value, problem = None, str(err)
        if problem is None:
            records.append(value)
            errors.append(None)
            raws.append(None)
        else:
            records.append({})
            errors.append(f"{prefix}line {number}: invalid JSON: {problem}")
            raws.append(line)
    names: list[str] = []
    for record in records:
        names.extend(k for k in record if k not in names)
    columns: dict[str, pa.Array] = {}
    json_cells: list[list[str]] = [[] for _ in records]
    for name in names:
        if name in MARKER_COLUMNS:
            raise ValueError(f"{source_name or 'JSONL data'}: column name {name!r} is reserved")
        array, encoded = _column_array([r.get(name) for r in records])
        columns[name] = array
        for i, enc in enumerate(encoded):
            if enc:
                json_cells[i].append(name)
    columns[ERROR_COLUMN] = pa.array(errors, type=pa.string())
    columns[RAW_COLUMN] = pa.array(raws, type=pa.string())
    columns[JSON_COLUMN] = pa.array([c or None for c in json_cells], type=pa.list_(pa.string()))
    return pa.table(columns)


def _load_hf(path: Path):
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) != 1:
            raise ValueError(
                f"{path} is a DatasetDict with splits {sorted(loaded)}; point the path at one split's "
                f"directory (e.g. {path / sorted(loaded)[0]})"
            )
        loaded = next(iter(loaded.values()))
    return loaded


def _load_dataset(source: str | Path | HFDataset, kind: str, files: Sequence[str | Path], max_rows: int | None):
    """A `datasets.Dataset` of a save_to_disk folder or of a dataset by name, first max_rows rows."""
    if isinstance(source, HFDataset):
        return hf_datasets.load(source, max_rows)
    dataset = _load_hf(Path(files[0]))
    return dataset if max_rows is None else dataset.select(range(min(max_rows, len(dataset))))


def _name(path: str | Path) -> str:
    """The file name of a local path or a URI (pathlib would read `s3://b/x` as `s3:/b/x`)."""
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def _resolve_uri(uri: str, fmt: str) -> tuple[str, list[str]]:
    """`resolve_source` for an object-storage URI: a file, or a prefix whose data files (recursive,
    sorted) are of one format; the files stay URIs, read through `storage`."""
    if not storage.exists(uri, "data"):
        raise FileNotFoundError(f"data path not found: {uri}")
    if fmt == "hf" or (fmt == "auto" and any(storage.exists(storage.join(uri, m), "data") for m in _HF_MARKERS)):
        raise ValueError(
            f"{uri}: a datasets save_to_disk folder is read from a local folder only; "
            "write it as parquet (Dataset.to_parquet) into the bucket instead"
        )
    if storage.is_file(uri, "data"):
        found = _file_format(uri)
        if fmt == "auto" and found is None:
            raise ValueError(
                f"unknown data format of {uri}: expected .jsonl, .jsonl.gz or .parquet (or set data.format)"
            )
        return (fmt if fmt != "auto" or found is None else found), [uri]
    by_file = {f: found for f in storage.list_files(uri, setting="data") if (found := _file_format(f)) is not None}
    if fmt != "auto":
        by_file = {f: found for f, found in by_file.items() if found == fmt}
    if not by_file:
        raise ValueError(f"no .jsonl, .jsonl.gz or .parquet data files under {uri}")
    formats = set(by_file.values())
    if len(formats) > 1:
        raise ValueError(f"{uri} mixes JSONL and parquet files; set data.format to pick one")
    return formats.pop(), list(by_file)


def read_table(source: str | Path | HFDataset, fmt: str = "auto", max_rows: int | None = None) -> pa.Table:
    """Read the rows on this machine (see `resolve_source` for what `source` may be)."""
    kind, files = resolve_source(source, fmt)
    if kind in ("hf", "dataset"):
        return _load_dataset(source, kind, files, max_rows).with_format("arrow")[:]
    tables: list[pa.Table] = []
    remaining = max_rows
    for file in files:
        if remaining is not None and remaining <= 0:
            break
        if kind == "jsonl":
            name = _name(file) if len(files) > 1 else None
            table = parse_jsonl(storage.read_bytes(file, "data"), source_name=name, max_rows=remaining)
        else:
            fs, inner = storage.resolve(file)
            table = pq.read_table(inner, filesystem=fs)
            if remaining is not None:
                table = table.slice(0, remaining)
        tables.append(table)
        if remaining is not None:
            remaining -= table.num_rows
    return pa.concat_tables(tables, promote_options="permissive")


def _parse_file_batch(batch: pa.Table, several_files: bool) -> pa.Table:
    tables = []
    for data, file_path in zip(batch.column("bytes").to_pylist(), batch.column("path").to_pylist()):
        tables.append(parse_jsonl(data, source_name=_name(file_path) if several_files else None))
    return pa.concat_tables(tables, promote_options="permissive")


def read_ray_dataset(source: str | Path | HFDataset, fmt: str = "auto", max_rows: int | None = None):
    """The distributed reader: a `ray.data.Dataset` with the same rows as `read_table`.

    Parquet goes through `ray.data.read_parquet`. A save_to_disk folder or a dataset by name is read
    on the driver by `datasets` (a dataset by name from its cache, HF_DATASETS_OFFLINE honoured) and
    handed over as its Arrow table (`ray.data.from_arrow`): `ray.data.from_huggingface` would first ask
    the Hub for a parquet copy of the split, a network call that fails offline.
    JSONL does not use `ray.data.read_json`: with lines=True it parses with pandas and a single
    malformed line fails the whole read (ValueError from pandas), and without lines=True pyarrow fails
    and Ray's fallback `json.load` of the whole file fails too. Instead each file is read whole
    (`read_binary_files`, which also un-gzips) and parsed by `parse_jsonl`, so bad lines become reject
    rows with their line numbers, exactly as locally. Files may be local (a shared filesystem on a
    cluster) or in object storage (`storage.py`). With `max_rows`, the dataset (and those derived from
    it) preserve file/line order, set on the dataset's own DataContext copy, so the rows are the same as `read_table`'s.
    """
    import ray.data

    kind, files = resolve_source(source, fmt)
    if kind in ("hf", "dataset"):
        return ray.data.from_arrow(_load_dataset(source, kind, files, max_rows).with_format("arrow")[:])
    # Object storage: Ray Data gets the filesystem storage.py resolved (AWS_ENDPOINT_URL and the other
    # standard settings honoured) and the paths inside it; every file of one source is in one store.
    fs, paths = None, [str(f) for f in files]
    if files and is_uri(str(files[0])):
        fs, paths = storage.resolve(files[0])[0], [storage.resolve(f)[1] for f in files]
    if kind == "parquet":
        ds = ray.data.read_parquet(paths, filesystem=fs)
    else:
        ds = ray.data.read_binary_files(paths, include_paths=True, filesystem=fs).map_batches(
            partial(_parse_file_batch, several_files=len(files) > 1), batch_size=1, batch_format="pyarrow"
        )
    if max_rows is not None:
        ds.context.execution_options.preserve_order = True
        ds = ds.limit(max_rows)
    return ds


# ---------------------------------------------------------------------------------------------
# Templates


def build_prompt(instruction: str, context: str | None, template: str, tokenizer=None) -> str:
    """The prompt text for one example ("dolly": the MiniLLM/Dolly template; "chat": the
    tokenizer's chat template with instruction + blank line + context as the user turn)."""
    if template == "dolly":
        if context:
            return DOLLY_WITH_CONTEXT.format(instruction=instruction, context=context)
        return DOLLY_NO_CONTEXT.format(instruction=instruction)
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
            raise ValueError(f"template 'chat' needs a tokenizer with a chat template; {name} has none")
        content = instruction + ("\n\n" + context if context else "")
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    raise ValueError(f"unknown template {template!r}; use 'dolly' or 'chat'")


# ---------------------------------------------------------------------------------------------
# Validation and tokenisation


def python_value(value: Any) -> Any:
    """numpy scalars/arrays (from Ray numpy batches, or a search algorithm: pydantic rejects np.int64)
    -> Python values."""
    if isinstance(value, np.ndarray):
        return [python_value(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _columns(batch: Any) -> dict[str, list[Any]]:
    if hasattr(batch, "to_dict") and hasattr(batch, "columns"):  # pandas DataFrame
        batch = {c: batch[c] for c in batch.columns}
    if not isinstance(batch, Mapping):
        raise TypeError(f"expected a dict of columns or a DataFrame, got {type(batch).__name__}")
    out = {}
    for name, values in batch.items():
        values = values.tolist() if hasattr(values, "tolist") else list(values)
        out[name] = [python_value(v) for v in values]
    return out


def _is_missing(value: Any) -> bool:
    # NaN is how pandas spells a missing value in an object column.
    return value is None or (isinstance(value, float) and math.isnan(value))


class _Rows:
    """Row access over columns, undoing the JSONL reader's JSON-text cells."""

    def __init__(self, columns: dict[str, list[Any]]):
        self.columns = columns
        self.n = len(next(iter(columns.values()))) if columns else 0
        self.json_cells = columns.get(JSON_COLUMN, [None] * self.n)

    def value(self, column: str, i: int) -> Any:
        value = self.columns[column][i]
        if value is not None and column in (self.json_cells[i] or ()):
            return json.loads(value)
        return value

    def pick(self, candidates: Sequence[str], i: int) -> tuple[Any, str | None]:
        """The first non-missing value among the candidate columns, and its column."""
        for column in candidates:
            if column in self.columns:
                value = self.value(column, i)
                if not _is_missing(value):
                    return value, column
        return None, None

    def record(self, i: int) -> dict[str, Any]:
        """Row i as the original record (JSON-serialisable), without marker columns."""
        if self.columns.get(RAW_COLUMN) and self.columns[RAW_COLUMN][i] is not None:
            return {"raw_line": self.columns[RAW_COLUMN][i]}
        record = {c: self.value(c, i) for c in self.columns if c not in MARKER_COLUMNS}
        return json.loads(json.dumps(record, ensure_ascii=False, default=str))


def records_of(batch: Any) -> list[dict[str, Any]]:
    """Each row of a raw batch as the user wrote it (JSON-serialisable): its fields, or
    {"raw_line": ...} for a line that was not valid JSON. Rejects are written with these."""
    rows = _Rows(_columns(batch))
    return [rows.record(i) for i in range(rows.n)]


def content_id(*parts: str) -> str:
    return "h:" + hashlib.sha1("\x00".join(parts).encode("utf-8")).hexdigest()[:16]


def _id_text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():  # pandas turns int ids with gaps into floats
        return str(int(value))
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
    return str(value)


def _text_field(rows: _Rows, candidates: Sequence[str], role: str, i: int, required: bool) -> tuple[str, str]:
    """(value, reject reason) of a text field; value "" when absent."""
    value, column = rows.pick(candidates, i)
    if column is None:
        if required:
            return "", f"missing field '{role}' (no value in any of the columns {list(candidates)})"
        return "", ""
    if not isinstance(value, str):
        return "", f"field '{role}' (column '{column}') must be a string, got {type(value).__name__}: {value!r:.60}"
    if required and not value.strip():
        return "", f"empty field '{role}' (column '{column}' is blank)"
    return value, ""


def _truncate_prompt(ids: list[int], limit: int, bos_id: int | None) -> list[int]:
    if len(ids) <= limit:
        return ids
    if bos_id is not None and ids[0] == bos_id and limit > 1:
        return [bos_id] + ids[len(ids) - (limit - 1) :]
    return ids[len(ids) - limit :]


def row_form(columns: Iterable[str], data_cfg) -> str:
    """ "conversation" or "instruction": data.row_form, or for auto whether a fields.messages column is
    among `columns` (a batch's, or a whole dataset's schema names)."""
    if data_cfg.row_form != "auto":
        return data_cfg.row_form
    return "conversation" if any(c in columns for c in data_cfg.fields.messages) else "instruction"


def pinned_row_form(source: str | Path | HFDataset, data_cfg, fmt: str | None = None):
    """data_cfg with row_form decided once for the dataset at `source`: as set, or for auto by the columns
    of its first rows (`row_form`). Every batch of the dataset then reads its rows one way, where a
    decision per batch could differ between files (one JSONL file without the messages column).
    `fmt`: how `source` is read, data_cfg.format unless given (an evaluation set's is detected: "auto")."""
    if data_cfg.row_form != "auto":
        return data_cfg
    form = row_form(read_table(source, fmt or data_cfg.format, max_rows=64).column_names, data_cfg)
    return data_cfg.model_copy(update={"row_form": form})


def _row_id(rows: _Rows, i: int, fields, error: str | None, raw: str | None, parts: Sequence[Any]) -> str:
    """The id column's value, else the content id of an unparsable line or of the row's parts."""
    id_value, id_column = rows.pick(fields.id, i)
    if id_column is not None:
        return _id_text(id_value)
    if error:
        return content_id(error, raw or "")
    return content_id(*("" if p is None else _id_text(p) for p in parts))


def prepare_batch(batch: Any, tokenizer, data_cfg) -> dict[str, list]:
    """Validate, template and tokenise a batch of raw rows; one output row per input row.

    `batch` is a dict of columns (lists or numpy arrays, as Ray's numpy batches) or a pandas
    DataFrame; `data_cfg` is a `config.DataConfig` (fields, row_form, train_on, template,
    max_prompt_length, max_length). Output columns: OUTPUT_COLUMNS. labels are -100 on every token
    not scored: the prompt of an instruction row, all but the assistant turns of a conversation.
    """
    rows = _Rows(_columns(batch))
    if row_form(rows.columns, data_cfg) == "conversation":
        return _prepare_conversations(rows, tokenizer, data_cfg)
    fields = data_cfg.fields
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos token")
    errors = rows.columns.get(ERROR_COLUMN, [None] * rows.n)
    raws = rows.columns.get(RAW_COLUMN, [None] * rows.n)

    out: dict[str, list] = {name: [] for name in OUTPUT_COLUMNS}
    good: list[int] = []
    for i in range(rows.n):
        if errors[i]:
            instruction, reason = "", errors[i]
        else:
            instruction, reason = _text_field(rows, fields.instruction, "instruction", i, True)
        context, response = "", ""
        if not reason:
            context, reason = _text_field(rows, fields.context, "context", i, False)
        if not reason:
            response, reason = _text_field(rows, fields.response, "response", i, True)
        parts = [rows.pick(c, i)[0] for c in (fields.instruction, fields.context, fields.response)]
        row_id = _row_id(rows, i, fields, errors[i], raws[i], parts)
        prompt = "" if reason else build_prompt(instruction, context, data_cfg.template, tokenizer)
        out["id"].append(row_id)
        out["prompt"].append(prompt)
        out["response"].append(response if not reason else "")
        out["reject_reason"].append(reason)
        if not reason:
            good.append(i)

    for name in ("input_ids", "attention_mask", "labels"):
        out[name] = [[] for _ in range(rows.n)]
    out["num_prompt_tokens"] = [0] * rows.n
    out["num_response_tokens"] = [0] * rows.n
    if not good:
        return out
    # The chat template writes its own special tokens into the text; the dolly text gets the
    # tokenizer's usual ones (e.g. Llama's BOS, none for GPT-2).
    add_special = data_cfg.template != "chat"
    prompt_ids = tokenizer([out["prompt"][i] for i in good], add_special_tokens=add_special)["input_ids"]
    response_ids = tokenizer([out["response"][i] for i in good], add_special_tokens=False)["input_ids"]
    bos_id = tokenizer.bos_token_id
    for i, p_ids, r_ids in zip(good, prompt_ids, response_ids):
        p_ids = _truncate_prompt(list(p_ids), data_cfg.max_prompt_length, bos_id)
        room = data_cfg.max_length - len(p_ids)
        r_ids = (list(r_ids) + [eos_id])[: max(room, 0)]
        if not r_ids:
            out["reject_reason"][i] = (
                f"no response token left after truncation: the prompt takes {len(p_ids)} of "
                f"max_length {data_cfg.max_length} tokens"
            )
            out["prompt"][i] = out["response"][i] = ""
            continue
        out["input_ids"][i] = p_ids + r_ids
        out["attention_mask"][i] = [1] * (len(p_ids) + len(r_ids))
        out["labels"][i] = [IGNORE_INDEX] * len(p_ids) + r_ids
        out["num_prompt_tokens"][i] = len(p_ids)
        out["num_response_tokens"][i] = len(r_ids)
    return out


def _prepare_conversations(rows: _Rows, tokenizer, data_cfg) -> dict[str, list]:
    """prepare_batch for conversation rows (`conversations.parse` / `encode`); labels on the assistant
    turns data_cfg.train_on names, the prompt up to the last assistant turn's content."""
    conversations.check_tokenizer(tokenizer)
    fields = data_cfg.fields
    errors = rows.columns.get(ERROR_COLUMN, [None] * rows.n)
    raws = rows.columns.get(RAW_COLUMN, [None] * rows.n)
    out: dict[str, list] = {name: [] for name in OUTPUT_COLUMNS}
    for i in range(rows.n):
        value, column = rows.pick(fields.messages, i)
        messages: list[dict[str, str]] = []
        reason = errors[i] or ""
        if not reason:
            if column is None:
                reason = f"missing field 'messages' (no value in any of the columns {list(fields.messages)})"
            else:
                messages, reason = conversations.parse(value, column)
        pairs = [[m["role"], m["content"]] for m in messages] if messages else value
        out["id"].append(_row_id(rows, i, fields, errors[i], raws[i], [pairs]))
        encoded = None
        if not reason:
            encoded, reason = conversations.encode(messages, tokenizer, data_cfg.max_length, data_cfg.max_prompt_length)
        if encoded is None:
            columns: dict[str, Any] = {"prompt": "", "response": "", "input_ids": [], "attention_mask": []}
            columns |= {"labels": [], "num_prompt_tokens": 0, "num_response_tokens": 0}
        else:
            columns = _conversation_columns(encoded, messages[-1]["content"], data_cfg.train_on, tokenizer)
        for name, column_value in columns.items():
            out[name].append(column_value)
        out["reject_reason"].append(reason)
    return out


def _conversation_columns(encoded: conversations.Encoded, response: str, train_on: str, tokenizer) -> dict[str, Any]:
    """A prepared conversation's columns (OUTPUT_COLUMNS but id and reject_reason)."""
    ids = encoded.input_ids
    scored = encoded.turns if train_on == "all_assistant" else encoded.turns[-1:]
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in scored:
        labels[start:end] = ids[start:end]
    prompt_end = encoded.turns[-1][0]
    return {
        "prompt": tokenizer.decode(ids[:prompt_end]),
        "response": response,
        "input_ids": ids,
        "attention_mask": [1] * len(ids),
        "labels": labels,
        "num_prompt_tokens": prompt_end,
        "num_response_tokens": sum(end - start for start, end in scored),
    }


def duplicate_reasons(ids: Sequence[str], skip: Sequence[bool] | None = None) -> list[str]:
    """For each id, "" or "duplicate id 'x' (first seen at row i)" for its second and later
    occurrences; rows with skip[i] set neither claim nor collide with an id."""
    first: dict[str, int] = {}
    reasons = []
    for i, row_id in enumerate(ids):
        if skip is not None and skip[i]:
            reasons.append("")
        elif row_id in first:
            reasons.append(f"duplicate id '{row_id}' (first seen at row {first[row_id]})")
        else:
            first[row_id] = i
            reasons.append("")
    return reasons


def validate_and_tokenize(records: list[dict], tokenizer, data_cfg) -> tuple[list[dict], list[dict]]:
    """(good rows, rejects) for a list of raw records (e.g. `read_table(...).to_pylist()`).

    Good rows are dicts of OUTPUT_COLUMNS (without reject_reason) plus "row" (input index).
    Each reject is {"row", "id", "reason", "record"}; duplicate ids are rejected after the first.
    """
    names: list[str] = []
    for record in records:
        names.extend(k for k in record if k not in names)
    columns = {name: [r.get(name) for r in records] for name in names}
    out = prepare_batch(columns, tokenizer, data_cfg)
    rows = _Rows(columns)
    dup = duplicate_reasons(out["id"], skip=[bool(r) for r in out["reject_reason"]])
    good, rejects = [], []
    for i in range(len(records)):
        reason = out["reject_reason"][i] or dup[i]
        if reason:
            rejects.append({"row": i, "id": out["id"][i], "reason": reason, "record": rows.record(i)})
        else:
            row = {name: out[name][i] for name in OUTPUT_COLUMNS if name != "reject_reason"}
            row["row"] = i
            good.append(row)
    return good, rejects


# ---------------------------------------------------------------------------------------------
# Batching


def _sequences(rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence], key: str) -> list[torch.Tensor]:
    column = rows[key] if isinstance(rows, Mapping) else [r[key] for r in rows]
    return [torch.as_tensor(np.asarray(seq, dtype=np.int64)) for seq in column]


def _pad(seqs: list[torch.Tensor], value: int, side: str, multiple: int | None) -> torch.Tensor:
    padded = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=value, padding_side=side)
    if multiple and padded.shape[1] % multiple:
        extra = multiple - padded.shape[1] % multiple
        padded = torch.nn.functional.pad(padded, (extra, 0) if side == "left" else (0, extra), value=value)
    return padded


def collate(
    rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence],
    pad_token_id: int,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Right-pad input_ids (pad_token_id), attention_mask (0) and labels (-100) to one length."""
    # transformers' DataCollatorForSeq2Seq(pad_to_multiple_of=...) builds the same tensors (tests/test_data.py
    # checks it) but through tokenizer.pad, row by row: 49 ms against 7 ms here for 64 rows of up to 300
    # tokens on a 2-core CPU, on the host path of every training micro-batch; and it needs the tokenizer
    # at every call site, where a pad id does here.
    input_ids = _sequences(rows, "input_ids")
    if not input_ids:
        raise ValueError("collate needs at least one row")
    if any(len(s) == 0 for s in input_ids):
        raise ValueError("collate got a row with no tokens (a rejected row?)")
    return {
        "input_ids": _pad(input_ids, pad_token_id, "right", pad_to_multiple_of),
        "attention_mask": _pad(_sequences(rows, "attention_mask"), 0, "right", pad_to_multiple_of),
        "labels": _pad(_sequences(rows, "labels"), IGNORE_INDEX, "right", pad_to_multiple_of),
    }


def predicted_labels(labels: torch.Tensor) -> torch.Tensor:
    """The label each position is trained to predict: ``labels`` (a row (seq,) or a batch (..., seq))
    shifted left by one, IGNORE_INDEX at the last position. Labels are stored unshifted, as Hugging
    Face stores them: a causal LM's output at position t predicts token t + 1, so position t is a
    *scored position* (its logits enter a loss) where ``predicted_labels(labels)[t] != IGNORE_INDEX``.
    Every loss, measurer, cache and token count finds its positions here."""
    return torch.nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


def scored_mask(labels: torch.Tensor) -> torch.Tensor:
    """True at the scored positions of ``labels`` (see `predicted_labels`)."""
    return predicted_labels(labels) != IGNORE_INDEX


def generation_batch(prompts_token_ids: Iterable[Sequence[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """LEFT-padded input_ids / attention_mask for `model.generate` (new tokens follow each prompt).

    tokenizer.pad(padding_side="left") gives the same tensors in about 3x the time (6 ms against 2 ms for
    64 prompts), and would need the tokenizer where sampling only has the pad id.
    """
    seqs = [torch.as_tensor(np.asarray(p, dtype=np.int64)) for p in prompts_token_ids]
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("generation_batch needs at least one non-empty prompt")
    return {
        "input_ids": _pad(seqs, pad_token_id, "left", None),
        "attention_mask": _pad([torch.ones_like(s) for s in seqs], 0, "left", None),
    }
