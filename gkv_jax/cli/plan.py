"""`gkv-jax plan`: will it fit? A program compiled for a TPU slice (or an NVIDIA GPU host)
that is not attached.

    gkv-jax plan --target v5e-8 --model deepseek-r1-distill-qwen-7b --batch 64 \\
        --budget 2048 --max-new-tokens 32768 --mesh 2x4

prints `gkv_jax.targets.compile_for`'s report. Without --batch it searches for the largest
batch that fits and without --mesh for the mesh that fits the most: `memory_plan` proposes
(arithmetic, instant), the compiler confirms (each candidate is compiled; a refused one is
stepped down). Every time and throughput it prints is an estimate: nothing ran on a chip.
"""

from __future__ import annotations

import argparse
import json
import os

from gkv_jax.cli.args import CommandError, HelpFormatter, mesh_shape, one_line, positive_int

SEARCH_STEPS = 4  # compiles per mesh while stepping a refused batch down


def _model_config(source: str):
    """A preset's config, or a checkpoint directory's config.json (no weights are read)."""
    from gkv_jax.conversion.source import _read_config_json
    from gkv_jax.models.config import PRESETS, preset

    if source.lower() in PRESETS:
        return preset(source)
    if os.path.isdir(source):
        try:
            return _read_config_json(source)
        except (OSError, ValueError) as err:
            raise CommandError(f"--model {source}: {one_line(err)}") from err
    raise CommandError(f"--model: {source!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
                       f"nor a checkpoint directory")


def _eviction(args):
    from gkv_jax.eviction import EvictionConfig

    implementation = None if args.implementation == "auto" else args.implementation
    knobs = {"budget": args.budget, "window": args.window,
             "divide_length": args.divide_length}
    return EvictionConfig(policy=args.policy, implementation=implementation,
                          **{k: v for k, v in knobs.items() if v is not None})


def candidate_meshes(devices: int) -> list[tuple[int, int]]:
    """Every (data, model) that uses all `devices`, most data-parallel first."""
    return [(devices // m, m) for m in range(1, devices + 1) if devices % m == 0]


def planned_batch(config, mesh, eviction, max_new_tokens, prompt_length, dtype,
                  device_bytes, headroom, limit: int = 4096, platform: str = "tpu") -> int:
    """The largest batch (a multiple of the mesh's data size, at most `limit`) whose
    `memory_plan` fits `device_bytes` with `headroom`; 0 if none does."""
    from gkv_jax.sharding import memory_plan

    data = mesh[0]

    def fits(batch):
        return memory_plan(config, mesh, batch, eviction, max_new_tokens, dtype,
                           prompt_length, platform=platform).fits(device_bytes, headroom)

    if not fits(data):
        return 0
    low, high = 1, limit // data  # in units of `data`
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle * data):
            low = middle
        else:
            high = middle - 1
    return low * data


def search(args, config, eviction, target) -> list:
    """Reports for the meshes and batches tried, the best last (largest batch that fits)."""
    from gkv_jax.targets import compile_for

    meshes = [tuple(args.mesh)] if args.mesh else candidate_meshes(target.devices)
    proposals = []
    for mesh in meshes:
        batch = args.batch or planned_batch(
            config, mesh, eviction, args.max_new_tokens, args.prompt_length, args.dtype,
            target.figures.device_hbm_bytes, args.headroom, platform=target.platform)
        if batch:
            proposals.append((batch, mesh))
    if not proposals:
        raise CommandError(f"--target {target.name}: by memory_plan no batch fits on any mesh "
                           f"(try a smaller --max-new-tokens or --budget, or a larger target)")
    proposals.sort(key=lambda p: -p[0])
    reports = []
    for batch, mesh in proposals[:1 if args.batch else 2]:  # the plan's two best meshes
        for _ in range(SEARCH_STEPS):
            report = compile_for(target.name, config, batch=batch,
                                 prompt_length=args.prompt_length,
                                 max_new_tokens=args.max_new_tokens, eviction=eviction,
                                 mesh_shape=mesh, dtype=args.dtype, program=args.program,
                                 headroom=args.headroom, cost=not args.no_cost)
            reports.append(report)
            if report.fits or args.batch:
                break
            batch = max(mesh[0], (int(batch * 0.75) // mesh[0]) * mesh[0])
    return reports


def _cmd_plan(args: argparse.Namespace) -> int:
    from gkv_jax.sharding import memory_plan
    from gkv_jax.targets import (
        DEFAULT_HEADROOM,
        GPU_DEFAULT_HEADROOM,
        TargetUnavailable,
        get_target,
    )
    from gkv_jax.targets.gpu import skip_cuda_runtime_check

    target = get_target(args.target)
    if target.platform == "gpu":
        skip_cuda_runtime_check()  # before JAX starts: the CUDA plugin then starts without a GPU
    if args.headroom is None:
        args.headroom = GPU_DEFAULT_HEADROOM if target.platform == "gpu" else DEFAULT_HEADROOM
    config = _model_config(args.model)
    eviction = _eviction(args)
    try:
        reports = search(args, config, eviction, target)
    except TargetUnavailable as err:
        raise CommandError(f"--target {args.target}: {one_line(err)}") from err
    fitting = [r for r in reports if r.fits]
    best = max(fitting, key=lambda r: r.batch) if fitting else reports[-1]
    for report in reports:
        plan = memory_plan(config, report.mesh_shape, report.batch, eviction,
                           args.max_new_tokens, args.dtype, args.prompt_length,
                           platform=target.platform)
        marker = "best: " if report is best else ""
        print(f"{marker}{report.summary()}")
        if report.compiled:
            print(f"  memory_plan: {plan.total / 2**30:.2f} GiB per device (compiler "
                  f"{report.total_bytes / 2**30:.2f} GiB)")
    if args.json:
        print(json.dumps(best.as_dict()))
    return 0 if best.fits else 1


def add_plan_parser(commands) -> None:
    from gkv_jax.eviction import POLICIES
    from gkv_jax.targets import PROGRAMS, TARGETS

    about = ("will it fit? compile a program for a TPU slice or NVIDIA GPU host that is not "
             "attached and report memory per device, kernels and a roofline estimate (needs "
             "libtpu, the tpu extra; for GPU targets the cuda-compile extra)")
    plan = commands.add_parser("plan", help=about, description=about,
                               formatter_class=HelpFormatter)
    plan.add_argument("--target", required=True, help=f"one of {', '.join(TARGETS)}")
    plan.add_argument("--model", required=True,
                      help="a preset (e.g. deepseek-r1-distill-qwen-7b) or a checkpoint "
                           "directory (its config.json only)")
    plan.add_argument("--batch", type=positive_int, default=None,
                      help="sequences (default: the largest that fits)")
    plan.add_argument("--mesh", type=mesh_shape, default=None, metavar="DATAxMODEL",
                      help="mesh of the target's devices (default: the one that fits most)")
    plan.add_argument("--prompt-length", type=positive_int, default=512,
                      help="prompt tokens (padded to their bucket)")
    plan.add_argument("--max-new-tokens", type=positive_int, default=32768,
                      help="generated tokens per sequence")
    plan.add_argument("--policy", default="gkv", choices=POLICIES, help="eviction policy")
    plan.add_argument("--budget", type=int, default=None,
                      help="kept tokens per layer and KV head (required unless --policy full)")
    plan.add_argument("--window", type=int, default=None, help="observation window")
    plan.add_argument("--divide-length", type=int, default=None,
                      help="new tokens between compressions")
    plan.add_argument("--implementation", default="pallas", choices=("pallas", "xla", "auto"),
                      help="eviction ops: the Pallas kernels (Mosaic TPU, or Mosaic GPU on a GPU "
                           "target), the XLA reference, or what the library picks on the chip")
    plan.add_argument("--program", default="generate", choices=PROGRAMS,
                      help="the program to compile")
    plan.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"),
                      help="weight dtype")
    plan.add_argument("--headroom", type=float, default=None,
                      help="share of HBM left free when deciding what fits (default 0.1 on a "
                           "TPU; 0.25 on a GPU, the share JAX leaves unallocated by default)")
    plan.add_argument("--no-cost", action="store_true",
                      help="skip the decode step's cost analysis (two more compiles)")
    plan.add_argument("--json", action="store_true", help="also print the best report as JSON")
    plan.set_defaults(func=_cmd_plan)
