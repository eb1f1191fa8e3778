"""Reading a compiled program's HLO text (`compiled.as_text()`): which Pallas kernels it
runs, and which arrays it materialises outside fusions (a copy that costs HBM traffic and
memory, as opposed to an operand a fusion reads in place)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

# Instructions that name a buffer without writing one.
_NOT_WRITTEN = ("parameter", "get-tuple-element", "tuple", "bitcast", "constant")
_HLO_TYPES = {"bfloat16": "bf16", "float32": "f32", "float16": "f16", "int32": "s32",
              "bool": "pred"}


def pallas_kernels(hlo_text: str) -> tuple[str, ...]:
    """The Pallas kernels of a compiled program, by name: a TPU program's Mosaic
    `tpu_custom_call`s (named by their instruction), a GPU program's Mosaic GPU calls (named
    by the innermost jitted function that called them, from their metadata)."""
    tpu = re.findall(r"%([\w-]+?)(?:\.\d+)? = [^\n]*custom_call_target=\"tpu_custom_call\"",
                     hlo_text)
    gpu = [callers[-1] for callers in
           (re.findall(r"jit\((\w+)\)", line.split('op_name="', 1)[-1].split('"', 1)[0])
            for line in hlo_text.splitlines()
            if 'custom_call_target="mosaic_gpu' in line and 'op_name="' in line)
           if callers]
    return tuple(sorted(set(tpu) | set(gpu)))


def _computations(hlo_text: str) -> dict[str, list[str]]:
    """{computation name: its instruction lines}."""
    computations: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%([\w.\-]+) \(", line)
        if header:
            current = header.group(1)
            computations[current] = []
        elif line.startswith("}"):
            current = None
        elif current is not None:
            computations[current].append(line)
    return computations


def top_level_instructions(hlo_text: str) -> Iterator[str]:
    """Instruction lines of every computation that is not a fusion's body (the entry, loop
    bodies and conditions, branches): each writes its result to memory. An instruction in
    a fusion's body is computed on the fly by the fusion that holds it."""
    computations = _computations(hlo_text)
    fused = {callee for lines in computations.values() for line in lines if " fusion(" in line
             for callee in re.findall(r"calls=%([\w.\-]+)", line)}
    for name, lines in computations.items():
        if name not in fused:
            yield from lines


def materialized(hlo_text: str, arrays: Iterable[tuple[str, tuple[int, ...]]]
                 ) -> tuple[str, ...]:
    """The instructions outside fusions that write an array of one of `arrays` ((dtype
    name, shape) pairs, e.g. ("bfloat16", (1536, 8960))) to device memory, each as "name =
    type[shape] opcode". Parameters, tuple elements and bitcasts name a buffer without
    writing one, and a TPU's on-chip memory (memory space S(1), VMEM) is where every read
    goes on its way to the compute units: both are left out. Copies, fusions and everything
    else are counted."""
    wanted = {f"{_HLO_TYPES.get(dtype, dtype)}[{','.join(map(str, shape))}]"
              for dtype, shape in arrays}
    found = []
    for line in top_level_instructions(hlo_text):
        match = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\w+\[[\d,]*\])\{([^}]*)\}\S* ([\w\-]+)\(",
                         line)
        if (match and match.group(2) in wanted and match.group(4) not in _NOT_WRITTEN
                and "S(1)" not in match.group(3)):
            found.append(f"{match.group(1)} = {match.group(2)} {match.group(4)}")
    return tuple(found)


__all__ = ["materialized", "pallas_kernels", "top_level_instructions"]
