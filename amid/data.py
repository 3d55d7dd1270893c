"""Reading user data and turning records into tokenized training examples.

A record is a dict from a JSONL/JSON/Parquet/CSV/text file or a `datasets` dataset. An example is
what the cache stores and the trainer reads: `input_ids` and the `positions` t whose next token
`input_ids[t + 1]` is a target (the teacher's distribution at logits row t).

Templates:
- "text": the `text_field` is the whole example; every next token is a target.
- "plain": `prompt_field` + `response_field` concatenated; targets are the response tokens
  (and the end-of-sequence token that closes the response).
- "dolly": databricks-dolly style `instruction` / `context` / `response`, wrapped in the
  Alpaca/Dolly instruction template used by MiniLLM, DistiLLM and AMiD.
- "chat": prompt as a user turn and response as the assistant turn, through the tokenizer's
  chat template; or a conversation (`messages_field`: a list of {"role", "content"}) whose
  assistant turns are all targets.
- "auto": "text" if the text field exists, else "chat" for a messages field, else "plain" if
  prompt/response exist, else "dolly".
"""

from __future__ import annotations

import array
import bisect
import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple

from amid.errors import first_line

__all__ = ["DataError", "TemplateConfig", "Example", "record_of", "CHAT_SETTINGS", "load_records", "build_examples", "lm_blocks",
           "TEMPLATES",
           "field_text", "where", "chat_end_of_turn", "EXAMPLE_CHANGES", "example_changes", "record_messages",
           "closing_texts"]

TEMPLATES = ("auto", "text", "plain", "dolly", "chat")

DOLLY_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n{context_block}### Response:\n"
)
# With a context the reference template (MiniLLM's Dolly processing) has a different first sentence.
DOLLY_TEMPLATE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "{context_block}### Response:\n"
)

_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
    ".text": "text",
}


# What each amid version changed in the examples it builds from the same records: a cache started
# by an older version cannot be resumed by a newer one (the message lists these).
EXAMPLE_CHANGES = {
    "0.3.0": "records without a response are skipped; a response that ends in the EOS text gets one EOS",
    "0.4.0": "a chat response whose first token merges with the prompt's keeps the template's end of turn; a "
             "text record or chat response that ends in its closing token's text is closed once; records with a "
             "messages field are conversations (--template auto picks chat for them)",
    "0.5.0": "a chat answer after a prompt the template renders otherwise once the answer follows is closed by the "
             "template's end of turn, not EOS (conversations such templates rewrite, refused before, are split into "
             "one example per turn)",
    "0.5.1": "an instruction response is tokenized as the continuation of its prompt where the prompt's tokens are "
             "a prefix of the whole text's (a SentencePiece tokenizer no longer starts every response with a space "
             "token); a response ending in the literal text <|endoftext|> loses it with any tokenizer, where the "
             "example is closed (as one ending in the EOS text); a chat "
             "answer's targets end at the template's end of turn (ChatML's newline after <|im_end|> is context)",
}


def example_changes(old: str | None, new: str | None) -> list[str]:
    """EXAMPLE_CHANGES of the versions after `old` up to `new` (all of them for an unknown `old`)."""
    def key(version: str | None) -> tuple[int, ...]:  # "0.4.0rc1" -> (0, 4, 0); unknown -> ()
        parts = [re.match(r"\d+", x) for x in str(version).split(".")[:3]]
        return tuple(int(m.group()) for m in parts) if all(parts) else ()
    return [f"{v}: {text}" for v, text in EXAMPLE_CHANGES.items() if key(old) < key(v) <= key(new)]


class DataError(ValueError):
    """Bad user data; the message names the file (and line where known) and what to do."""


@dataclass(frozen=True)
class TemplateConfig:
    template: str = "auto"
    prompt_field: str = "prompt"
    response_field: str = "response"
    text_field: str = "text"
    messages_field: str = "messages"  # chat: a list of {"role", "content"} messages per record
    # chat: keyword arguments of the template itself (Qwen3's {"enable_thinking": false})
    chat_template_kwargs: dict[str, Any] | None = None
    chat_turns: str = "all"  # chat: "all" assistant turns are targets, or only the "last" of each conversation
    max_length: int = 1024
    overflow: str = "error"  # "error" | "truncate" | "skip"
    add_eos: bool = True

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise ValueError(f"unknown template {self.template!r}; choose one of {', '.join(TEMPLATES)}")
        if self.overflow not in ("error", "truncate", "skip"):
            raise ValueError(f"overflow must be error, truncate or skip, got {self.overflow!r}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")
        if self.chat_template_kwargs is not None and not (
                isinstance(self.chat_template_kwargs, dict) and all(isinstance(k, str) for k in self.chat_template_kwargs)):
            raise ValueError(f"--chat-template-kwargs must be a JSON object, got {self.chat_template_kwargs!r}")
        taken = sorted(set(self.chat_template_kwargs or ()) & set(CHAT_CALL_ARGUMENTS))
        if taken:
            raise ValueError(f"--chat-template-kwargs: {', '.join(taken)} {'is' if len(taken) == 1 else 'are'} set by "
                             f"amid itself; pass only the template's own arguments (e.g. enable_thinking)")
        if self.chat_turns not in ("all", "last"):
            raise ValueError(f"--chat-turns must be all or last, got {self.chat_turns!r}")

    def chat_settings(self) -> dict[str, Any]:
        """The chat options set away from their defaults (CHAT_SETTINGS): what a cache records
        with its data, and an evaluation of the same format takes back."""
        values = {name: getattr(self, name) for name in CHAT_SETTINGS}
        return {name: v for name, v in values.items() if v and v != TemplateConfig.__dataclass_fields__[name].default}


class Encoded(NamedTuple):
    """One example of a record: input_ids and the [start, end) spans of its target tokens.
    `loose`: an answer after a context that the template renders otherwise once the answer
    follows, so it is the answer as written, closed by hand (see `_conversation`)."""

    ids: list[int]
    spans: list[tuple[int, int]]
    loose: bool = False


# TemplateConfig's chat options that change the examples (`TemplateConfig.chat_settings`).
CHAT_SETTINGS = ("chat_template_kwargs", "chat_turns")

# Arguments amid passes to apply_chat_template itself: not for --chat-template-kwargs.
CHAT_CALL_ARGUMENTS = ("conversation", "messages", "add_generation_prompt", "continue_final_message", "tokenize",
                       "return_tensors", "return_dict", "return_assistant_tokens_mask", "padding", "truncation",
                       "max_length", "tokenizer_kwargs", "chat_template")


# An example's id is its record's index; the n-th later example of a record that makes several (a
# conversation split at its turns) adds n << TURN_SHIFT, so a record's examples share the low bits,
# which the held-out split hashes: they fall on the same side of it.
TURN_SHIFT = 40


def record_of(example_id):
    """The index of the record an example id (an int, or a NumPy array of them) came from."""
    return example_id & ((1 << TURN_SHIFT) - 1)


@dataclass
class Example:
    """One tokenized example. `positions` are logits rows whose next token is a target; `record`
    is the index of the record it came from (`record_of(example_id)`)."""

    example_id: int
    input_ids: list[int]
    positions: list[int]

    @property
    def record(self) -> int:
        return record_of(self.example_id)

    @property
    def turn(self) -> int:
        """0, or n for the n-th later example of its record (a conversation split at its turns)."""
        return self.example_id >> TURN_SHIFT


@dataclass
class BuildStats:
    records: int = 0
    examples: int = 0
    truncated: int = 0
    skipped_too_long: int = 0
    skipped_empty: int = 0
    cut_by_length: int = 0  # of skipped_empty: targets there, all past --max-length
    first_empty: str | None = None  # where the first record without a target came from
    split_conversations: int = 0  # conversations made into one example per assistant turn
    first_split: str | None = None  # where the first of them came from
    loose_answers: int = 0  # answers after a context the template renders otherwise (Encoded.loose)
    first_loose: str | None = None


# ----------------------------------------------------------------------------------------------
# Records


@dataclass
class Locations:
    """Where each record of JSON or text files sits: file index and line (JSON Lines, text) or
    element (a JSON array), two ints per record."""

    files: list[str]
    arrays: list[bool]  # per file: a JSON array (numbers are elements) or JSON Lines (line numbers)
    file_of: array.array
    number_of: array.array

    def __len__(self) -> int:
        return len(self.file_of)

    def __getitem__(self, index: int) -> str:
        f = self.file_of[index]
        n = self.number_of[index]
        return f"{self.files[f]} (element {n})" if self.arrays[f] else f"{self.files[f]}:{n}"


class Records(list):
    """A list of records that can say where record i came from (`where(i)`: "FILE:LINE" for
    JSON Lines and text, "FILE (element i)" for a JSON array, "SOURCE record i" (1-based)
    otherwise)."""

    def __init__(self, records: Iterable[dict[str, Any]], source: str, locations: Locations | None = None):
        super().__init__(records)
        self.source = source
        self.locations = locations

    def where(self, index: int) -> str:
        if self.locations is not None and index < len(self.locations):
            return self.locations[index]
        return f"{self.source} record {index + 1}"


def where(records: Iterable[dict[str, Any]], index: int, source: str) -> str:
    """Where record `index` of `records` came from (see `Records`; any other list: by index)."""
    return (records if isinstance(records, Records) else Records((), source)).where(index)


def load_records(source: str, split: str = "train", limit: int | None = None) -> Records:
    """Records from a local file/directory (JSONL/JSON/Parquet/CSV/text) or a `datasets` name.

    Raises DataError naming the file and line for malformed JSONL (or text that is not UTF-8),
    and for empty data.
    """
    path = Path(source)
    if source.startswith("~"):
        raise DataError(f"{source}: '~' is not expanded here; pass {path.expanduser()}")
    if path.exists():
        records, locations = _load_local(path, split)
    elif source.startswith((".", "/")) or source.endswith(tuple(_BUILDERS)):
        # Looks like a path (hub dataset names are "name" or "owner/name" without a file extension).
        raise DataError(f"{source}: no such file or directory")
    else:
        records, locations = _load_hub(source, split), None
    if limit is not None:
        records = records[:limit]
    if not records:
        raise DataError(f"{source}: no records (empty file or split {split!r}); nothing to do")
    return Records(records, source, locations)


def _load_local(path: Path, split: str) -> tuple[list[dict[str, Any]], Locations | None]:
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        return _load_saved(path, split), None  # a `datasets` save_to_disk directory
    if split != "train":  # a file holds one split: reading it whole for --split test would mislead
        raise DataError(f"{path}: --split {split} applies to a datasets name or a saved DatasetDict, and this is "
                        "a local file or folder of files; point --data at that split's file instead")
    files = sorted(p for p in path.rglob("*") if p.suffix in _BUILDERS) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: no data files ({', '.join(_BUILDERS)}) found")
    builders = {_BUILDERS.get(f.suffix) for f in files}
    if None in builders or len(builders) != 1:
        raise DataError(
            f"{path}: cannot tell the format of {', '.join(f.name for f in files)}; "
            f"use one kind of file among {', '.join(_BUILDERS)}"
        )
    builder = builders.pop()
    locations = None
    if builder == "json":
        # `datasets` reads the files in this order and each one's records in file order.
        locations = Locations([str(f) for f in files], [], array.array("l"), array.array("l"))
        for i, f in enumerate(files):
            is_array, numbers = _check_json_file(f)
            locations.arrays.append(is_array)
            locations.file_of.extend([i] * len(numbers))
            locations.number_of.extend(numbers)
        n_records = len(locations)
    elif builder == "text":  # one record per line, as `datasets` splits them (universal newlines)
        locations = Locations([str(f) for f in files], [False] * len(files), array.array("l"), array.array("l"))
        for i, f in enumerate(files):
            n = _text_lines(f)
            locations.file_of.extend([i] * n)
            locations.number_of.extend(range(1, n + 1))
        n_records = len(locations)
    else:
        n_records = sum(f.stat().st_size for f in files)  # nonzero unless every file is empty
    if not n_records:  # `datasets` fails on empty files with an unhelpful error (StopIteration)
        raise DataError(f"{path}: no records (empty file); nothing to do")
    import datasets

    datasets.disable_progress_bars()
    logger = logging.getLogger("datasets")  # it logs a failed file before raising: one line, ours
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        extra = {"encoding": "utf-8-sig"} if builder == "text" else {}  # a byte-order mark is no text
        ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **extra)
    except Exception as exc:  # datasets raises many types; the user needs the file and the reason
        raise DataError(f"{path}: could not be read as {builder}: {first_line(exc)}") from exc
    finally:
        logger.setLevel(level)
    records = [dict(r) for r in ds]
    return records, (locations if locations is not None and len(locations) == len(records) else None)


def _load_saved(path: Path, split: str) -> list[dict[str, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"{path}: could not be read with datasets.load_from_disk: {first_line(exc)}") from exc
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split {split!r} (splits: {', '.join(ds)}); pass --split, or point --data at "
                            f"{path / next(iter(ds))} (a split's own directory)")
        ds = ds[split]
    elif split != "train":
        raise DataError(f"{path}: a saved Dataset holds one split, and --split {split} names another; "
                        "drop --split, or save a DatasetDict")
    return [dict(r) for r in ds]


def _load_hub(name: str, split: str) -> list[dict[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:
        raise DataError(
            f"{name}: not a local file and could not be loaded as a datasets name "
            f"(split {split!r}): {first_line(exc)}"
        ) from exc
    return [dict(r) for r in ds]


def _check_json_file(path: Path) -> tuple[bool, list[int]]:
    """Validate JSONL line by line (or a JSON array) so errors name the line; returns (whether
    the file is a JSON array, each record's line number or array element)."""
    with open(path, "rb") as fh:
        lines = (_utf8(raw, path, lineno) for lineno, raw in enumerate(fh, 1))
        numbers: list[int] = []
        for lineno, line in enumerate(lines, 1):
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark
            if not line.strip():
                continue
            if not numbers and line.lstrip().startswith("["):
                break  # a JSON array: parsed whole below
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                if not numbers and line.lstrip().startswith("{"):
                    _refuse_one_object(path)  # a pretty-printed JSON object, not JSON Lines
                raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg}); fix or remove the line") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object per line, got {type(obj).__name__}")
            numbers.append(lineno)
        else:
            return False, numbers
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (at byte {exc.start}); save the file as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg}); fix the file") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: a JSON file must hold an array of objects")
    return True, list(range(len(data)))


def _refuse_one_object(path: Path) -> None:
    """DataError if the whole file is one JSON object (valid JSON, but not records); else return."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return
    if isinstance(data, dict):
        keys = ", ".join(list(data)[:5])
        raise DataError(f"{path}: holds one JSON object (keys: {keys}), not records; write one object per line "
                        f"(JSON Lines) or an array of objects")


def _text_lines(path: Path) -> int:
    """Lines of a text file as `datasets` reads them (universal newlines: "\r\n", "\r" and "\n"),
    each checked to be UTF-8 (a DataError names the first that is not). Streams the file."""
    n = 0
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as fh:  # bad bytes: lone surrogates
        for n, line in enumerate(fh, 1):
            bad = _UNDECODED.search(line)
            if bad:
                raise _not_utf8(path, n, ord(bad.group()) - 0xDC00, bad.start())
    return n


_UNDECODED = re.compile("[\udc80-\udcff]")


def _utf8(raw: bytes, path: Path, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, lineno, raw[exc.start], exc.start) from None


def _not_utf8(path: Path, lineno: int, byte: int, at: int) -> DataError:
    return DataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{byte:02x} at column {at + 1}); save the file as UTF-8")


# ----------------------------------------------------------------------------------------------
# Templates and tokenization


def resolve_template(records: list[dict[str, Any]], cfg: TemplateConfig, source: str) -> tuple[str, TemplateConfig]:
    fields = set(records[0])
    if cfg.response_field == "response" and "response" not in fields and "output" in fields:
        # Dolly/Alpaca-style files with `output` (e.g. the dev/test splits): same meaning.
        cfg = dataclasses.replace(cfg, response_field="output")
    template = cfg.template if cfg.template != "auto" else _pick_auto_template(records, cfg, source, fields)
    if template is None:
        raise DataError(
            f"{source}: fields {sorted(fields)} match no template; expected '{cfg.text_field}' "
            f"(text), '{cfg.messages_field}' (chat), '{cfg.prompt_field}'/'{cfg.response_field}' (instruction "
            f"data) or 'instruction'/'response' (Dolly); name yours with --text-field / --messages-field / "
            f"--prompt-field / --response-field"
        )
    needed = {
        "text": [cfg.text_field],
        "plain": [cfg.prompt_field, cfg.response_field],
        "chat": [cfg.messages_field] if cfg.messages_field in fields else [cfg.prompt_field, cfg.response_field],
        "dolly": ["instruction", cfg.response_field],
    }[template]
    missing = [f for f in needed if f not in fields]
    if missing:
        raise DataError(
            f"{source}: template {template!r} needs field(s) {missing}, the data has {sorted(fields)}; "
            f"name yours with --text-field / --prompt-field / --response-field"
        )
    return template, cfg


def _auto_template(fields: set[str] | dict[str, Any], cfg: TemplateConfig) -> str | None:
    """The template `--template auto` picks for records with these fields (None: no match)."""
    if cfg.text_field in fields:
        return "text"
    if cfg.messages_field in fields:
        return "chat"
    if cfg.prompt_field in fields and cfg.response_field in fields:
        return "plain"
    if "instruction" in fields and cfg.response_field in fields:
        return "dolly"
    return None


def _pick_auto_template(records: list[dict[str, Any]], cfg: TemplateConfig, source: str,
                         fields: set[str]) -> str | None:
    """The template `--template auto` picks: that of the first record whose set values match one
    (a table's absent values are None; a record with an empty response matches none), else that of
    the first record's fields. A file whose records hold the fields of different templates (a
    `text` record among prompt/response ones) would have all but one kind skipped as empty: refused,
    naming one record of each."""
    first = None
    for index, record in enumerate(records):
        own = _auto_template({k for k, v in record.items() if v is not None}, cfg)
        if own is None:
            continue
        if first is None:
            first = (index, own)
        elif own != first[1]:
            raise DataError(f"{where(records, index, source)}: this record has the fields of template {own!r}, "
                            f"{where(records, first[0], source)} those of {first[1]!r}; keep one kind of record "
                            f"per file, or pass --template to choose (records without its fields are then skipped)")
    return first[1] if first is not None else _auto_template(fields, cfg)


def dolly_prompt(record: dict[str, Any]) -> str:
    context = (record.get("context") or record.get("input") or "").strip()
    block = f"### Input:\n{context}\n\n" if context else ""
    template = DOLLY_TEMPLATE_WITH_INPUT if context else DOLLY_TEMPLATE
    return template.format(instruction=str(record["instruction"]).strip(), context_block=block)


def field_text(record: dict[str, Any], field: str, where: str) -> str:
    """A field's text: missing or null is empty; numbers (CSV columns) are written out; anything
    else (a list, an object) is refused rather than turned into its Python repr."""
    value = record.get(field)
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"{where}: field {field!r} holds a {type(value).__name__}, not text; make it a string")


def _split(record: dict[str, Any], template: str, cfg: TemplateConfig, where: str) -> tuple[str, str]:
    """(prompt, target text) of a record; prompt is empty for plain text."""
    if template == "text":
        return "", field_text(record, cfg.text_field, where)
    if template == "dolly":
        prompt = field_text(record, cfg.prompt_field, where) or dolly_prompt(record)
        return prompt, field_text(record, cfg.response_field, where)
    return field_text(record, cfg.prompt_field, where), field_text(record, cfg.response_field, where)


def chat_end_of_turn(tokenizer) -> int | None:
    """The special token a chat template closes an assistant turn with (Qwen's <|im_end|>, Llama
    3's <|eot_id|>): the first special token it renders after the turn's content. None without
    a chat template, or where the template puts no special token there."""
    if getattr(tokenizer, "chat_template", None) is None:
        return None
    probe = "amid-end-of-turn-probe"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": probe}],
                                             tokenize=False)
    except Exception:  # a template that needs more than a user and an assistant turn
        return None
    if probe not in text:
        return None
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    after = tokenizer(text[text.rfind(probe) + len(probe):], add_special_tokens=False)["input_ids"]
    return next((t for t in after if t in special), None)


# MiniLLM's processed Dolly (and data made like it) ends every response in this text, GPT-2's EOS:
# with any tokenizer it marks the end of the text, which the example's own closing token replaces.
END_OF_TEXT = "<|endoftext|>"


def closing_texts(tokenizer, template: str, cfg: TemplateConfig) -> tuple[str, ...]:
    """Texts of the tokens that close an example (EOS; with a chat template its end of turn too)
    and END_OF_TEXT: a record that ends in one of them literally would otherwise be closed twice
    (or, where END_OF_TEXT is no token, end in a dozen tokens spelling it)."""
    texts = []
    if cfg.add_eos or template == "chat":
        texts += [getattr(tokenizer, "eos_token", None) or "", END_OF_TEXT]
    if template == "chat" and (turn_end := chat_end_of_turn(tokenizer)) is not None:
        texts.append(tokenizer.convert_ids_to_tokens(turn_end))
    return tuple(dict.fromkeys(t for t in texts if t))


def _encode(tokenizer, record: dict[str, Any], template: str, cfg: TemplateConfig, where: str,
            closing: tuple[str, ...] = (), end_of_turn: int | None = None) -> list[Encoded]:
    """The record's examples: input_ids and the [start, end) spans of its target tokens (one
    span, or one per assistant turn of a conversation). Usually one; none for a record with
    nothing to learn (empty text, or an instruction record with an empty response: its only target
    would be the closing EOS); one per assistant turn for a conversation whose template rewrites
    earlier turns (`_conversation`). A target that ends in one of the `closing` texts loses it:
    the template closes the example with that token itself. A chat answer's targets end at
    `end_of_turn` (`chat_end_of_turn`, found once for all the records)."""
    if template == "chat":
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError("template 'chat' needs a tokenizer with a chat template; this one has none")
        if cfg.messages_field in record:
            messages = record_messages(record, cfg.messages_field, where, closing)
        else:
            prompt, target = _split(record, template, cfg, where)
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _unclosed(target, closing)}]
        turns = _answers(messages)
        if cfg.chat_turns == "last":  # the earlier answers are context: one example, whatever the template
            turns = turns[-1:]
            messages = messages[: turns[0] + 1] if turns else messages
        if not turns:
            return []
        return _ended_at_end_of_turn(_conversation(tokenizer, messages, turns, cfg, where), end_of_turn)
    prompt, target = _split(record, template, cfg, where)
    target = _unclosed(target, closing)
    if not target.strip():
        return []
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    # The response as generation continues the prompt: the whole text's tokens after the prompt's,
    # where the prompt tokenizes alone to a prefix of them (a SentencePiece tokenizer gives a
    # separately tokenized response a leading "▁" the whole text lacks). Where a token spans the
    # boundary (a prompt that ends in a space), the prompt's tokens are what generation starts
    # from, and the response is tokenized on its own.
    whole = tokenizer(prompt + target, add_special_tokens=False)["input_ids"] if prompt else []
    if prompt_ids and whole[: len(prompt_ids)] == prompt_ids and len(whole) > len(prompt_ids):
        target_ids = whole[len(prompt_ids):]
    else:
        target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and _wants_bos(tokenizer) else []
    eos = [tokenizer.eos_token_id] if cfg.add_eos and tokenizer.eos_token_id is not None else []
    ids = bos + prompt_ids + target_ids + eos
    return [Encoded(ids, [(len(bos) + len(prompt_ids), len(ids))])]


def _unclosed(text: str, closing: tuple[str, ...]) -> str:
    """`text` without a trailing literal closing token (the template adds that token itself)."""
    for end in closing:
        if text.rstrip().endswith(end):
            return text.rstrip()[: -len(end)]
    return text


def record_messages(record: dict[str, Any], field: str, where: str,
                    closing: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """A record's conversation up to its last assistant turn (what follows has nothing to learn):
    each message as given (tool_calls, name, ... are kept for the template), assistant contents
    without a literal closing token; a tool-calling turn's null content (OpenAI's format) is ""."""
    value = record.get(field)
    if isinstance(value, list):
        value = [dict(m, content="") if isinstance(m, dict) and m.get("content") is None and m.get("tool_calls")
                 else m for m in value]
    if not isinstance(value, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value):
        raise DataError(f"{where}: field {field!r} must be a list of messages, each {{\"role\": ..., \"content\": "
                        f"\"text\"}}")
    messages = [dict(m, content=_unclosed(m["content"], closing)) if m["role"] == "assistant" else dict(m)
                for m in value]
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()
    return messages


def _answers(messages: list[dict[str, Any]]) -> list[int]:
    """Indices of the assistant turns that are targets: those after some context, with text or
    tool calls (an empty turn, or an opening one that nothing prompted, is context)."""
    return [i for i, m in enumerate(messages)
            if m["role"] == "assistant" and i > 0 and (m["content"].strip() or m.get("tool_calls"))]


def _ended_at_end_of_turn(examples: list[Encoded], end: int | None) -> list[Encoded]:
    """Each target span cut after its last end-of-turn token: what a template renders after it
    (ChatML's "\n") is the template's separator, never generated (generation stops at the end of
    turn), and belongs to the context of what follows."""
    if end is None:
        return examples
    out = []
    for ex in examples:
        spans = []
        for a, b in ex.spans:
            last = next((i for i in range(b - 1, a - 1, -1) if ex.ids[i] == end), None)
            spans.append((a, b if last is None else last + 1))
        out.append(ex._replace(spans=spans))
    return out


def _conversation(tokenizer, messages: list[dict[str, Any]], turns: list[int], cfg: TemplateConfig,
                  where: str) -> list[Encoded]:
    """input_ids of a conversation through the chat template, and the [start, end) token spans of
    its target assistant turns (`turns`, indices into `messages`: each turn as the template
    renders it, its end of turn included), as a list of one example. The template renders the
    whole conversation, and each turn's context (with the generation prompt) and the conversation
    up to the turn; the conversation is tokenized once and cut where those texts end
    (`_token_cuts`), or, where a cut falls inside a token, every text is tokenized and compared.

    A template that renders earlier turns differently once more follow (Qwen3's drops their
    <think> blocks) leaves no one sequence that holds every turn as it was generated: such a
    conversation becomes one example per turn, the conversation up to that turn."""
    extra = cfg.chat_template_kwargs or {}
    text = _chat(tokenizer, messages, where, tokenize=False, **extra)
    starts = [_chat(tokenizer, messages[:i], where, add_generation_prompt=True, tokenize=False, **extra) for i in turns]
    ends = [_chat(tokenizer, messages[: i + 1], where, tokenize=False, **extra) for i in turns]
    if all(text.startswith(t) for t in (*starts, *ends)):
        cut = _token_cuts(tokenizer, text, [len(t) for t in (*starts, *ends)])
        if cut is not None:
            full, at = cut
            return [Encoded(full, list(zip(at[: len(turns)], at[len(turns):])))]
    full, *rest = tokenizer([text, *starts, *ends], add_special_tokens=False)["input_ids"]
    before, upto = rest[: len(turns)], rest[len(turns):]
    if all(full[: len(b)] == b and full[: len(u)] == u for b, u in zip(before, upto)):
        return [Encoded(full, [(len(b), len(u)) for b, u in zip(before, upto)])]
    # The tokens of a context are not a prefix of the conversation's: a turn that starts with a
    # newline merges with the template's own ("\n" + "\n" -> "\n\n"), or the template renders an
    # earlier turn differently once more follow. Splice at the text level: the rendered text cut
    # where each assistant turn starts and ends, each piece tokenized alone, so no turn's first
    # token swallows its context's last (generation starts after the context's own tokens) and
    # every turn keeps the template's end of turn. (A context after such a splice differs by that
    # token from the context tokenized whole, as generation would see it: one sequence cannot
    # hold both.)
    cuts = [(len(a), len(b)) if text.startswith(a) and text.startswith(b) else None for a, b in zip(starts, ends)]
    if all(cuts) and all(start < end for start, end in cuts) and all(
            end <= start for (_, end), (start, _) in zip(cuts, cuts[1:])):
        pieces = []
        last = 0
        for start, end in cuts:
            pieces += [text[last:start], text[start:end]]
            last = end
        tokens = tokenizer(pieces, add_special_tokens=False)["input_ids"]
        ids: list[int] = []
        spans = []
        for context, turn in zip(tokens[0::2], tokens[1::2]):
            ids += context
            spans.append((len(ids), len(ids) + len(turn)))
            ids += turn
        return [Encoded(ids, spans)]
    if len(turns) == 1:
        # One answer after a context that the template renders otherwise once the answer follows (a
        # prompt rewritten; reasoning in a turn whose generation prompt opens with an empty <think>,
        # as Qwen3's does with enable_thinking false): the answer as written after the context as
        # generation sees it, closed by the template's end of turn (EOS where it has none).
        end = chat_end_of_turn(tokenizer)
        close = ([end] if end is not None else
                 [tokenizer.eos_token_id] if cfg.add_eos and tokenizer.eos_token_id is not None else [])
        target = tokenizer(messages[turns[0]]["content"], add_special_tokens=False)["input_ids"] + close
        return [Encoded(before[0] + target, [(len(before[0]), len(before[0]) + len(target))], loose=True)]
    return [example for i in turns for example in _conversation(tokenizer, messages[: i + 1], [i], cfg, where)]


def _token_cuts(tokenizer, text: str, cuts: list[int]) -> tuple[list[int], list[int]] | None:
    """input_ids of `text` and, for each character position in `cuts`, the number of its tokens
    before it, where text[:cut] tokenizes alone to exactly those tokens; None if some cut does
    not (or the tokenizer gives no offsets): the caller then tokenizes every prefix itself.

    One tokenization of the text, not one per prefix (a conversation of T turns has 2T of them,
    the cost growing with T²): a cut must fall between two tokens, and since a tokenizer splits
    its input at added tokens (<|im_start|>, ...) before anything else, text[:cut] tokenizes as
    the text does up to the last added token before the cut, then as the piece after it alone;
    that piece is tokenized and compared."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    ends = [end for _, end in offsets]
    if any(b < a for a, b in zip(ends, ends[1:])):
        return None
    added = set(tokenizer.added_tokens_decoder)
    last_added, last = [], -1  # last_added[n]: the last added token among ids[:n] (-1: none)
    for i, token in enumerate(ids):
        last_added.append(last)
        last = i if token in added else last
    last_added.append(last)
    counts, pieces, expected = [], [], []
    for cut in cuts:
        n = bisect.bisect_right(ends, cut)  # the tokens that end by the cut
        if n < len(offsets) and offsets[n][0] < cut:
            return None  # a token spans the cut
        last = last_added[n]
        counts.append(n)
        pieces.append(text[(offsets[last][1] if last >= 0 else 0):cut])
        expected.append(ids[last + 1:n])
    alone = tokenizer(pieces, add_special_tokens=False)["input_ids"] if pieces else []
    if any(list(a) != e for a, e in zip(alone, expected)):
        return None
    return ids, counts


def _chat(tokenizer, messages: list[dict[str, str]], where: str, **kwargs):
    """The tokenizer's chat template applied; a template that raises (many refuse a conversation
    without a system turn, or check roles) is a DataError naming the record."""
    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except Exception as exc:  # jinja2's TemplateError, or whatever the template raises
        raise DataError(f"{where}: the tokenizer's chat template refused this conversation ({first_line(exc)}); "
                        f"use another --template, or a tokenizer whose template takes it") from None


def _as_ids(out) -> list[int]:
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def _wants_bos(tokenizer) -> bool:
    # Llama-style tokenizers add BOS themselves; GPT-2/Qwen2 do not. Follow the tokenizer.
    probe = tokenizer("a")["input_ids"]
    return bool(probe) and probe[0] == tokenizer.bos_token_id


def build_examples(
    records: Iterable[dict[str, Any]], tokenizer, cfg: TemplateConfig, source: str, context: int | None = None
) -> tuple[list[Example], BuildStats, str]:
    """Tokenize every record; returns (examples, stats, resolved template).

    Examples longer than cfg.max_length are refused (overflow="error", naming the file and line),
    truncated (keeping the prompt's start) or skipped. Records without any target (empty text or
    response, or a prompt that fills --max-length) are skipped and counted. `context`, the
    model's longest sequence if known, only shapes the hints of the errors.
    """
    if not isinstance(records, list):
        records = list(records)
    template, cfg = resolve_template(records, cfg, source)
    closing = closing_texts(tokenizer, template, cfg)
    end_of_turn = chat_end_of_turn(tokenizer) if template == "chat" else None
    stats = BuildStats(records=len(records))
    examples: list[Example] = []
    made = 0  # examples the records made, before --max-length: more than the records where conversations split
    for index, record in enumerate(records):
        encoded = _encode(tokenizer, record, template, cfg, where(records, index, source), closing, end_of_turn)
        if not encoded:
            stats.skipped_empty += 1
            stats.first_empty = stats.first_empty or where(records, index, source)
            continue
        made += len(encoded)
        if len(encoded) > 1:
            stats.split_conversations += 1
            stats.first_split = stats.first_split or where(records, index, source)
        for n, (ids, spans, loose) in enumerate(encoded):
            cut = False
            if len(ids) > cfg.max_length:
                if cfg.overflow == "error":
                    fix = (f"the model's context is {context}: pass --max-length {context} with --overflow truncate "
                           f"or --overflow skip" if context and context < len(ids) else
                           "raise --max-length or pass --overflow truncate / --overflow skip")
                    turn = f" (its assistant turn {n + 1})" if len(encoded) > 1 else ""
                    raise DataError(f"{where(records, index, source)}: the example{turn} has {len(ids)} tokens, more "
                                    f"than --max-length {cfg.max_length}; {fix}")
                if cfg.overflow == "skip":
                    stats.skipped_too_long += 1
                    continue
                ids = ids[: cfg.max_length]
                cut = True
            # Position t - 1 predicts token t: every target token after the first token of the sequence.
            positions = [t - 1 for start, end in spans for t in range(max(start, 1), min(end, len(ids)))]
            if not positions:
                stats.skipped_empty += 1
                stats.first_empty = stats.first_empty or where(records, index, source)
                stats.cut_by_length += cut  # its targets lay past --max-length
                continue
            stats.truncated += cut  # kept, cut short
            if loose:
                stats.loose_answers += 1
                stats.first_loose = stats.first_loose or where(records, index, source)
            examples.append(Example(example_id=index | n << TURN_SHIFT, input_ids=ids, positions=positions))
    stats.examples = len(examples)
    if not examples:
        if stats.skipped_too_long == made:
            raise DataError(f"{source}: every example is longer than --max-length {cfg.max_length}, and --overflow "
                            f"skip drops them; raise --max-length or pass --overflow truncate")
        if stats.skipped_empty and stats.cut_by_length == stats.skipped_empty:
            raise DataError(f"{source}: no example keeps a target token within --max-length {cfg.max_length} (the "
                            f"prompts fill it); raise --max-length")
        raise DataError(f"{source}: no example has a target token after templating; check the fields"
                        + (f" ({stats.cut_by_length} lost theirs to --max-length {cfg.max_length})"
                           if stats.cut_by_length else ""))
    return examples, stats, template


def cut_batches(items: list, lengths: list[int], batch_size: int | None, max_tokens: int | None) -> Iterator[list]:
    """Consecutive batches of length-sorted items, each closed when it holds `batch_size` items or
    when one more would exceed `max_tokens` padded tokens (either limit may be None; an item longer
    than `max_tokens` forms a batch of its own)."""
    batch: list = []
    longest = 0
    for item, n in zip(items, lengths):
        longest_if = max(longest, n)
        full = (batch_size is not None and len(batch) >= batch_size) or (
            max_tokens is not None and longest_if * (len(batch) + 1) > max_tokens
        )
        if batch and full:
            yield batch
            batch, longest_if = [], n
        batch.append(item)
        longest = longest_if
    if batch:
        yield batch


def iter_batches(examples: list[Example], max_tokens: int, max_batch: int) -> Iterator[list[Example]]:
    """Examples sorted by length, in batches of at most `max_batch` and `max_tokens` padded tokens."""
    order = sorted(examples, key=lambda e: len(e.input_ids))
    return cut_batches(order, [len(e.input_ids) for e in order], max_batch, max_tokens)


def lm_blocks(source: str, tokenizer, length: int, text_field: str = "text"):
    """Plain text as an [n, length] int32 array of token blocks, for a language-modelling loss.

    Each record's `text_field` is tokenized without special tokens and closed by EOS; everything
    is concatenated and cut into blocks of `length` tokens (the remainder is dropped), the way
    GPT-2-style pretraining data is packed. Raises DataError for a missing field or too little text.
    """
    import numpy as np

    records = load_records(source)
    if text_field not in records[0]:
        raise DataError(f"{source}: no field {text_field!r} (fields: {', '.join(sorted(records[0]))}); "
                        f"pass --lm-text-field")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    texts = [str(r.get(text_field) or "") for r in records]
    if eos and tokenizer.eos_token:  # a text that ends in the EOS text is closed once, as build_examples does
        texts = [_unclosed(t, (tokenizer.eos_token, END_OF_TEXT)) for t in texts]
    parts = []  # int32 arrays of 1,000 documents each: no Python list of every token
    for start in range(0, len(texts), 1000):
        seqs = tokenizer(texts[start: start + 1000], add_special_tokens=False)["input_ids"]
        parts.append(np.fromiter((t for seq in seqs for t in (*seq, *eos)), dtype=np.int32))
    ids = np.concatenate(parts)
    n = len(ids) // length
    if n == 0:
        raise DataError(f"{source}: {len(ids)} tokens, fewer than one block of --lm-length {length}")
    return ids[: n * length].reshape(n, length)
