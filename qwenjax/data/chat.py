"""Chat data: Qwen2.5's ChatML template, validated JSONL conversations, and token ids with an assistant-only
loss mask.

A conversation is one JSONL line `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`.
`render` writes it as Qwen2.5-Instruct's chat template does (`QWEN2_5_CHAT_TEMPLATE`, the Jinja string of its
tokenizer_config.json, kept here so nothing is downloaded; tests/test_chat.py renders both and compares the
text and the token ids). Tool calls and the `tool` role are not supported (a UserError names the line).

The loss mask (`encode_chat`): a token is trained on when it starts inside an assistant message's content or
is that message's closing `<|im_end|>`. The `<|im_start|>assistant\\n` header, the newline after
`<|im_end|>`, system and user turns are context only. A token that merges the header's newline with the
content's leading whitespace starts in the header, so it is context too.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qwenjax.data.tokenizer import Tokenizer
from qwenjax.errors import UserError

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
ROLES = ("system", "user", "assistant")

#: Qwen2.5-Instruct's `chat_template` (tokenizer_config.json), verbatim. qwenjax renders with `render`, not
#: with Jinja; the string is here for the parity test and for exporting a tokenizer config.
QWEN2_5_CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)


def prompt_messages(prompt: Any, where: str) -> list[dict[str, str]]:
    """A record's `prompt` as messages: a non-empty string is one user turn, else a checked messages list."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise UserError(f"{where}: \"prompt\" is empty")
        return [{"role": "user", "content": prompt}]
    return check_messages(prompt, where)


def check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """`messages` as a list of {"role", "content"} dicts, or a UserError naming `where` (file:line)."""
    if not isinstance(messages, list):
        raise UserError(f"{where}: \"messages\" must be a list of {{\"role\", \"content\"}} objects")
    if not messages:
        raise UserError(f"{where}: \"messages\" is empty")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise UserError(f"{where}: message {i} is not an object with \"role\" and \"content\"")
        for key in ("role", "content"):
            if key not in m:
                raise UserError(f"{where}: message {i} has no \"{key}\"")
        role, content = m["role"], m["content"]
        if m.get("tool_calls") or role == "tool":
            raise UserError(f"{where}: message {i}: tool calls and the tool role are not supported")
        if role not in ROLES:
            raise UserError(f"{where}: message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise UserError(f"{where}: message {i} ({role}) has content of type {type(content).__name__}, "
                            "expected a string")
        out.append({"role": role, "content": content})
    return out


def render(messages: Sequence[dict[str, str]], add_generation_prompt: bool = False
           ) -> tuple[str, list[tuple[int, int]]]:
    """(the ChatML text, the [start, end) character spans trained on: each assistant content + <|im_end|>).

    Exactly Qwen2.5's template without tools: a default system turn when the first message is not one."""
    messages = check_messages(list(messages), "messages")
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    n = 0

    def add(text: str) -> None:
        nonlocal n
        parts.append(text)
        n += len(text)

    if messages[0]["role"] != "system":
        add(f"{IM_START}system\n{DEFAULT_SYSTEM}{IM_END}\n")
    for m in messages:
        add(f"{IM_START}{m['role']}\n")
        start = n
        add(m["content"] + IM_END)
        if m["role"] == "assistant":
            spans.append((start, n))
        add("\n")
    if add_generation_prompt:
        add(f"{IM_START}assistant\n")
    return "".join(parts), spans


def special_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """<|im_start|> and <|im_end|> as single ids, or a UserError (a tokenizer trained without them)."""
    out = {}
    for piece in (IM_START, IM_END):
        ids = tokenizer.encode(piece)
        if len(ids) != 1:
            raise UserError(f"tokenizer {tokenizer.path} does not encode {piece} as one token; chat data needs "
                            "a tokenizer with the ChatML control tokens (qwenjax's trained ones have them)")
        out[piece] = ids[0]
    return out


def encode_chat(tokenizer: Tokenizer, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False
                ) -> tuple[np.ndarray, np.ndarray]:
    """(token ids int32, loss mask uint8 per token: 1 = trained on, see the module doc) of one conversation.
    The ids equal `tokenizer.encode(render(messages)[0])`."""
    text, spans = render(messages, add_generation_prompt)
    ids, starts = tokenizer.encode_with_offsets(text)
    starts_T = np.asarray(starts, dtype=np.int64)
    mask_T = np.zeros(len(ids), dtype=np.uint8)
    for lo, hi in spans:
        mask_T |= ((starts_T >= lo) & (starts_T < hi)).astype(np.uint8)
    return np.asarray(ids, dtype=np.int32), mask_T


def heldout_hash(line: str) -> float:
    """Where a JSONL record falls in [0, 1): it is held out when this is below `data.heldout_fraction` (chat
    conversations and DPO pairs alike), so the split depends on the line alone, not on its place in the file."""
    return int.from_bytes(hashlib.sha256(line.encode("utf-8")).digest()[:8], "little") / 2.0**64


def jsonl_lines(files: Sequence[str | os.PathLike], kind: str) -> Iterator[tuple[str, str]]:
    """(`file:line`, the line) for every non-blank line of the files; an unreadable or non-UTF-8 file is one
    UserError naming it as a `kind` file (chat, pairs, prompts)."""
    for f in map(Path, files):
        try:
            fh = open(f, encoding="utf-8")
        except OSError as e:
            raise UserError(f"cannot read {kind} file {f}: {e.strerror or e}") from None
        with fh:
            try:
                for lineno, line in enumerate(fh, 1):
                    if line.strip():
                        yield f"{f}:{lineno}", line
            except UnicodeDecodeError:
                raise UserError(f"{kind} file {f} is not UTF-8 text") from None


def parse_record(line: str, where: str) -> Any:
    """One JSONL line's value, or a UserError naming `where` (file:line)."""
    try:
        return json.loads(line)
    except ValueError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg})") from None


def read_conversations(files: Sequence[str | os.PathLike]) -> Iterator[tuple[str, str, list[dict[str, str]]]]:
    """(`file:line`, the raw line, its validated messages) for every non-blank line of the JSONL files."""
    for where, line in jsonl_lines(files, "chat"):
        rec = parse_record(line, where)
        if not isinstance(rec, dict) or "messages" not in rec:
            raise UserError(f"{where}: expected an object with \"messages\" (chat data)")
        yield where, line.strip(), check_messages(rec["messages"], where)


def is_chat_file(path: str | os.PathLike) -> bool:
    """True for a .jsonl file whose first non-blank line is an object with "messages"."""
    p = Path(path)
    if p.suffix.lower() != ".jsonl":
        return False
    try:
        with open(p, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    rec = json.loads(line)
                    return isinstance(rec, dict) and "messages" in rec
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return False
