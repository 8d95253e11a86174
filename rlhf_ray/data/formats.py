"""Datasets -> typed SFT examples, preference pairs and prompts, with row-level validation.

Sources (``read_rows``), as users hold them:

* a local file: ``.jsonl``, ``.json``, ``.parquet`` or ``.csv`` (a header row, then one record a row;
  every value is text);
* a ``datasets`` ``save_to_disk`` folder: a Dataset folder (``dataset_info.json``, ``state.json``)
  reads as it is; a DatasetDict folder (``dataset_dict.json``) reads the split ``data.split``;
* a folder of shards: ``.jsonl``, ``.json``, ``.parquet`` or ``.csv`` files all of one kind, read in
  the order of their names (hidden files and names starting with ``_``, such as Spark's
  ``_SUCCESS``, are not shards; subfolders are not read);
* otherwise a hub dataset name, only on machines that reach a hub:
  ``load_dataset(name, name=data.subset or None, split=data.split)``; ``data.subset`` is the
  configuration (``main`` for ``openai/gsm8k``), ``data.split`` defaults to ``train``.

Local files and folders of shards ignore ``data.subset`` and ``data.split``. A folder that is none
of these (empty, holding no data files, or mixing shard kinds), a damaged ``save_to_disk`` folder
and a DatasetDict without the split raise ``DataError`` naming the path and what it holds.

Formats (field names are logical names; ``fields`` remaps them to the file's own, e.g.
``{"prompt": "question"}``; logical names: prompt, response, messages, chosen, rejected):

* SFT: ``{prompt, response}`` strings, or ``{messages: [...]}`` whose last message is the assistant's
  response and whose earlier messages are the prompt (rendered with ``render_prompt``).
* Preferences: ``{prompt, chosen, rejected}`` strings; or chosen/rejected as message lists (with an
  optional ``prompt`` of messages or text) whose last message is the assistant's answer and whose
  earlier messages are shared; or the HH-RLHF style, only ``chosen`` and ``rejected`` strings holding
  whole dialogues (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``) with a shared prefix that is split off.
* Prompts: ``prompt`` as text or as messages (a ``messages`` field is used when there is no ``prompt``).

A bad row (missing or null field, wrong type, empty text, chosen equal to rejected, an HH-RLHF pair
with no shared prefix or no assistant turn) raises ``DataError`` naming the file (in a folder of
shards, the shard's path), the row and the field; with ``on_bad_row="skip"`` it is skipped instead
and counted in the ``LoadReport``.

Row numbers are 1-based and count within their file. For JSONL they are the file's line numbers
(blank lines count as lines but hold no row), so ``sed -n 7p file.jsonl`` shows row 7. For JSON,
Parquet, CSV (records after the header; blank lines hold none and are not counted), ``save_to_disk``
folders and hub datasets they are the 1-based record index.

JSONL is always parsed with the ``json`` module rather than ``datasets``: Arrow schema inference
fails on a column of mixed types (a number in one row, text in the next) and fills absent keys
with null, and it would lose the exact line numbers, which is all the bad-row messages are for.
CSV is parsed with the ``csv`` module: ``datasets``' csv builder infers types too, and would read a
column of numbers (answers "4", "6") as integers, which are no text. JSON and Parquet go through
``datasets`` (a ``.json`` file that ``datasets`` cannot read is retried with the ``json`` module, as
a JSON array or JSON lines).
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

from rlhf_ray.config.schema import REMAPPABLE_FIELDS
from rlhf_ray.errors import BadInputError

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
# What ``save_to_disk`` writes: a Dataset folder holds both files, a DatasetDict folder the third
# and a folder per split.
SAVE_TO_DISK_FILES = ("dataset_info.json", "state.json")
SAVE_TO_DISK_DICT_FILE = "dataset_dict.json"
LOGICAL_FIELDS = REMAPPABLE_FIELDS

# Reasons a row is bad; the keys of ``LoadReport.skipped``.
MISSING = "missing field"
WRONG_TYPE = "wrong type"
EMPTY = "empty text"
SAME = "chosen equals rejected"
NO_PREFIX = "no shared prefix"
NO_ASSISTANT = "no assistant turn"
NOT_UTF8 = "not UTF-8 text"

HH_ASSISTANT = "\n\nAssistant:"
OnBadRow = Literal["error", "skip"]


class DataError(BadInputError):
    """A bad data row (or an unusable source): ``"prefs.jsonl row 7, field 'chosen': empty text"``.

    ``source`` is the file the row is in (a shard's own path in a folder of shards). ``row`` is
    1-based within it: the line number for JSONL files, the record index for the other layouts;
    ``None`` when the problem is the whole source. ``field`` is the field name as it is
    spelled in the file (after the ``data.fields`` remap). ``kind`` is one of the reason constants
    (``MISSING``, ``WRONG_TYPE``, ``EMPTY``, ``SAME``, ``NO_PREFIX``, ``NO_ASSISTANT``).
    """

    def __init__(self, source: str, row: int | None, field: str | None, kind: str, detail: str = ""):
        self.source, self.row, self.field, self.kind, self.detail = source, row, field, kind, detail
        where = source if row is None else f"{source} row {row}"
        if field is not None:
            where += f", field {field!r}"
        super().__init__(f"{where}: {kind}" + (f" ({detail})" if detail else ""))


@dataclass
class SFTExample:
    prompt: str
    response: str
    # A multi-turn demonstration's response as messages (assistant turns are the policy's; tool
    # results and other replies are observed, not trained on); None: the response is one turn.
    turns: list[dict] | None = None


@dataclass
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str


@dataclass
class LoadReport:
    source: str
    rows_read: int = 0
    rows_kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows skipped
    truncated: int = 0  # prompts cut from the left to max_prompt_tokens
    dropped_too_long: int = 0  # prompts over max_prompt_tokens dropped (prompt_overflow=drop)
    first_errors: list[str] = field(default_factory=list)  # the first few skipped rows' messages

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def eventful(self) -> bool:
        """True when something was skipped, truncated or dropped (worth printing)."""
        return bool(self.n_skipped or self.truncated or self.dropped_too_long)

    def summary(self) -> str:
        parts = [f"{self.source}: kept {self.rows_kept} of {self.rows_read} rows"]
        if self.skipped:
            reasons = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
            parts.append(f"skipped {self.n_skipped} rows ({reasons}); first: {self.first_errors[0]}")
        if self.truncated:
            parts.append(f"truncated {self.truncated} prompts over the token limit")
        if self.dropped_too_long:
            parts.append(f"dropped {self.dropped_too_long} prompts over the token limit")
        return "; ".join(parts)

    def _skip(self, err: DataError) -> None:
        self.skipped[err.kind] = self.skipped.get(err.kind, 0) + 1
        if len(self.first_errors) < 3:
            self.first_errors.append(str(err))


# --- reading --------------------------------------------------------------------------------------


class RawRow(NamedTuple):
    """One row as read: the file it came from (a shard's own path, for messages), its 1-based number
    there (see the module docstring) and its value (an object, or whatever a malformed row holds)."""

    source: str
    number: int
    value: Any


def read_rows(source: str, subset: str = "", split: str = "train") -> tuple[list[RawRow], str]:
    """Rows of ``source`` (a file, a folder or a hub dataset, see the module docstring) in order, and
    the name of the whole source for reports (``source`` as given).

    ``subset`` and ``split`` are what a hub dataset reads (``load_dataset(source, name=subset,
    split=split)``, no subset when empty); ``split`` also picks a ``save_to_disk`` DatasetDict's
    split. Local files and folders of shards ignore both.

    Raises ``FileNotFoundError`` naming the path when a local source does not exist, and
    ``DataError`` naming it when it is no layout this module reads.
    """
    path = Path(source)
    if path.is_dir():  # before the suffix: Spark and Dask write a folder of shards named out.parquet
        return _read_folder(path, source, split), source
    if path.suffix.lower() in LOCAL_SUFFIXES:
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} does not exist")
        return _read_file(path, source), source
    from rlhf_ray.models.loading import looks_local

    if path.exists() or looks_local(source):  # never sent to a hub as a dataset name
        if not path.exists():
            raise FileNotFoundError(f"data file {path} does not exist")
        raise DataError(source, None, None, "unknown format",
                        f"a local data file must end in {', '.join(LOCAL_SUFFIXES)}")
    return _read_hub(source, subset, split), source


def _read_hub(name: str, subset: str, split: str) -> list[RawRow]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, name=subset or None, split=split)
    except ValueError as e:  # datasets' word on a subset or split the dataset does not have
        asked = f"data.subset={subset!r} and data.split={split!r}"
        raise DataError(name, None, None, f"cannot be read with {asked}", _one_line(e)) from None
    return _numbered(name, dataset)


def _read_folder(path: Path, source: str, split: str) -> list[RawRow]:
    """A ``save_to_disk`` folder, else a folder of shards (each named in messages by its own path)."""
    names = sorted(entry.name for entry in path.iterdir())
    if SAVE_TO_DISK_DICT_FILE in names or any(name in names for name in SAVE_TO_DISK_FILES):
        return _read_saved(path, source, split)
    # Hidden files and those datasets skips too (Spark's _SUCCESS, Dask's _metadata) are no shards.
    shards = [name for name in names if not name.startswith((".", "_")) and (path / name).is_file()
              and Path(name).suffix.lower() in LOCAL_SUFFIXES]
    kinds = "/".join(LOCAL_SUFFIXES)
    if not names:
        raise DataError(source, None, None, "an empty directory",
                        f"no {kinds} files, not a save_to_disk folder")
    if not shards:
        shown = [name + "/" if (path / name).is_dir() else name for name in names[:5]]
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        raise DataError(source, None, None, f"a directory with no {' or '.join(SAVE_TO_DISK_FILES)} (not a "
                        f"save_to_disk folder) and no {kinds} files", f"it holds {', '.join(shown)}{more}")
    suffixes = [Path(name).suffix.lower() for name in shards]
    if len(set(suffixes)) > 1:
        counts = ", ".join(f"{suffixes.count(s)} {s}" for s in sorted(set(suffixes)))
        raise DataError(source, None, None, "a directory of shards of more than one kind",
                        f"{counts} files; a folder of shards holds files of one kind")
    return [row for name in shards for row in _read_file(path / name, os.path.join(source, name))]


def _read_saved(path: Path, source: str, split: str) -> list[RawRow]:
    """A ``save_to_disk`` folder: a Dataset as it is, a DatasetDict's ``split``."""
    with _quiet_datasets() as datasets:
        try:
            saved = datasets.load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001 - whatever datasets says, the folder is damaged
            raise DataError(source, None, None, "not a readable save_to_disk folder",
                            f"{type(e).__name__}: {_one_line(e)}") from None
    if not isinstance(saved, datasets.DatasetDict):
        return _numbered(source, saved)
    if split not in saved:
        raise DataError(source, None, None, "a save_to_disk DatasetDict",
                        f"has splits {', '.join(saved)}; data.split={split} is not one of them")
    return _numbered(os.path.join(source, split), saved[split])


@contextmanager
def _quiet_datasets():
    """``datasets`` without its log of a file it cannot parse (this module reports that once,
    naming the file and row) and its progress bars (a local dataset loads in a moment)."""
    import datasets

    verbosity, bars = datasets.logging.get_verbosity(), datasets.is_progress_bar_enabled()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL + 1)
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def _load_local_file(builder: str, path: Path):
    with _quiet_datasets() as datasets:
        return datasets.load_dataset(builder, data_files=str(path), split="train")


def _read_file(path: Path, name: str) -> list[RawRow]:
    """One local data file's rows; ``name`` is the file as messages name it."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, name)
    if suffix == ".csv":
        return _read_csv(path, name)
    if suffix == ".parquet":
        try:
            return _numbered(name, _load_local_file("parquet", path))
        except Exception as e:  # noqa: BLE001 - whatever pyarrow says, the file is not Parquet
            raise DataError(name, None, None, "not a Parquet file", f"{type(e).__name__}") from None
    try:
        return _numbered(name, _load_local_file("json", path))
    except Exception:  # noqa: BLE001 - schema trouble of any kind: read the file ourselves
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(name, None, None, NOT_UTF8, f"byte {e.start}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return _read_jsonl(path, name)
        if isinstance(data, dict):  # {"data": [...]} style: the one list-valued key
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else [data]
        if not isinstance(data, list):
            raise DataError(name, None, None, WRONG_TYPE, "expected a JSON array of objects") from None
        return _numbered(name, data)


def _numbered(name: str, ds) -> list[RawRow]:
    return [RawRow(name, number, row) for number, row in enumerate(ds, start=1)]


def _one_line(err: Exception) -> str:
    """An exception's message on one line: the CLI prints a ``DataError`` as one line."""
    return " ".join(str(err).split())


def _read_jsonl(path: Path, name: str) -> list[RawRow]:
    rows = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                why = f"{NOT_UTF8} at byte {e.start}"
                rows.append(RawRow(name, lineno, _Unparsable(f"not valid JSON: {why}")))
                continue
            if not line.strip():
                continue
            try:
                rows.append(RawRow(name, lineno, json.loads(line)))
            except (json.JSONDecodeError, RecursionError) as e:
                # Unreadable JSON is a bad row of its own kind; the loader decides error or skip.
                why = str(e) if isinstance(e, json.JSONDecodeError) else "nested too deep"
                rows.append(RawRow(name, lineno, _Unparsable(f"not valid JSON: {why}")))
    return rows


def _read_csv(path: Path, name: str) -> list[RawRow]:
    """A CSV file with a header row, every value text as the file spells it (see the module
    docstring); blank lines hold no record and are not counted."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a spreadsheet's byte-order mark is no header
    except UnicodeDecodeError as e:
        raise DataError(name, None, None, NOT_UTF8, f"byte {e.start}") from None
    records = csv.reader(io.StringIO(text, newline=""))
    rows: list[RawRow] = []
    try:
        header = next(records, [])
        for record in records:
            if not record:
                continue
            value = dict(zip(header, record)) if len(record) == len(header) else \
                _Unparsable(f"not valid CSV: {len(record)} fields where the header has {len(header)}")
            rows.append(RawRow(name, len(rows) + 1, value))
    except csv.Error as e:  # a NUL byte, an unterminated quote at the end of the file
        raise DataError(name, len(rows) + 1, None, WRONG_TYPE, f"not valid CSV: {e}") from None
    return rows


class _Unparsable:
    """A row that is no object at all; ``message`` says what it is not (``"not valid JSON: ..."``)."""

    def __init__(self, message: str):
        self.message = message


# --- chat messages --------------------------------------------------------------------------------


class Prompt(str):
    """A prompt's text (what the policy reads) carrying the other columns of its data row:
    ``columns`` maps each field of the row besides the prompt to its value (an ``answer``, an id,
    a test case). It travels with the prompt wherever the prompt goes (groups, engines, Ray
    processes, checkpoints re-read the file), so a reward function gets each response's own row.
    Anything that reads it as text sees the prompt."""

    columns: dict[str, Any]

    def __new__(cls, text: str, columns: dict[str, Any] | None = None):
        prompt = super().__new__(cls, text)
        prompt.columns = dict(columns or {})
        return prompt

    def __reduce__(self):  # pickled (between Ray processes) as text and columns
        return Prompt, (str(self), self.columns)


def row_columns(prompt: str) -> dict[str, Any]:
    """The columns of ``prompt``'s data row; none for a plain string (a built-in task's prompt)."""
    return getattr(prompt, "columns", {})


def column_values(prompts: list[str]) -> dict[str, list[Any]]:
    """Every column of the prompts' rows, one value per prompt in order (None where a row lacks
    it): the keyword arguments of reward functions, the ``columns`` of the HTTP reward's request."""
    names = dict.fromkeys(name for p in prompts for name in row_columns(p))
    return {name: [row_columns(p).get(name) for p in prompts] for name in names}


class ChatPrompt(Prompt):
    """A chat prompt: the text it was rendered to, carrying its ``messages`` so a reward model with
    another chat template can render the conversation its own way (and its row's ``columns``)."""

    messages: list[dict]

    def __new__(cls, text: str, messages: list[dict], columns: dict[str, Any] | None = None):
        prompt = super().__new__(cls, text, columns)
        prompt.messages = messages
        return prompt

    def __reduce__(self):  # pickled (between Ray processes) as text, messages and columns
        return ChatPrompt, (str(self), self.messages, self.columns)


def render_prompt(messages: list[dict], tokenizer=None) -> str:
    """A chat prompt as text, ending where the assistant's reply begins.

    With a tokenizer that has a ``chat_template``:
    ``tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``.
    Otherwise (no tokenizer, or one without a template, like ``builtin:tiny``'s) a plain format, one
    line per message, ``"System: ..."``, ``"User: ..."``, ``"Assistant: ..."`` (other roles
    capitalised), then the cue ``"Assistant: "`` (trailing space, so the response text follows)::

        User: What is 2+2?
        Assistant: 4
        User: And 3+3?
        Assistant:␠
    """
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    names = {"user": "User", "assistant": "Assistant", "system": "System"}
    lines = [f"{names.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in messages]
    return "\n".join([*lines, "Assistant: "])


# --- row validation -------------------------------------------------------------------------------


class _Row:
    """One row with the field remap applied; every accessor raises ``DataError`` on a bad value."""

    def __init__(self, source: str, number: int, row: Any, fields: dict[str, str]):
        self.source, self.number, self.fields = source, number, fields
        if isinstance(row, _Unparsable):
            raise DataError(source, number, None, WRONG_TYPE, row.message)
        if not isinstance(row, dict):
            raise DataError(source, number, None, WRONG_TYPE, f"a row must be an object, got {_tname(row)}")
        self.row = row

    def name(self, logical: str) -> str:
        return self.fields.get(logical, logical)

    def has(self, logical: str) -> bool:
        return self.row.get(self.name(logical)) is not None

    def error(self, logical: str | None, kind: str, detail: str = "") -> DataError:
        return DataError(self.source, self.number, None if logical is None else self.name(logical), kind, detail)

    def raw(self, logical: str) -> Any:
        name = self.name(logical)
        if name not in self.row:
            hint = f"the row has {', '.join(map(str, self.row)) or 'no fields'}"
            if logical not in self.fields:
                hint += f"; remap with data.fields, e.g. {{{logical}: <field>}}"
            raise self.error(logical, MISSING, hint)
        if self.row[name] is None:
            raise self.error(logical, MISSING, "null")
        return self.row[name]

    def text(self, logical: str) -> str:
        value = self.raw(logical)
        if not isinstance(value, str):
            raise self.error(logical, WRONG_TYPE, f"expected text, got {_tname(value)}")
        if not value.strip():
            raise self.error(logical, EMPTY)
        return value

    def messages(self, logical: str, allow_empty: bool = False) -> list[dict]:
        value = self.raw(logical)
        if not isinstance(value, list):
            raise self.error(logical, WRONG_TYPE, f"expected a list of messages, got {_tname(value)}")
        if not value and not allow_empty:
            raise self.error(logical, EMPTY, "no messages")
        out = []
        for i, m in enumerate(value, start=1):
            if not isinstance(m, dict):
                raise self.error(logical, WRONG_TYPE, f"message {i} is {_tname(m)}, not a {{role, content}} object")
            for key in ("role", "content"):
                if m.get(key) is None:
                    raise self.error(logical, MISSING, f"message {i} has no {key!r}")
                if not isinstance(m[key], str):
                    raise self.error(logical, WRONG_TYPE, f"message {i} {key!r} is {_tname(m[key])}, not text")
            out.append({"role": m["role"], "content": m["content"]})
        return out

    def split_last_assistant(self, logical: str, messages: list[dict]) -> tuple[list[dict], str]:
        """(the messages before the last, the last message's text), which must be the assistant's."""
        if not messages or messages[-1]["role"] != "assistant":
            last = messages[-1]["role"] if messages else "nothing"
            raise self.error(logical, NO_ASSISTANT, f"the last message must be the assistant's, got {last}")
        if not messages[-1]["content"].strip():
            raise self.error(logical, EMPTY, "the assistant's message is empty")
        return messages[:-1], messages[-1]["content"]


def _tname(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_fields(fields: dict[str, str] | None) -> dict[str, str]:
    fields = dict(fields or {})
    unknown = sorted(set(fields) - set(LOGICAL_FIELDS))
    if unknown:
        raise ValueError(f"data.fields: unknown field name(s) {', '.join(unknown)}; "
                         f"remappable names: {', '.join(LOGICAL_FIELDS)}")
    return fields


def _load(source: str, fields: dict[str, str] | None, on_bad_row: str, what: str,
          parse: Callable[[_Row], Any], subset: str, split: str) -> tuple[list, LoadReport]:
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"data.on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    fields = _check_fields(fields)
    rows, name = read_rows(source, subset, split)
    report = LoadReport(source=name, rows_read=len(rows))
    out = []
    for row in rows:
        try:
            out.append(parse(_Row(row.source, row.number, row.value, fields)))
        except DataError as err:
            if on_bad_row == "error":
                raise
            report._skip(err)
    report.rows_kept = len(out)
    if not out:
        raise DataError(name, None, None, EMPTY, f"no usable {what}: {report.summary()}")
    return out, report


# --- the three kinds of data ----------------------------------------------------------------------


def load_sft(source: str, fields: dict[str, str] | None = None, on_bad_row: OnBadRow = "error",
             tokenizer=None, subset: str = "", split: str = "train") -> tuple[list[SFTExample], LoadReport]:
    """SFT rows: ``{prompt, response}`` text, or ``{messages}`` ending with the assistant's response.

    A row with a non-null ``messages`` field is read as messages, any other as prompt/response. With
    a chat template, a conversation of several assistant turns trains on each of them: the messages
    before the first are the prompt, the later ones ``turns``, laid out as a rollout's trajectory
    (tool results and user replies observed, not trained on). Without a template, or with one
    assistant turn, everything before the last assistant message is the prompt.
    """
    return _load(source, fields, on_bad_row, "SFT examples", _sft_parser(tokenizer), subset, split)


def _sft_parser(tokenizer) -> Callable[[_Row], SFTExample]:
    def parse(row: _Row) -> SFTExample:
        if row.has("messages") and not row.has("prompt"):
            messages = row.messages("messages")
            context, response = row.split_last_assistant("messages", messages)
            first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
            if 0 < first < len(messages) - 1 and getattr(tokenizer, "chat_template", None):
                opening = messages[:first]
                return SFTExample(ChatPrompt(render_prompt(opening, tokenizer), opening), response, messages[first:])
            if not context:
                raise row.error("messages", EMPTY, "no prompt messages before the assistant's response")
            return SFTExample(render_prompt(context, tokenizer), response)
        return SFTExample(row.text("prompt"), row.text("response"))

    return parse


def load_preferences(source: str, fields: dict[str, str] | None = None, on_bad_row: OnBadRow = "error",
                     tokenizer=None, subset: str = "",
                     split: str = "train") -> tuple[list[PreferencePair], LoadReport]:
    """Preference rows: plain ``{prompt, chosen, rejected}``; messages; or HH-RLHF dialogues.

    * chosen/rejected are lists: messages. An optional ``prompt`` (messages, or text = one user
      message) is put in front of both. The last message of each must be the assistant's; all the
      earlier ones must be the same in both (the prompt, rendered with ``render_prompt``).
    * chosen/rejected are text and the row has a ``prompt``: plain text.
    * chosen/rejected are text and there is no ``prompt``: HH-RLHF, see ``split_hh_dialogues``.
    """

    def parse(row: _Row) -> PreferencePair:
        if isinstance(row.raw("chosen"), list) or isinstance(row.raw("rejected"), list):
            return _preference_messages(row, tokenizer)
        if row.has("prompt"):
            pair = PreferencePair(row.text("prompt"), row.text("chosen"), row.text("rejected"))
        else:
            pair = split_hh_dialogues(row.text("chosen"), row.text("rejected"), row)
        if pair.chosen.strip() == pair.rejected.strip():
            raise row.error("rejected", SAME)
        return pair

    return _load(source, fields, on_bad_row, "preference pairs", parse, subset, split)


def _preference_messages(row: _Row, tokenizer) -> PreferencePair:
    prefix: list[dict] = []
    if row.has("prompt"):
        prompt = row.raw("prompt")
        prefix = [{"role": "user", "content": row.text("prompt")}] if isinstance(prompt, str) \
            else row.messages("prompt")
    chosen_ctx, chosen = row.split_last_assistant("chosen", prefix + row.messages("chosen"))
    rejected_ctx, rejected = row.split_last_assistant("rejected", prefix + row.messages("rejected"))
    if chosen_ctx != rejected_ctx:
        raise row.error("rejected", NO_PREFIX, "the messages before the last differ from chosen's")
    if not chosen_ctx:
        raise row.error("chosen", EMPTY, "no prompt messages before the assistant's answer")
    if chosen.strip() == rejected.strip():
        raise row.error("rejected", SAME)
    return PreferencePair(render_prompt(chosen_ctx, tokenizer), chosen, rejected)


def split_hh_dialogues(chosen: str, rejected: str, row: _Row | None = None) -> PreferencePair:
    """Splits two HH-RLHF dialogues into (shared prompt, chosen answer, rejected answer).

    The prompt is the longest shared prefix that ends with ``"\\n\\nAssistant:"`` (it includes that
    cue); the answers are the rest of each dialogue, kept verbatim (usually with a leading space),
    so ``prompt + chosen`` is exactly the original chosen dialogue. Raises ``DataError`` (kind
    ``SAME``, ``NO_ASSISTANT``, ``NO_PREFIX`` or ``EMPTY``) when that split is impossible.
    """

    def fail(logical: str, kind: str, detail: str = "") -> DataError:
        return row.error(logical, kind, detail) if row is not None else DataError("<hh>", None, logical, kind, detail)

    if chosen == rejected:
        raise fail("rejected", SAME)
    for logical, text in (("chosen", chosen), ("rejected", rejected)):
        if HH_ASSISTANT not in text:
            raise fail(logical, NO_ASSISTANT, "no '\\n\\nAssistant:' turn in the dialogue")
    shared = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        shared += 1
    cut = chosen.rfind(HH_ASSISTANT, 0, shared)  # the last cue lying wholly inside the shared prefix
    if cut < 0:
        raise fail("rejected", NO_PREFIX, "the dialogues share no prefix ending in '\\n\\nAssistant:'")
    end = cut + len(HH_ASSISTANT)
    pair = PreferencePair(chosen[:end], chosen[end:], rejected[end:])
    for logical in ("chosen", "rejected"):
        if not getattr(pair, logical).strip():
            raise fail(logical, EMPTY, "the final assistant turn is empty")
    return pair


def load_prompts(source: str, fields: dict[str, str] | None = None, on_bad_row: OnBadRow = "error",
                 tokenizer=None, subset: str = "", split: str = "train") -> tuple[list[Prompt], LoadReport]:
    """Prompt rows: ``prompt`` as text or as messages (rendered with ``render_prompt``); a row with
    no ``prompt`` but a ``messages`` field uses that. Every other field of the row comes along in
    the prompt's ``columns`` (for reward functions and environments)."""

    def parse(row: _Row) -> Prompt:
        logical = "messages" if row.has("messages") and not row.has("prompt") else "prompt"
        value = row.raw(logical)
        columns = {name: v for name, v in row.row.items() if name != row.name(logical)}
        if isinstance(value, list):
            messages = row.messages(logical)
            return ChatPrompt(render_prompt(messages, tokenizer), messages, columns)
        return Prompt(row.text(logical), columns)

    return _load(source, fields, on_bad_row, "prompts", parse, subset, split)


def load_lm_examples(source: str, fields: dict[str, str] | None = None, on_bad_row: OnBadRow = "error",
                     tokenizer=None, subset: str = "",
                     split: str = "train") -> tuple[list[SFTExample], LoadReport]:
    """Text for language modelling (the PPO pretraining mix, eval perplexity). A ``.txt`` file holds
    one text per non-blank line; other sources hold rows with a ``text`` field or SFT rows (prompt/
    response or messages). A plain text is an example with an empty prompt: every token counts;
    an SFT row's response tokens count, given its prompt."""
    path = Path(source)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} does not exist")
        texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not texts:
            raise DataError(source, None, None, EMPTY, "no non-blank line")
        return [SFTExample("", t) for t in texts], LoadReport(source=source, rows_read=len(texts),
                                                               rows_kept=len(texts))
    parse_sft = _sft_parser(tokenizer)

    def parse(row: _Row) -> SFTExample:
        return SFTExample("", row.text("text")) if row.has("text") else parse_sft(row)

    return _load(source, fields, on_bad_row, "language-modelling texts", parse, subset, split)


# --- prompt length, holdout, task data ------------------------------------------------------------


def apply_prompt_limit(items: list, tokenizer, max_prompt_tokens: int,
                       overflow: Literal["truncate", "drop"] = "truncate",
                       report: LoadReport | None = None) -> list:
    """Prompts (strings) or examples with a ``.prompt`` over ``max_prompt_tokens`` tokens are cut
    from the LEFT (the end, nearest the response, is kept) or dropped; the counts go into ``report``
    (``truncated`` / ``dropped_too_long``, and ``rows_kept`` loses the dropped ones).

    Tokens are counted as ``tokenizer(prompt, add_special_tokens=True)`` counts them, the way the
    stages encode prompts, so a prompt that passes here is never cut again there. Truncation cuts
    the text at a token boundary (offset mapping of a fast tokenizer; else decode of the kept ids).
    """
    if overflow not in ("truncate", "drop"):
        raise ValueError(f"data.prompt_overflow must be 'truncate' or 'drop', got {overflow!r}")
    budget = max_prompt_tokens - tokenizer.num_special_tokens_to_add(pair=False)
    if budget < 1:
        raise ValueError(f"max_prompt_tokens={max_prompt_tokens} leaves no room beside the special tokens")
    out, truncated, dropped = [], 0, 0
    for item in items:
        prompt = item if isinstance(item, str) else item.prompt
        if _count(tokenizer, prompt) <= budget:
            out.append(item)
            continue
        if overflow == "drop":
            dropped += 1
            continue
        cut = _left_truncate(tokenizer, prompt, budget)
        truncated += 1
        if isinstance(item, Prompt):  # the row's columns stay; cut text no longer renders its messages
            out.append(Prompt(cut, item.columns))
        elif isinstance(item, str):
            out.append(cut)
        else:
            out.append(type(item)(**{**item.__dict__, "prompt": cut}))
    if report is not None:
        report.truncated += truncated
        report.dropped_too_long += dropped
        report.rows_kept -= dropped
    return out


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _left_truncate(tokenizer, text: str, budget: int) -> str:
    keep = budget
    while keep > 0:
        if getattr(tokenizer, "is_fast", False):
            offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            cut = text[offsets[-keep][0]:]
        else:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            cut = tokenizer.decode(ids[-keep:])
        if _count(tokenizer, cut) <= budget:  # re-tokenising at a new boundary can merge differently
            return cut
        keep -= 1
    return ""


def split_holdout(items: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic (train, eval) split: ``round(len * eval_fraction)`` items chosen with
    ``random.Random(seed)`` (at least one when the fraction is > 0 and there are >= 2 items, and
    never all of them); both halves keep the input order."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n = len(items)
    n_eval = round(n * eval_fraction)
    if eval_fraction > 0 and n >= 2:
        n_eval = min(max(n_eval, 1), n - 1)
    held = set(random.Random(seed).sample(range(n), n_eval))
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def _task(task, seed: int = 0):
    if isinstance(task, str):
        from rlhf_ray.tasks import get_task

        return get_task(task, seed)
    return task


def task_sft(task, n: int, error_rate: float = 0.1) -> list[SFTExample]:
    """The built-in task's demonstrations (``task`` is a task object or a built-in task name)."""
    return [SFTExample(r["prompt"], r["response"], r.get("turns")) for r in _task(task).sft_examples(n, error_rate)]


def task_preferences(task, n: int) -> list[PreferencePair]:
    """The built-in task's preference pairs (``task`` is a task object or a built-in task name)."""
    return [PreferencePair(r["prompt"], r["chosen"], r["rejected"]) for r in _task(task).preference_pairs(n)]
