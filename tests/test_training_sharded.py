"""Post-training on a 2 x 4 mesh (data- and model-parallel, 8 CPU devices): one
`distill_step` and one `grpo_step` on sharded params and batches equal the single-device
steps, the weights keep the rule table's layout, `shard_batch` pads without changing the
loss, and `distill` / `grpo` run, checkpoint and resume on the mesh."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from gkv_jax import conversion, training
from gkv_jax.eviction import EvictionConfig
from gkv_jax.generation import generate
from gkv_jax.sampling import SamplingParams
from gkv_jax.sharding import make_mesh, shard_model, shard_params
from gkv_jax.sharding.placement import param_shardings, placed_mesh
from gkv_jax.training import loop_common
from gkv_jax.training.configs import optimizer_config
from gkv_jax.training.run_dir import RunDir, fingerprint, run_identity
from tests.helpers import TinySpec, tiny_hf_model

SPEC = TinySpec("shard-h8-kv4", "qwen2", heads=8, kv_heads=4, head_dim=16, tied=False,
                vocab=128)
GKV = EvictionConfig(policy="gkv", budget=12, window=4, divide_length=4)
# eps comparable to the gradients: the update is smooth in them, so the rounding of a
# reduction split over devices moves it by that rounding, not by a flipped sign(g) * lr.
OPTIMIZER = training.OptimizerConfig(learning_rate=1e-3, schedule="constant",
                                     warmup_ratio=0.0, eps=1e-4)
TOL = dict(rtol=1e-5, atol=1e-6)


@functools.cache
def tiny_model():
    return conversion.from_hf(tiny_hf_model(SPEC))


def fresh_model():
    """A copy of the tiny model (the loops move a model's weights onto the mesh in place)."""
    return loop_common._with_params(tiny_model(), tiny_model().params(), copy=True)


@functools.cache
def mesh_2x4():
    return make_mesh(data=2, model=4)


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)  # the steps donate params and opt_state


def _pairs(seed, count):
    rng = np.random.default_rng(seed)
    return [(rng.integers(1, SPEC.vocab, rng.integers(5, 14)).tolist(),
             rng.integers(1, SPEC.vocab, rng.integers(10, 19)).tolist()) for _ in range(count)]


def _assert_same_step(single, sharded):
    """Same loss, grad_norm, params and optimizer state (Adam's moments hold the
    gradients)."""
    for name in ("loss", "grad_norm"):
        np.testing.assert_allclose(float(sharded[2][name]), float(single[2][name]), **TOL,
                                   err_msg=name)
    for part in (0, 1):
        for a, b in zip(jax.tree.leaves(single[part]), jax.tree.leaves(sharded[part]),
                        strict=True):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), **TOL)


def _assert_rule_layout(config, params, opt_state, mesh):
    """Every weight and Adam moment (None: weights only) still has the rule table's
    sharding; per-device shards of q_proj (8 heads over model=4) and gate_proj / down_proj
    (MLP width 48 over model=4)."""
    wanted = jax.tree.leaves(param_shardings(config, params, mesh),
                             is_leaf=lambda x: isinstance(x, NamedSharding))
    moments = []
    if opt_state is not None:
        moments = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, dict))
                   if isinstance(x, dict)]
        assert len(moments) == 2  # Adam's mu and nu
    for tree in (params, *moments):
        for leaf, sharding in zip(jax.tree.leaves(tree), wanted, strict=True):
            assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), (leaf.shape,
                                                                        leaf.sharding)
    layers = params["layers"]
    assert layers["q_proj"].addressable_shards[0].data.shape == (2, 128, 2, 16)
    assert layers["gate_proj"].addressable_shards[0].data.shape == (2, 128, 12)
    assert layers["down_proj"].addressable_shards[0].data.shape == (2, 12, 128)


def test_shard_batch_pads_with_masked_rows_over_data():
    mesh = mesh_2x4()
    prompts, completions = zip(*_pairs(1, 3), strict=True)
    batch = training.batch_from_completions(prompts, completions, width=16)
    placed = training.shard_batch(batch, mesh)
    assert placed.padding_rows == 1 and placed.real_rows == 3
    assert placed.tokens.shape[0] == 4
    assert placed.tokens.addressable_shards[0].data.shape == (2, batch.tokens.shape[1])
    np.testing.assert_array_equal(np.asarray(placed.tokens)[:3], np.asarray(batch.tokens))
    np.testing.assert_array_equal(np.asarray(placed.tokens)[3], np.asarray(batch.tokens)[2])
    assert not np.asarray(placed.loss_mask)[3].any()
    assert training.shard_batch(placed, mesh).padding_rows == 1  # already divisible
    with pytest.raises(TypeError, match="batch must be a TeacherForcedBatch"):
        training.shard_batch(batch.tokens, mesh)
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        training.shard_batch(batch, None)


# Slow: a training step compiled twice (mesh and one device).
@pytest.mark.slow
def test_grpo_step_on_a_2x4_mesh_equals_the_single_device_step_dense_masks():
    """3 rows padded to 4 over data=2, under hand-made masks ([L, B, K, T] over data), dense
    attention (the fast case: no replay, no generation)."""
    mesh = mesh_2x4()
    model = tiny_model()
    config = model.config
    prompts, completions = zip(*_pairs(3, 3), strict=True)
    batch = training.batch_from_completions(prompts, completions, width=16)
    positions = np.asarray(batch.positions)
    rng = np.random.default_rng(0)
    shape = (config.num_layers, 3, config.num_kv_heads, positions.shape[1])
    visible_until = np.where(positions[None, :, None] >= 0,
                             positions[None, :, None] + rng.integers(1, 9, shape), 0)
    batch = batch.with_visible_until(visible_until, GKV)
    advantages = jnp.asarray([1.0, -0.5, 0.25])
    sampling = SamplingParams.create(0.8, 0.9)
    optimizer = training.make_optimizer(OPTIMIZER, 10)

    def step(params, batch):
        return training.grpo_step(config, optimizer, params, optimizer.init(params), batch,
                                  advantages, sampling, temperature=0.8,
                                  attention_impl="dense")

    single = step(_copy(model.params()), batch)
    with jax.set_mesh(mesh):
        sharded = step(shard_params(config, _copy(model.params()), mesh),
                       training.shard_batch(batch, mesh))
    assert abs(float(single[2]["loss"])) > 1e-4
    _assert_same_step(single, sharded)
    _assert_rule_layout(config, sharded[0], sharded[1], mesh)


@pytest.mark.slow
def test_distill_step_on_a_2x4_mesh_equals_the_single_device_step():
    """3 evicting rows + 1 full-attention row on data=2: both batches padded."""
    mesh = mesh_2x4()
    teacher = tiny_model()
    config = teacher.config
    student_params = jax.tree.map(lambda w: w * 1.05, teacher.params())
    prompts, completions = zip(*_pairs(2, 4), strict=True)
    batch = training.batch_from_completions(prompts[:3], completions[:3], width=16)
    full = training.batch_from_completions(prompts[3:], completions[3:], width=16,
                                           num_targets=batch.targets.shape[1])
    optimizer = training.make_optimizer(OPTIMIZER, 10)

    def step(params, teacher_params, batch, full):
        return training.distill_step(config, config, optimizer, GKV, params,
                                     optimizer.init(params), teacher_params, batch, full)

    single = step(_copy(student_params), teacher.params(), batch, full)
    params = shard_params(config, _copy(student_params), mesh)
    with jax.set_mesh(mesh):
        sharded = step(params, shard_params(config, teacher.params(), mesh),
                       training.shard_batch(batch, mesh), training.shard_batch(full, mesh))
    assert float(single[2]["loss"]) > 1e-3
    _assert_same_step(single, sharded)
    _assert_rule_layout(config, sharded[0], sharded[1], mesh)


@pytest.mark.slow
def test_grpo_step_on_a_2x4_mesh_equals_the_single_device_step():
    """3 rollouts (padded to 4 over data=2) under their own records; the guard holds."""
    mesh = mesh_2x4()
    model = tiny_model()
    config = model.config
    prompts = [p for p, _ in _pairs(3, 3)]
    out = generate(model, prompts, eviction=GKV, max_new_tokens=14, temperature=0.8,
                   top_p=0.9, seed=4, return_logprobs=True, return_eviction_record=True)
    batch = training.batch_from_generation(out, num_targets=14)
    advantages = jnp.asarray([1.0, -0.5, 0.25])
    sampling = SamplingParams.create(0.8, 0.9)
    optimizer = training.make_optimizer(OPTIMIZER, 10)

    def step(params, batch):
        return training.grpo_step(config, optimizer, params, optimizer.init(params), batch,
                                  advantages, sampling, temperature=0.8)

    single = step(_copy(model.params()), batch)
    with jax.set_mesh(mesh):
        sharded = step(shard_params(config, _copy(model.params()), mesh),
                       training.shard_batch(batch, mesh))
    assert abs(float(single[2]["loss"])) > 1e-4
    assert float(single[2]["guard"]) < 1e-4 and float(sharded[2]["guard"]) < 1e-4
    _assert_same_step(single, sharded)
    _assert_rule_layout(config, sharded[0], sharded[1], mesh)


def test_a_model_on_another_mesh_is_refused_before_anything_moves(tmp_path):
    elsewhere = shard_model(fresh_model(), make_mesh(data=4, model=2))
    student = fresh_model()
    config = training.DistillConfig(eviction=GKV, steps=1, batch_size=2)
    with pytest.raises(ValueError, match="sharded over another mesh"):
        training.distill(student, elsewhere, _pairs(5, 2), config,
                         run_dir=str(tmp_path / "d"), mesh=mesh_2x4(), progress=False)
    assert placed_mesh(student) is None  # the student (unplaced) was not moved first
    assert not (tmp_path / "d").exists()
    with pytest.raises(ValueError, match="sharded over another mesh"):
        training.grpo(elsewhere, [[1, 2]], [1], lambda c, a: True,
                      training.GRPOConfig(eviction=GKV, steps=1, max_new_tokens=32),
                      run_dir=str(tmp_path / "g"), mesh=mesh_2x4(), progress=False)


def _distill_config(**changes):
    base = dict(eviction=GKV, steps=2, batch_size=3, learning_rate=1e-3, seed=1,
                checkpoint_every=1, warmup_ratio=0.0, schedule="constant")
    return training.DistillConfig(**{**base, **changes})


@pytest.mark.slow
def test_distill_on_a_mesh_checkpoints_and_resumes_exactly(tmp_path):
    mesh = mesh_2x4()
    teacher = fresh_model()
    student = loop_common._with_params(teacher,
                                       jax.tree.map(lambda w: w * 1.05, teacher.params()))
    data = _pairs(6, 4)
    trained, history = training.distill(student, teacher, data, _distill_config(),
                                        run_dir=str(tmp_path / "a"), mesh=mesh,
                                        progress=False)
    assert [e["step"] for e in history] == [1, 2]
    _assert_rule_layout(teacher.config, trained.params(), None, mesh)

    class Interrupt(Exception):
        pass

    def interrupt(model, step):
        raise Interrupt

    config = _distill_config(eval_every=1)
    with pytest.raises(Interrupt):  # after the checkpoint of step 1
        training.distill(student, teacher, data, config, run_dir=str(tmp_path / "b"),
                         eval_fn=interrupt, mesh=mesh, progress=False)
    run = RunDir(str(tmp_path / "b"), run_identity("distill", config, fingerprint(data),
                                                   student.config))
    run.open()
    optimizer = training.make_optimizer(optimizer_config(config), config.steps)
    params = shard_params(student.config, _copy(student.params()), mesh)
    step, restored, opt_state = run.restore(
        params, loop_common._init_opt_state(optimizer, params, mesh))
    run.close()
    assert step == 1
    _assert_rule_layout(student.config, restored, opt_state, mesh)
    resumed, resumed_history = training.distill(student, teacher, data, config,
                                                run_dir=str(tmp_path / "b"), mesh=mesh,
                                                progress=False)
    assert [e["step"] for e in resumed_history if "loss" in e] == [1, 2]
    for a, b in zip(jax.tree.leaves(trained.params()), jax.tree.leaves(resumed.params()),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_grpo_on_a_mesh_keeps_the_guard():
    import tempfile
    mesh = mesh_2x4()
    model = fresh_model()
    prompts = [p for p, _ in _pairs(7, 2)]
    config = training.GRPOConfig(eviction=dataclasses.replace(GKV, budget=16), steps=2,
                                 prompts_per_step=1, group_size=3, max_new_tokens=12,
                                 learning_rate=1e-3, warmup_ratio=0.0, checkpoint_every=1)
    with tempfile.TemporaryDirectory() as run_dir:
        trained, history = training.grpo(model, prompts, [7, 11],
                                         lambda ids, answer: answer in ids, config,
                                         run_dir=run_dir, mesh=mesh, progress=False)
    assert [e["step"] for e in history] == [1, 2]
    assert all(e["guard"] < 1e-4 for e in history), history
    layers = trained.params()["layers"]
    assert layers["q_proj"].addressable_shards[0].data.shape == (2, 128, 2, 16)


@pytest.mark.slow
def test_on_policy_distill_with_full_rows_on_a_mesh(tmp_path):
    """The student's completions come from `generate(..., mesh=)`; 2 evicting rows and 1
    full-attention row, each padded over data=2."""
    mesh = mesh_2x4()
    teacher = fresh_model()
    config = _distill_config(steps=1, full_attention_share=1 / 3, on_policy=True,
                             max_new_tokens=12, checkpoint_every=0)
    trained, history = training.distill(teacher, teacher, _pairs(8, 3), config,
                                        run_dir=str(tmp_path), mesh=mesh, progress=False)
    assert len(history) == 1 and np.isfinite(history[0]["loss"])
    _assert_rule_layout(teacher.config, trained.params(), None, mesh)
