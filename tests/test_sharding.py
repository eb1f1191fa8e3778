"""Sharded generation on a `data` x `model` mesh of 8 CPU host devices (tests/conftest.py).

The contract: each sequence's greedy tokens and kept positions equal a one-device run's on
every mesh shape, the weights and cache are really split by the rule table, and one
compression of a head-sharded cache compiles to a program without a single collective.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gkv_jax import EvictionConfig, conversion, generate, sharding
from gkv_jax.cache import init_cache
from gkv_jax.decode import evict
from gkv_jax.policies import POLICIES
from gkv_jax.sharding.rules import cache_specs, param_specs
from tests.helpers import TinySpec, tiny_hf_model

# 8 query heads, 4 KV heads: split over model=2 and 4, replicated KV heads on model=8.
SPEC = TinySpec("shard-h8-kv4", "qwen2", heads=8, kv_heads=4, head_dim=16, tied=False,
                vocab=128)
MESHES = [(1, 8), (2, 4), (4, 2), (8, 1)]
MAX_NEW_TOKENS = 24
COLLECTIVES = re.compile(r"\b(all-gather|all-reduce|reduce-scatter|collective-permute|"
                         r"all-to-all|collective-broadcast)(-start|-done)?\b")


@functools.cache
def hf_model():
    return tiny_hf_model(SPEC)


def fresh_model():
    """A new one-device model (sharding moves a model's weights in place)."""
    return conversion.from_hf(hf_model())


def ragged_prompts():
    rng = np.random.default_rng(3)
    return [rng.integers(0, SPEC.vocab, n).tolist() for n in (3, 25, 11)]


def eviction_for(policy: str, implementation: str | None = None):
    if policy == "full":
        return EvictionConfig(policy="full")
    return EvictionConfig(policy=policy, budget=16, divide_length=4, window=4,
                          implementation=implementation)


@functools.cache
def one_device(policy: str):
    return generate(fresh_model(), ragged_prompts(), eviction=eviction_for(policy),
                    max_new_tokens=MAX_NEW_TOKENS, eos_token_id=[],
                    return_kept_positions=True)


def check_same_as_one_device(policy, data, model, implementation=None):
    reference = one_device(policy)
    mesh = sharding.make_mesh(data=data, model=model)
    out = generate(fresh_model(), ragged_prompts(),
                   eviction=eviction_for(policy, implementation),
                   max_new_tokens=MAX_NEW_TOKENS, eos_token_id=[],
                   return_kept_positions=True, mesh=mesh)
    assert out.stats["devices"] == 8
    assert out.tokens == reference.tokens
    np.testing.assert_array_equal(out.kept_positions, reference.kept_positions)
    if policy != "full":
        assert reference.stats["compressions"] > 0


# ------------------------------------------------------------------------------- the mesh
def test_make_mesh_sizes():
    assert dict(sharding.make_mesh().shape) == {"data": 8, "model": 1}
    assert dict(sharding.make_mesh(model=4).shape) == {"data": 2, "model": 4}
    assert dict(sharding.make_mesh(data=4).shape) == {"data": 4, "model": 2}
    small = sharding.make_mesh(data=2, model=1, devices=jax.devices()[:2])
    assert small.devices.size == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(data=3), "data=3 does not divide the 8 devices"),
    (dict(model=0), "model must be an integer >= 1"),
    (dict(data=2, model=2), "data=2 x model=2 = 4, but there are 8 devices"),
    (dict(data=2.0), "data must be an integer"),
])
def test_make_mesh_errors(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        sharding.make_mesh(**kwargs)


def test_unknown_axis_names_are_refused():
    mesh = jax.make_mesh((2, 4), ("batch", "tensor"))
    with pytest.raises(ValueError, match=r"mesh must have the axes \('data', 'model'\)"):
        generate(fresh_model(), [[1, 2]], max_new_tokens=2, mesh=mesh)
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        generate(fresh_model(), [[1, 2]], max_new_tokens=2, mesh=(2, 4))


def test_a_model_on_one_mesh_used_with_another_is_refused():
    model = sharding.shard_model(fresh_model(), sharding.make_mesh(data=2, model=4))
    with pytest.raises(ValueError, match="sharded over another mesh.*shard_model"):
        generate(model, [[1, 2]], max_new_tokens=2, mesh=sharding.make_mesh(data=4, model=2))


# ------------------------------------------------------------------------------ the rules
def test_weights_are_split_by_the_rule_table():
    model = sharding.shard_model(fresh_model(), sharding.make_mesh(data=2, model=4))
    layers = model.params()["layers"]
    local = {name: layers[name].addressable_shards[0].data.shape for name in layers}
    # [L, D, N, H] over N; [L, D, K, H] over K; MLP width 48 over 4; norms whole.
    assert local["q_proj"] == (2, 128, 2, 16)
    assert local["k_proj"] == local["v_proj"] == (2, 128, 1, 16)
    assert local["o_proj"] == (2, 2, 16, 128)
    assert local["gate_proj"] == local["up_proj"] == (2, 128, 12)
    assert local["down_proj"] == (2, 12, 128)
    assert local["attn_norm"] == (2, 128)
    assert model.params()["lm_head"].addressable_shards[0].data.shape == (128, 32)
    # Moving to another mesh reshards every weight.
    sharding.shard_model(model, sharding.make_mesh(data=1, model=8))
    layers = model.params()["layers"]
    assert layers["q_proj"].addressable_shards[0].data.shape == (2, 128, 1, 16)
    assert layers["k_proj"].addressable_shards[0].data.shape == (2, 128, 4, 16)  # replicated


def test_kv_heads_replicate_when_model_exceeds_them():
    config = fresh_model().config
    shapes = {"keys": (2, 8, 4, 20, 16), "query_window": (2, 8, 8, 4, 16)}
    split = cache_specs(8, 4, shapes, sharding.make_mesh(data=2, model=4))
    assert split["keys"] == jax.sharding.PartitionSpec(None, "data", "model", None, None)
    assert split["query_window"] == split["keys"]
    replicated = cache_specs(8, 4, shapes, sharding.make_mesh(data=1, model=8))
    assert replicated["keys"] == jax.sharding.PartitionSpec(None, None, None, None, None)
    weights = param_specs(config, fresh_model().params(), sharding.make_mesh(data=1, model=8))
    assert weights["layers"]["k_proj"] == jax.sharding.PartitionSpec(None, None, None, None)
    assert weights["layers"]["q_proj"] == jax.sharding.PartitionSpec(None, None, "model", None)


# --------------------------------------------------------------------------- generation
# Slow (the fast suite's cold time): the 2x4 mesh is one of the sweep's meshes below; the
# cache-sharding test keeps a sharded generate in the fast suite.
@pytest.mark.slow
def test_sharded_generate_equals_one_device_on_a_2x4_mesh():
    """gkv, a ragged batch of 3 on data=2 (padded to 4), KV heads over model=4."""
    check_same_as_one_device("gkv", 2, 4)


def test_cache_is_sharded_and_a_loaded_model_needs_no_mesh_argument():
    mesh = sharding.make_mesh(data=2, model=4)
    model = sharding.shard_model(fresh_model(), mesh)
    out = generate(model, ragged_prompts(), eviction=eviction_for("gkv"),
                   max_new_tokens=MAX_NEW_TOKENS, eos_token_id=[])
    assert out.tokens == one_device("gkv").tokens
    # Batch 4 (3 padded) over 2, KV heads 4 over 4: one device holds 1/8 of the cache.
    assert out.stats["devices"] == 8
    whole = init_cache(model.config, 4, 20, 4)  # capacity budget + divide_length
    lengths = whole.lengths.nbytes  # [B] int32: split over data only
    assert out.stats["cache_bytes_per_device"] == (whole.num_bytes() - lengths) // 8 + lengths // 2


# ------------------------------------------------------------------- no communication
def _sharded_cache(mesh, batch=4, capacity=20, window=4):
    config = fresh_model().config
    cache = init_cache(config, batch, capacity, window)
    rng = np.random.default_rng(0)
    cache = cache.replace(
        keys=jnp.asarray(rng.normal(size=cache.keys.shape), jnp.float32),
        positions=jnp.broadcast_to(jnp.arange(capacity, dtype=jnp.int32),
                                   cache.positions.shape),
        lengths=jnp.full((batch,), capacity, jnp.int32))
    specs = cache_specs(config.num_heads, config.num_kv_heads,
                        {name: getattr(cache, name).shape for name in sharding.CACHE_AXES},
                        mesh)
    placed = {name: jax.device_put(getattr(cache, name), jax.sharding.NamedSharding(mesh, s))
              for name, s in specs.items()}
    return cache.replace(**placed)


def compiled_text(fn, mesh, *args) -> str:
    with jax.set_mesh(mesh):
        return jax.jit(fn).lower(*args).compile().as_text()


def test_the_eviction_step_of_a_head_sharded_cache_has_no_collective():
    mesh = sharding.make_mesh(data=2, model=4)
    cache = _sharded_cache(mesh)
    active = jax.device_put(jnp.ones((4,), bool), jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec("data")))
    for policy in ("gkv", "snapkv"):
        text = compiled_text(functools.partial(evict, eviction_for(policy)), mesh, cache,
                             active)
        assert COLLECTIVES.findall(text) == [], policy
        assert "sort" in text or "top" in text.lower()  # it is the selection program
    # The check sees collectives where there are some: a sum over the sharded KV heads.
    text = compiled_text(lambda c: jnp.sum(c.keys, axis=2), mesh, cache)
    assert COLLECTIVES.findall(text)


@pytest.mark.slow
@pytest.mark.parametrize("data, model", MESHES)
@pytest.mark.parametrize("policy", list(POLICIES))
def test_every_policy_on_every_mesh_equals_one_device(policy, data, model):
    check_same_as_one_device(policy, data, model)


@pytest.mark.slow
@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "full"])
def test_pallas_kernels_on_local_blocks_of_a_2x4_mesh(policy):
    """implementation="pallas" (interpret mode on CPU) inside `jax.shard_map`."""
    check_same_as_one_device(policy, 2, 4, implementation="pallas")



# ------------------------------------------------------------------------- command line
def _exit_status(argv) -> int:
    from gkv_jax.cli import main

    try:
        return main(argv)
    except SystemExit as err:  # argparse's own errors
        return err.code


@pytest.mark.parametrize("flag, message", [
    ("3x1", "--mesh 3x1: asks for 3 devices, but there are 8; give DATAxMODEL with DATA x "
            "MODEL = 8 (e.g. --mesh 8x1)"),
    ("2", "expected DATAxMODEL with two positive integers (e.g. 2x4), got '2'"),
    ("0x8", "expected DATAxMODEL with two positive integers (e.g. 2x4), got '0x8'"),
])
def test_cli_mesh_errors_come_before_the_model_loads(flag, message, capsys, monkeypatch):
    import gkv_jax

    monkeypatch.setattr(gkv_jax, "load", lambda *a, **k: pytest.fail("loaded the model"))
    for command in (["generate", "--prompt", "x", "--policy", "full"], ["eval"]):
        assert _exit_status([*command, "--model", "m", "--mesh", flag]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_cli_generate_on_a_mesh_prints_the_one_device_tokens(capsys):
    import json

    from gkv_jax.cli import main
    from gkv_jax.loading import bundled_model_dir

    outputs = []
    for extra in ([], ["--mesh", "2x4"]):
        assert main(["generate", "--model", bundled_model_dir(), "--prompt", "A1 B2 C3",
                     "--max-new-tokens", "12", "--budget", "16", "--divide-length", "4",
                     "--window", "4", "--json", *extra]) == 0
        outputs.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert outputs[1]["tokens"] == outputs[0]["tokens"]
    assert outputs[1]["stats"]["devices"] == 8
