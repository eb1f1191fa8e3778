"""The targets `compile_for` knows: TPU slices libtpu can compile for without them, NVIDIA
GPU hosts the CUDA plugin can compile for without them (`targets.gpu`), and the published
per-chip figures their estimates divide by.

The figures (HBM, HBM bandwidth, bf16 peak) are the vendors' published numbers per chip; a
device is one chip, except TPU7x, whose chips show two devices each (its figures are split
between them). Every time or throughput derived from them is an estimate, not a measurement.
"""

from __future__ import annotations

import dataclasses

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip's published figures.

    Attributes:
      kind: its name. hbm_bytes: HBM per chip. hbm_gbps: HBM bandwidth, GB/s (1e9 bytes/s).
      bf16_tflops: peak bfloat16 matmul rate, TFLOP/s. devices_per_chip: the JAX devices it
        shows (2 for TPU7x).
    """

    kind: str
    hbm_bytes: int
    hbm_gbps: float
    bf16_tflops: float
    devices_per_chip: int = 1

    @property
    def device_hbm_bytes(self) -> int:
        return self.hbm_bytes // self.devices_per_chip

    @property
    def device_gbps(self) -> float:
        return self.hbm_gbps / self.devices_per_chip


CHIPS = {
    "v4": Chip("TPU v4", 32 * GIB, 1200.0, 275.0),
    "v5e": Chip("TPU v5e", 16 * GIB, 819.0, 197.0),
    "v5p": Chip("TPU v5p", 95 * GIB, 2765.0, 459.0),
    "v6e": Chip("TPU v6e", 32 * 10**9, 1640.0, 918.0),
    "tpu7x": Chip("TPU7x", 192 * GIB, 7380.0, 2307.0, devices_per_chip=2),
    "h100": Chip("H100 SXM", 80 * 10**9, 3350.0, 989.0),
    "h200": Chip("H200 SXM", 141 * 10**9, 4800.0, 989.0),
}


@dataclasses.dataclass(frozen=True)
class Target:
    """A named slice or GPU host: how its compiler is asked for its topology, and its chips.

    Attributes:
      name: what `compile_for` and `gkv-jax plan --target` call it.
      chip: a key of `CHIPS`.
      topology: `topology_name` of `jax.experimental.topologies.get_topology_desc` for a TPU
        ("v5e:2x4"); for a GPU host, slices x hosts x GPUs per host ("1x1x8").
      devices: the JAX devices the topology gives.
      options: further keyword arguments of `get_topology_desc`.
      platform: "tpu" (libtpu) or "gpu" (the CUDA plugin).
    """

    name: str
    chip: str
    topology: str
    devices: int
    options: tuple[tuple[str, object], ...] = ()
    platform: str = "tpu"
    chip_figures: Chip | None = None  # figures of a chip not in `CHIPS` (the attached one)

    @property
    def figures(self) -> Chip:
        return self.chip_figures if self.chip_figures is not None else CHIPS[self.chip]

    @property
    def attached(self) -> bool:
        """The devices this process drives (`ATTACHED`), not a topology libtpu describes."""
        return self.name == ATTACHED


ONE_CHIP = (("chips_per_host_bounds", (1, 1, 1)),)
TARGETS = {t.name: t for t in (
    Target("v4-8", "v4", "v4:2x2x1", 4, (("chip_config_name", "megacore"),)),
    Target("v5e-1", "v5e", "v5e:1x1", 1, ONE_CHIP),
    Target("v5e-4", "v5e", "v5e:2x2", 4),
    Target("v5e-8", "v5e", "v5e:2x4", 8),
    Target("v5p-8", "v5p", "v5:2x2x1", 4),
    Target("v6e-1", "v6e", "v6e:1x1", 1, ONE_CHIP),
    Target("v6e-4", "v6e", "v6e:2x2", 4),
    Target("v6e-8", "v6e", "v6e:2x4", 8),
    Target("tpu7x-8", "tpu7x", "tpu7x:2x2x1", 8),
    Target("h100-1", "h100", "1x1x1", 1, platform="gpu"),
    Target("h100-8", "h100", "1x1x8", 8, platform="gpu"),
    Target("h200-1", "h200", "1x1x1", 1, platform="gpu"),
    Target("h200-8", "h200", "1x1x8", 8, platform="gpu"),
)}


ATTACHED = "attached"

# `jax.Device.device_kind` -> `CHIPS` key; the first listed fragment found wins.
DEVICE_KINDS = (("TPU v5 lite", "v5e"), ("TPU v5e", "v5e"), ("TPU v5p", "v5p"),
                ("TPU v5", "v5p"), ("TPU v6", "v6e"), ("TPU v4", "v4"), ("TPU7x", "tpu7x"),
                ("H200", "h200"), ("H100", "h100"))


def chip_of(device_kind: str) -> str | None:
    """The `CHIPS` key of a device kind ("TPU v5 lite" -> "v5e", "NVIDIA H100 80GB HBM3"
    -> "h100"), or None for a chip without published figures here (a CPU)."""
    return next((chip for fragment, chip in DEVICE_KINDS if fragment in device_kind), None)


def attached_target() -> Target:
    """The devices this process drives, as a target: `compile_for("attached", ...)`
    compiles for them with their own compiler (what the device check compares its
    measurements with). Figures come from `CHIPS` when the device kind is known; otherwise
    the device's reported memory limit (if any) and no bandwidth (no roofline estimate)."""
    import jax

    devices = jax.devices()
    kind = devices[0].device_kind
    chip = chip_of(kind)
    figures = None
    if chip is None:
        stats = devices[0].memory_stats() or {}
        figures = Chip(kind=kind, hbm_bytes=int(stats.get("bytes_limit", 0)), hbm_gbps=0.0,
                       bf16_tflops=0.0)
    return Target(ATTACHED, chip or kind, "", len(devices), platform=devices[0].platform,
                  chip_figures=figures)


def get_target(name: str) -> Target:
    """The `Target` called `name` ("attached": `attached_target()`); ValueError listing the
    known ones otherwise."""
    if name == ATTACHED:
        return attached_target()
    try:
        return TARGETS[name]
    except (KeyError, TypeError):
        raise ValueError(f"target must be one of {', '.join(TARGETS)} or {ATTACHED!r}, "
                         f"got {name!r}") from None
