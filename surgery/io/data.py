"""The one reader of `--data` files: calibration text (prune-bridge, transfer) and training/evaluation
records (train, tune-bridge, eval) all come through here, so no two commands see a file differently.

File format, decided by the name:
  *.jsonl / *.json   one JSON object per line (blank lines skipped);
  anything else      plain text, one document per line.
The rule for plain text: a line is the document with its line ending ("\n" or "\r\n") removed and
nothing else: leading and inner whitespace are part of the text (they become tokens). Lines that hold
only whitespace are skipped. JSON strings are used exactly as written.

Record kinds (one per JSON line; RECORD_KINDS is the one place to add a kind):
  text        {"text": str}                       the whole text is the document;
  completion  {"prompt": str, "completion": str}  the document is prompt + completion; training
                                                  scores only the completion;
  chat        {"messages": [{"role", "content"}, ...]}  rendered with the tokenizer's chat template;
                                                  training scores the last message, which must be
                                                  the assistant's (the earlier turns are its prompt);
  alpaca      {"instruction": str, "input": str (optional), "output": str}  Stanford Alpaca's
                                                  prompt template around instruction and input;
                                                  training scores the output.
A plain-text line is a `text` record. Every failure — not UTF-8, not JSON, not an object, no known
kind, a field that is not a string — is a DataError naming the file and line.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass

from ..errors import DataError

JSON_SUFFIXES = (".jsonl", ".json")
HELP = ("write one document per line, or JSON lines in a .jsonl file: {\"text\": ...}, {\"prompt\": ..., \"completion\": ...}, "
        "{\"messages\": [{\"role\": ..., \"content\": ...}, ...]} or {\"instruction\": ..., \"input\": ..., \"output\": ...}")


@dataclass(frozen=True)
class RecordKind:
    """How one kind of JSON record is recognised and turned into text.

    keys: the fields that identify the kind (all present); each must be a string.
    document(fields, tokenizer, where): the whole text a language model reads (calibration, `text` training).
    pair(fields, tokenizer, where): (prompt, completion) for kinds that score only the completion, else None.
    The tokenizer is there for kinds rendered by a chat template; `where` ("path:line") for their errors."""

    name: str
    keys: tuple[str, ...]
    document: object
    pair: object = None
    check: object = None  # check(obj, where) for fields that are not plain strings (default: all strings)


def _check_messages(obj: dict, where: str) -> None:
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: \"messages\" is a {_type(msgs)}, not a non-empty array of messages", HELP)
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} is not an object with string \"role\" and \"content\"", HELP)


def _chat_template(tok, where: str):
    if tok is None or not getattr(tok, "chat_template", None):
        raise DataError(f"{where}: a chat record is rendered with the tokenizer's chat template, and "
                        f"{'no tokenizer was given' if tok is None else 'this tokenizer has none'}",
                        "use a chat model (tokenizer_config.json or chat_template.jinja with a template), "
                        "or write prompt/completion records")
    return tok


def _no_bos(tok, text: str) -> str:
    # Templates often start with the BOS token as text, and the tokenizer adds BOS itself when it
    # encodes with special tokens: keep one (the tokenizer's).
    bos = getattr(tok, "bos_token", None)
    if bos and text.startswith(bos) and tok("x", add_special_tokens=True)["input_ids"][:1] == [tok.bos_token_id]:
        return text[len(bos):]
    return text


def _chat_document(r: dict, tok, where: str) -> str:
    tok = _chat_template(tok, where)
    return _no_bos(tok, tok.apply_chat_template(r["messages"], tokenize=False))


def _chat_pair(r: dict, tok, where: str) -> tuple[str, str]:
    """(the conversation up to the assistant's last turn, with the generation prompt; that turn)."""
    tok = _chat_template(tok, where)
    msgs = r["messages"]
    if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
        raise DataError(f"{where}: the last message is {msgs[-1]['role']!r}'s, so there is no answer to score",
                        "end each conversation with the assistant's answer")
    prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(msgs, tokenize=False)
    if not full.startswith(prompt):
        raise DataError(f"{where}: the chat template does not render the conversation as its prompt followed by "
                        "the answer", "write prompt/completion records rendered as you want them")
    return _no_bos(tok, prompt), full[len(prompt):]


# Stanford Alpaca's prompt (github.com/tatsu-lab/stanford_alpaca, train.py PROMPT_DICT)
ALPACA = ("Below is an instruction that describes a task{}. Write a response that appropriately completes the request."
          "\n\n### Instruction:\n{}\n\n{}### Response:\n")


def _alpaca_prompt(r: dict) -> str:
    extra = r.get("input") or ""
    return ALPACA.format(", paired with an input that provides further context" if extra else "", r["instruction"],
                         f"### Input:\n{extra}\n\n" if extra else "")


def _check_alpaca(obj: dict, where: str) -> None:
    for k in ("instruction", "input", "output"):
        if k in obj and not isinstance(obj[k], str):
            raise DataError(f"{where}: \"{k}\" is a {_type(obj[k])}, not a string", HELP)


RECORD_KINDS = [  # order matters: the first kind whose keys are all present wins
    RecordKind("completion", ("prompt", "completion"),
               document=lambda r, tok, where: r["prompt"] + r["completion"],
               pair=lambda r, tok, where: (r["prompt"], r["completion"])),
    RecordKind("chat", ("messages",), document=_chat_document, pair=_chat_pair, check=_check_messages),
    RecordKind("alpaca", ("instruction", "output"), check=_check_alpaca,
               document=lambda r, tok, where: _alpaca_prompt(r) + r["output"],
               pair=lambda r, tok, where: (_alpaca_prompt(r), r["output"])),
    RecordKind("text", ("text",), document=lambda r, tok, where: r["text"]),
]


@dataclass(frozen=True)
class Record:
    where: str  # "path:line", for messages
    kind: RecordKind
    fields: dict

    def document(self, tokenizer=None) -> str:
        return self.kind.document(self.fields, tokenizer, self.where)

    def pair(self, tokenizer=None) -> tuple[str, str] | None:
        return self.kind.pair(self.fields, tokenizer, self.where) if self.kind.pair else None


TEXT = RECORD_KINDS[-1]


def make_record(obj: dict, where: str = "data") -> Record:
    """A Record for a JSON object, its kind recognised (DataError naming `where` if none fits)."""
    return Record(where, _kind_of(obj, where), obj)


def _kind_of(obj: dict, where: str) -> RecordKind:
    for kind in RECORD_KINDS:
        if all(k in obj for k in kind.keys):
            if kind.check is not None:
                kind.check(obj, where)
                return kind
            for k in kind.keys:
                if not isinstance(obj[k], str):
                    raise DataError(f"{where}: \"{k}\" is a {_type(obj[k])}, not a string", HELP)
            return kind
    raise DataError(f"{where}: a JSON object with none of the known record fields (keys: {sorted(obj)[:8]})", HELP)


def _type(v) -> str:
    return {dict: "object", list: "array", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(v), type(v).__name__)


def check_data_file(path: str) -> None:
    """DataError unless `path` is a regular file we can read (a FIFO would hang the reader)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"data file {path} does not exist", HELP) from None
    except OSError as e:
        raise DataError(f"cannot read data file {path} ({e.strerror})", "check the path and its permissions") from None
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"data file {path} is not a regular file", HELP)


def iter_records(path: str):
    """Yield a Record for each non-blank line of a data file, in file order."""
    check_data_file(path)
    is_json = path.lower().endswith(JSON_SUFFIXES)
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 text (byte {e.start} of the line)", "convert the file to UTF-8") from None
            line = line[:-2] if line.endswith("\r\n") else line[:-1] if line.endswith("\n") else line
            if not line.strip():
                continue
            if not is_json:
                yield Record(where, TEXT, {"text": line})
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise DataError(f"{where}: not valid JSON ({getattr(e, 'msg', 'parse error')}, column "
                                f"{getattr(e, 'colno', '?')})", "write one JSON object per line") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: a JSON {_type(obj)}, not an object", "write one JSON object per line")
            yield make_record(obj, where)


def read_records(path: str) -> list[Record]:
    """All records of a training/evaluation file; one kind per file (scoring differs by kind)."""
    records = list(iter_records(path))
    if not records:
        raise DataError(f"data file {path} has no records", HELP)
    first = records[0].kind
    for r in records:
        if r.kind is not first:
            raise DataError(f"{r.where} is a {r.kind.name} record but earlier lines are {first.name} records",
                            "keep one record kind per file")
    return records


def documents(path: str, limit: int | None = None, tokenizer=None) -> list[str]:
    """The calibration documents of a data file (prune-bridge and transfer): each record's whole text,
    in file order, the first `limit` of them; records whose text is only whitespace are skipped."""
    docs = []
    for r in iter_records(path):
        if limit is not None and len(docs) >= limit:
            break
        d = r.document(tokenizer)
        if d.strip():
            docs.append(d)
    if not docs:
        raise DataError(f"data file {path} has no text", "put at least one non-empty document in it")
    return docs
