"""Input rows to one internal record, or to a reject with a reason code.

Pure functions, no Beam: every rule here is testable on plain dicts.

Row forms (``form: auto`` picks by the fields present, in this order):
- ``messages``: ``[{role, content}, ...]`` (OpenAI / TRL chat form);
- ``sharegpt``: ``conversations: [{from, value}, ...]``, or a plain list of strings that
  alternate user and assistant, starting with the user (as LIMA ships);
- ``alpaca``: ``instruction``, optional ``input``, ``output``.

Multi-turn rule: the response is the content of the *last assistant turn*; the
prompt is every turn before it. Turns after the last assistant turn (a user
question left unanswered) are not part of prompt or response; they stay in
``original``. The prompt text is the single user message's content when the
prompt is one user turn, else the turns rendered as ``"{Role}: {content}"``
joined by blank lines.

Alpaca rule: prompt = instruction, plus ``"\\n\\n" + input`` when input is not
blank.

Ids are unique in the whole job: ``<source>:<value>`` of the configured id column
(string or integer; sources often number their rows alike, so the source name is
part of the id; the bare value stays in ``original``), else a content hash:
blake2b-128 of the source name and the canonical JSON of the original row. Identical rows in one source therefore share an id; the
pipeline's id stage numbers them (``<hash>#2``, ...), and rejects repeats of a
user-given id whose content differs (reason ``duplicate_id``).
"""
from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import unicodedata
from dataclasses import dataclass, field
from typing import Any

# Reason codes for rows that go to rejects/. Stable strings: users filter on them.
REJECT_REASONS = {
    "malformed_json": "the line or record is not valid JSON",
    "undecodable_bytes": "the line or a text field is not valid UTF-8",
    "not_an_object": "the row is valid JSON but not an object",
    "unknown_form": "no instruction/output, messages or conversations fields found",
    "missing_field": "a required field is absent or null",
    "wrong_type": "a field has the wrong type (e.g. a number where text is expected)",
    "bad_messages": "a messages/conversations list is malformed or has an unknown role",
    "no_response": "the conversation has no assistant turn",
    "empty_response": "the response is empty or only white space",
    "empty_prompt": "the prompt is empty or only white space",
    "too_long": "prompt + response exceed validate.max_chars characters",
    "missing_id": "the configured id field is absent, null or empty",
    "duplicate_id": "another row of the same source has this id with different content",
}

FORMS = ("auto", "alpaca", "messages", "sharegpt")

_SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
    "bard": "assistant", "bing": "assistant", "model": "assistant",
    "system": "system",
}
_CHAT_ROLES = {"user", "assistant", "system", "tool"}


@dataclass(frozen=True)
class FieldMap:
    """Column names of one source; every one can be remapped in the job file."""

    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    messages: str = "messages"
    conversations: str = "conversations"
    role: str = "role"
    content: str = "content"
    speaker: str = "from"
    text: str = "value"


@dataclass(frozen=True)
class RowSpec:
    """How to read rows of one source."""

    source: str
    form: str = "auto"
    fields: FieldMap = field(default_factory=FieldMap)
    id_field: str | None = None
    max_chars: int = 100_000


class RowError(Exception):
    """A row that cannot become a record; carries the reject reason code."""

    def __init__(self, reason: str, detail: str):
        assert reason in REJECT_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (_dt.date, _dt.datetime, _dt.time)):
        return value.isoformat()
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    return str(value)


_CANONICAL = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=_json_default)


def canonical_json(row: Any) -> str:
    """JSON text of a row with sorted keys: the same row always gives the same text (one
    encoder for all rows: ``json.dumps`` with options builds a new one per call)."""
    return _CANONICAL.encode(row)


def content_id(source: str, canonical: str) -> str:
    return hashlib.blake2b(source.encode("utf-8") + b"\x00" + canonical.encode("utf-8", "surrogatepass"),
                           digest_size=16).hexdigest()


def normalize_text(text: str) -> str:
    """Unicode NFKC, case-folded, white space collapsed to single spaces, trimmed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _text(row: dict, name: str, *, required: bool) -> str | None:
    value = row.get(name)
    if value is None:
        if required:
            raise RowError("missing_field", f"field {name!r} is missing")
        return None
    if not isinstance(value, str):
        raise RowError("wrong_type", f"field {name!r} is {type(value).__name__}, expected text")
    if _has_surrogates(value):
        raise RowError("undecodable_bytes", f"field {name!r} holds bytes that are not UTF-8")
    return value


def detect_form(row: dict, fields: FieldMap) -> str:
    if fields.messages in row:
        return "messages"
    if fields.conversations in row:
        return "sharegpt"
    if fields.output in row or fields.instruction in row:
        return "alpaca"
    raise RowError("unknown_form", f"none of the fields {fields.instruction!r}/"
                   f"{fields.output!r}, {fields.messages!r} or {fields.conversations!r} found; "
                   f"fields present: {sorted(row)[:8]}")


def _turns(row: dict, list_field: str, role_key: str, text_key: str, roles: dict | set) -> list[dict]:
    turns = row.get(list_field)
    if turns is None:
        raise RowError("missing_field", f"field {list_field!r} is missing")
    if hasattr(turns, "tolist") and not isinstance(turns, list):
        turns = turns.tolist()
    if not isinstance(turns, list) or not turns:
        raise RowError("bad_messages", f"field {list_field!r} must be a non-empty list of turns")
    if all(isinstance(t, str) for t in turns):  # LIMA's form: plain strings, user and assistant in turn
        turns = [{role_key: "user" if i % 2 == 0 else "assistant", text_key: t} for i, t in enumerate(turns)]
        roles = {"user": "user", "assistant": "assistant"}
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowError("bad_messages", f"{list_field}[{i}] is {type(turn).__name__}, expected an object")
        role, content = turn.get(role_key), turn.get(text_key)
        if not isinstance(role, str):
            raise RowError("bad_messages", f"{list_field}[{i}].{role_key} is missing or not text")
        norm_role = roles.get(role.lower()) if isinstance(roles, dict) else (
            role.lower() if role.lower() in roles else None)
        if norm_role is None:
            raise RowError("bad_messages", f"{list_field}[{i}] has unknown role {role!r}")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise RowError("wrong_type", f"{list_field}[{i}].{text_key} is {type(content).__name__}, expected text")
        if _has_surrogates(content):
            raise RowError("undecodable_bytes", f"{list_field}[{i}].{text_key} holds bytes that are not UTF-8")
        out.append({"role": norm_role, "content": content})
    return out


def render_prompt(turns: list[dict]) -> str:
    """Prompt text of the turns before the response (see the module docstring)."""
    if len(turns) == 1 and turns[0]["role"] == "user":
        return turns[0]["content"]
    return "\n\n".join(f"{t['role'].capitalize()}: {t['content']}" for t in turns)


def _split_conversation(turns: list[dict]) -> tuple[list[dict], str]:
    last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=None)
    if last is None:
        raise RowError("no_response", "the conversation has no assistant turn")
    return turns[:last], turns[last]["content"]


def _row_id(row: dict, spec: RowSpec, canonical: str) -> str:
    if spec.id_field is None:
        return content_id(spec.source, canonical)
    value = row.get(spec.id_field)
    if value is None or value == "":
        raise RowError("missing_id", f"id field {spec.id_field!r} is missing or empty")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RowError("wrong_type", f"id field {spec.id_field!r} is {type(value).__name__}, expected text or integer")
    return f"{spec.source}:{value}"


def to_record(row: Any, spec: RowSpec) -> dict:
    """One raw row to an internal record; raises RowError with the reject reason.

    Record keys: id, source, prompt, response, messages (prompt turns plus the
    response as a final assistant turn), original (canonical JSON of the row).
    """
    if not isinstance(row, dict):
        raise RowError("not_an_object", f"row is {type(row).__name__}, expected a JSON object")
    fields = spec.fields
    form = detect_form(row, fields) if spec.form == "auto" else spec.form
    if form == "alpaca":
        instruction = _text(row, fields.instruction, required=True)
        extra = _text(row, fields.input, required=False) or ""
        response = _text(row, fields.output, required=True)
        prompt = instruction + ("\n\n" + extra if extra.strip() else "")
        prompt_turns = [{"role": "user", "content": prompt}]
        parts = (instruction, extra if extra.strip() else "")
    else:
        if form == "messages":
            turns = _turns(row, fields.messages, fields.role, fields.content, _CHAT_ROLES)
        else:
            turns = _turns(row, fields.conversations, fields.speaker, fields.text, _SHAREGPT_ROLES)
        prompt_turns, response = _split_conversation(turns)
        prompt = render_prompt(prompt_turns)
        parts = (prompt, "")
    if not response.strip():
        raise RowError("empty_response", "the response is empty")
    if not prompt.strip():
        raise RowError("empty_prompt", "the prompt is empty")
    size = len(prompt) + len(response)
    if size > spec.max_chars:
        raise RowError("too_long", f"{size} characters > max_chars {spec.max_chars}")
    canonical = canonical_json(row)
    return {
        "id": _row_id(row, spec, canonical),
        "source": spec.source,
        "prompt": prompt,
        "response": response,
        "messages": prompt_turns + [{"role": "assistant", "content": response}],
        "original": canonical,
        "_instruction": parts[0],  # for scoring templates that place instruction and input apart
        "_input": parts[1],
    }


def make_reject(source: str, file: str, row_number: int, reason: str, detail: str, raw: str) -> dict:
    return {"source": source, "file": file, "row_number": row_number,
            "reason": reason, "detail": detail, "raw": raw}


def convert(row: Any, spec: RowSpec, file: str, row_number: int) -> tuple[str, dict]:
    """("record", record) or ("reject", reject row): never raises on bad rows."""
    try:
        return "record", to_record(row, spec)
    except RowError as err:
        raw = row if isinstance(row, str) else canonical_json(row)
        raw = raw.encode("utf-8", "backslashreplace").decode("utf-8")
        return "reject", make_reject(spec.source, file, row_number, err.reason, err.detail, raw)
