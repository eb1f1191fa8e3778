"""What the `gkv-jax` commands share: the boundary's error type, argument types, help format
and checkpoint loading (`cli` and `post_train_cli` both build on it)."""

from __future__ import annotations

import argparse
import re

SEED_LIMIT = 2**32  # generate() takes seeds in [0, 2**32)


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
