"""Collective traffic of a compiled step, read from its optimized HLO text.

Why parse text: XLA's cost analysis has no per-collective byte counts, and the step's collectives sit
inside while loops (scanned layers, gradient accumulation) whose bodies the cost analysis counts once.
Here each computation's collectives are summed and a while body is multiplied by its `known_trip_count`
(XLA writes it in the loop's backend_config), so the totals are per step.

Bytes of one collective: the larger of its operands' and its results' total size, i.e. the full buffer
on one device (the gathered result of an all-gather, the input of a reduce-scatter, the buffer of an
all-reduce). What crosses the links depends on the algorithm (a ring all-reduce moves about 2x this).
"""

from __future__ import annotations

import math
import re

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8e\w+)\[([\d,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_OP = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\((.*)$")
_WHILE = re.compile(r"\swhile\(.*?body=%?([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CALLS = re.compile(r"(?:to_apply|calls|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


def _shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        size = _BYTES.get(dtype, 1)  # float8 kinds: one byte
        total += size * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _operands(rest: str) -> str:
    """The operand list of an op line (up to the parenthesis that closes it)."""
    depth = 1
    for i, ch in enumerate(rest):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            return rest[:i]
    return rest


def _parse(hlo_text: str):
    """{computation: ({kind: bytes}, [(callee, multiplier)])} and the entry computation's name."""
    comps: dict[str, tuple[dict[str, int], list[tuple[str, int]]]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(1)
            comps[current] = ({}, [])
            if line.startswith("ENTRY"):
                entry = current
            continue
        if current is None or not line.strip() or line.startswith("}"):
            continue
        counts, calls = comps[current]
        op = _OP.match(line)
        if op:
            results, kind, _, rest = op.groups()
            size = max(_shape_bytes(results), _shape_bytes(_operands(rest)))
            if op.group(3):  # async start: the result tuple holds (operands, results); count the results half
                size = max(_shape_bytes(_operands(rest)), _shape_bytes(results) - _shape_bytes(_operands(rest)))
            counts[kind] = counts.get(kind, 0) + size
            continue
        loop = _WHILE.search(line)
        if loop:
            trip = _TRIP.search(line)
            calls.append((loop.group(1), int(trip.group(1)) if trip else 1))
            continue
        for callee in _CALLS.findall(line):
            calls.append((callee, 1))
        for group in _BRANCHES.findall(line):
            calls.extend((c.strip().lstrip("%"), 1) for c in group.split(",") if c.strip())
    return comps, entry


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes per step of each collective kind on one device (module docstring), plus "total" and
    "while_loops_without_trip_count" (loops counted once because XLA did not know their trip count)."""
    comps, entry = _parse(hlo_text)
    unknown = len(re.findall(r"\swhile\(", hlo_text)) - len(_TRIP.findall(hlo_text))
    memo: dict[str, dict[str, int]] = {}

    def total(name: str, seen: tuple[str, ...] = ()) -> dict[str, int]:
        if name in memo:
            return memo[name]
        counts, calls = comps.get(name, ({}, []))
        out = dict(counts)
        for callee, times in calls:
            if callee in seen or callee not in comps:
                continue
            for kind, b in total(callee, (*seen, name)).items():
                out[kind] = out.get(kind, 0) + times * b
        memo[name] = out
        return out

    result = total(entry) if entry else {}
    out = {kind: int(result.get(kind, 0)) for kind in COLLECTIVES}
    out["total"] = sum(out.values())
    out["while_loops_without_trip_count"] = max(unknown, 0)
    return out
