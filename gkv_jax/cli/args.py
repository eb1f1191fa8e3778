"""What the `gkv-jax` commands share: the boundary's error type, argument types, help format,
the flags several commands take (sampling, dtype, mesh), the checks run before any model
loads (eviction knobs, sampling values, the mesh), checkpoint loading and the stats printout.
"""

from __future__ import annotations

import argparse
import re

from gkv_jax.eviction import POLICIES, EvictionConfig

SEED_LIMIT = 2**32  # generate() takes seeds in [0, 2**32)
DTYPES = ("float32", "bfloat16", "float16")


class CommandError(Exception):
    """A bad flag or unreadable input, already worded for the command line (exit 2)."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Ends every flag's help with its default, lists as the comma-separated text the flag
    takes. None, booleans and required flags show none: their help says what leaving them
    out means."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (action.required or default is None or isinstance(default, bool)
                or default is argparse.SUPPRESS or "%(default)" in text):
            return text
        if isinstance(default, list | tuple):
            default = ",".join(map(str, default))
        return f"{text} (default: {default})"


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def seed_value(text: str) -> int:
    """An argparse type: a sampler seed, an integer in [0, 2**32)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(
            f"must be an integer in [0, {SEED_LIMIT - 1}], got {text!r}")
    return value


def comma_list(kind):
    """An argparse type: comma-separated values of `kind` (a type such as int, str or
    positive_int)."""
    def parse(text: str):
        try:
            return [kind(part.strip()) for part in text.split(",") if part.strip()]
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {kind.__name__} values, got {text!r}") from None
    parse.__name__ = f"comma-separated {kind.__name__} list"
    return parse


def mesh_shape(text: str) -> tuple[int, int]:
    """--mesh DATAxMODEL (e.g. 2x4): the sizes of the mesh's `data` and `model` axes."""
    parts = text.lower().split("x")
    try:
        data, model = (int(p) for p in parts)
    except ValueError:
        data = model = 0
    if len(parts) != 2 or data < 1 or model < 1:
        raise argparse.ArgumentTypeError(
            f"expected DATAxMODEL with two positive integers (e.g. 2x4), got {text!r}")
    return data, model


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature; 0 decodes greedily")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="nucleus sampling mass, in (0, 1]; 1 keeps every token")
    parser.add_argument("--top-k", type=int, default=0,
                        help="sample among the k most likely tokens; 0 keeps every token")
    parser.add_argument("--seed", type=seed_value, default=0,
                        help=f"sampler seed, in [0, {SEED_LIMIT - 1}]")


def _add_eviction_args(parser: argparse.ArgumentParser) -> None:
    """--policy, --budget, --window and --divide-length: one `EvictionConfig` (read back by
    `eviction_from_args`)."""
    parser.add_argument("--policy", default="gkv", choices=POLICIES,
                        help="eviction policy; full keeps every token")
    parser.add_argument("--budget", type=int, default=None,
                        help="kept tokens per layer and KV head (required unless --policy "
                             "full)")
    parser.add_argument("--window", type=int, default=None,
                        help="observation window of snapkv, rkv and gkv (default: the "
                             "policy's)")
    parser.add_argument("--divide-length", type=int, default=None,
                        help="new tokens between compressions (default: the policy's)")


def _add_dtype_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default=None, choices=DTYPES,
                        help="parameter dtype (default: the checkpoint's own dtype)")


def _add_mesh_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mesh", type=mesh_shape, default=None, metavar="DATAxMODEL",
                        help="run on a data x model mesh of all devices, e.g. 2x4: the "
                             "batch over data, heads/MLP/vocabulary over model (default: "
                             "one device)")


def eviction_from_args(args: argparse.Namespace) -> EvictionConfig:
    """The `EvictionConfig` named by --policy and its knobs (unset knobs: policy defaults; a
    knob the policy does not use is refused, naming its flag)."""
    knobs = {"budget": args.budget, "window": args.window, "divide_length": args.divide_length}
    return EvictionConfig(policy=args.policy, **{k: v for k, v in knobs.items() if v is not None})


def check_sampling(args: argparse.Namespace) -> None:
    """--temperature, --top-p and --top-k, checked by the sampler's own rules."""
    from gkv_jax.sampling import SamplingParams

    SamplingParams.create(args.temperature, args.top_p, args.top_k)


def mesh_from_args(args: argparse.Namespace):
    """The mesh --mesh asks for (None without the flag), checked against the devices before
    any model loads."""
    if getattr(args, "mesh", None) is None:
        return None
    import jax

    from gkv_jax.sharding import make_mesh

    data, model = args.mesh
    count = jax.device_count()
    if data * model != count:  # the library's message suggests an argument the CLI lacks
        raise CommandError(
            f"--mesh {data}x{model}: asks for {data * model} devices, but there are {count}; "
            f"give DATAxMODEL with DATA x MODEL = {count} (e.g. --mesh {count}x1), or make only "
            f"the devices to use visible (e.g. CUDA_VISIBLE_DEVICES, TPU_VISIBLE_CHIPS)")
    try:
        return make_mesh(data=data, model=model)
    except ValueError as err:
        raise CommandError(f"--mesh {data}x{model}: {one_line(err)}") from err


def load_checkpoint(source: str, dtype: str | None, flag: str = "--model", mesh=None):
    """`gkv_jax.load`, with every way a checkpoint can be unreadable (missing, truncated or
    malformed files, a config lacking a field) turned into a `CommandError` naming `flag`.
    With a mesh each weight goes straight onto its shards."""
    import gkv_jax

    try:
        # dtype None: the checkpoint's own dtype
        return gkv_jax.load(source, dtype=dtype, **({"mesh": mesh} if mesh else {}))
    except (ValueError, OSError, KeyError) as err:
        raise CommandError(f"{flag} {source}: {_load_error_text(err)}") from err
    except Exception as err:
        if type(err).__name__ != "SafetensorError":  # safetensors' Rust error, not importable
            raise
        raise CommandError(f"{flag} {source}: unreadable safetensors file ({err})") from err


def _load_error_text(err: Exception) -> str:
    if isinstance(err, KeyError):
        return f"config or weights lack the entry {err.args[0]!r}"
    return re.sub(r"^source: ", "", one_line(err))


def require_tokenizer(tokenizer, args: argparse.Namespace, why: str):
    if tokenizer is None:
        raise CommandError(f"--model: {args.model} has no tokenizer files; {why}")
    return tokenizer


def one_line(err: BaseException) -> str:
    """An exception's message on one line (what `error:` prints)."""
    return " ".join(str(err).split("\n")).strip() or type(err).__name__


def format_stats(stats: dict) -> str:
    """One human-readable line per statistic, whatever the keys (byte counts in MiB)."""
    lines = []
    for key, value in stats.items():
        if key.endswith("bytes") and isinstance(value, int | float) and not isinstance(value,
                                                                                      bool):
            value = f"{value / 2**20:.2f} MiB"
        elif isinstance(value, float):
            value = f"{value:.3f}"
        lines.append(f"  {key}: {value}")
    return "\n".join(lines)
