"""The training data of the bundled model: prefixes and whole sequences, and the random
evictions it is trained under (scripts/train_reasoner.py)."""

from __future__ import annotations

import importlib.util
import os
import re

import numpy as np
import pytest

from gkv_jax import synthetic

_SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "train_reasoner.py")


@pytest.fixture(scope="module")
def train_reasoner():
    spec = importlib.util.spec_from_file_location("train_reasoner", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def batch(train_reasoner):
    """Two whole problems: tokens [2, T] and the prompt length."""
    tokenizer = synthetic.build_tokenizer()
    encoded = [train_reasoner.encode(tokenizer, p) for p in synthetic.problems(3, 2)]
    assert len({len(ids) for ids, _ in encoded}) == 1
    return tokenizer, np.array([ids for ids, _ in encoded]), encoded[0][1]


def test_value_tokens_are_the_table_entries(train_reasoner, batch):
    tokenizer, tokens, prompt_length = batch
    facts = train_reasoner.value_tokens(tokenizer, tokens)
    line = "07 H4 93\n"
    ids = np.array([tokenizer(line, add_special_tokens=False)["input_ids"]])
    marked = "".join(c if f else "." for c, f in zip(line, train_reasoner.value_tokens(
        tokenizer, ids)[0], strict=True))
    assert marked == "...H4...."
    # the task's lines write "H 4": no fact, only the prompt holds the table
    assert not train_reasoner.value_tokens(tokenizer, np.array([tokenizer(
        "07 H 4 93\n", add_special_tokens=False)["input_ids"]])).any()
    # the prompt's ten entries are facts, its layout (spaces, "s", the start state) is not
    prompt = "".join(tokenizer.convert_ids_to_tokens(tokens[0, 1:prompt_length].tolist()))
    expected = re.sub(r"[A-J][0-9]|.", lambda m: m.group() if len(m.group()) == 2 else ".",
                      prompt, flags=re.S)
    marked = "".join(c if f else "." for c, f in zip(prompt, facts[0, 1:prompt_length],
                                                     strict=True))
    assert marked == expected and len(marked) - marked.count(".") == 20


def test_batches_are_prefixes_or_whole_sequences(train_reasoner):
    tokenizer = synthetic.build_tokenizer()
    held_out = {train_reasoner.problem_key(p) for p in synthetic.problems(0, 50)}
    data = train_reasoner.batches(tokenizer, 4, seed=7, held_out=held_out, answer_weight=5.0)
    lengths = set()
    for _ in range(12):
        tokens, mask = next(data)
        assert tokens.shape[1] % 16 == 0 and tokens.shape[1] <= train_reasoner.SEQUENCE_LENGTH
        for row, weights in zip(tokens, mask, strict=True):
            text = tokenizer.decode(row, skip_special_tokens=True)
            prompt, trace = text[:35], text[35:]
            table, start = prompt.split("\n")[:2]
            entries = dict(zip(table[::3], table[1::3], strict=True))
            problem = synthetic.Problem(
                table=tuple(int(entries[k]) for k in synthetic.KEYS),
                order=tuple(synthetic.KEYS.index(k) for k in table[::3]),
                start=(int(start[2]), int(start[3])))
            assert train_reasoner.problem_key(problem) not in held_out
            # the loss covers exactly the completion: a prefix of whole lines, or all of it
            completion = tokenizer.decode(row[weights > 0], skip_special_tokens=True)
            assert completion == trace and problem.completion.startswith(trace)
            assert trace.endswith("\n")
            whole = trace == problem.completion
            assert (row == tokenizer.eos_token_id).any() == whole
            # the answer line and EOS carry answer_weight, every other target weight 1
            weighted = tokenizer.convert_ids_to_tokens(row[weights == 5.0].tolist())
            assert weighted == ([*f"ans {problem.answer}\n", synthetic.EOS] if whole else [])
            assert set(weights[weights > 0]) <= {1.0, 5.0}
            lengths.add(whole or trace.count("\n"))
    assert True in lengths and len(lengths) > 3
    # --whole-share: the share of whole-sequence batches, here all or none
    for share, whole in ((1.0, True), (0.0, False)):
        data = train_reasoner.batches(tokenizer, 2, seed=3, held_out=held_out, whole_share=share)
        for _ in range(4):
            tokens, _ = next(data)
            assert (tokens == tokenizer.eos_token_id).any(axis=1).all() == whole


def test_eviction_masks_are_permanent_and_spare_the_prompt(train_reasoner, batch):
    tokenizer, tokens, prompt_length = batch
    facts = train_reasoner.value_tokens(tokenizer, tokens)
    lengths = np.full(len(tokens), prompt_length)
    rng = np.random.default_rng(0)
    masks = train_reasoner.eviction_masks(rng, facts, lengths, 3, 2, evict_fraction=1.0,
                                          min_window=6, fact_keep=0.9)
    T = tokens.shape[1]
    assert masks.shape == (3, 2, 2, T, T)
    causal = np.tril(np.ones((T, T), bool))
    visible = masks & causal
    # an evicted key never comes back: per key, the queries that see it are a prefix
    # of the queries after it
    for q in range(1, T):
        assert not (visible[..., q, :q] & ~visible[..., q - 1, :q]).any()
    # the prompt is encoded with full attention, and the last min_window tokens are always
    # visible
    assert visible[..., :prompt_length, :prompt_length].sum() == \
        causal[:prompt_length, :prompt_length].sum() * 3 * 2 * 2
    for offset in range(6):
        assert np.diagonal(visible, -offset, axis1=-2, axis2=-1).all()
    # something is evicted, and facts are kept more often than layout tokens
    last = visible[..., -1, :]
    assert not last.all()
    assert last[:, :, :, facts[0]].mean() > last[:, :, :, ~facts[0]].mean() + 0.1
    # fact_keep is the share of facts kept for good: 0 leaves only those still in reach
    rarely = train_reasoner.eviction_masks(np.random.default_rng(0), facts, lengths, 3, 2,
                                           evict_fraction=1.0, min_window=6, fact_keep=0.0)
    assert rarely[..., -1, :][:, :, :, facts[0]].mean() < last[:, :, :, facts[0]].mean() - 0.3


def test_eviction_masks_with_fraction_zero_see_everything(train_reasoner, batch):
    tokenizer, tokens, prompt_length = batch
    facts = train_reasoner.value_tokens(tokenizer, tokens)
    masks = train_reasoner.eviction_masks(np.random.default_rng(1), facts,
                                          np.full(len(tokens), prompt_length), 2, 2, 0.0)
    assert masks.all()


@pytest.mark.slow
def test_held_out_evaluation_decodes_whole_traces(train_reasoner):
    """The script's greedy evaluation, on the bundled model it produced: every line and
    every answer right (the decode limit must leave room for the whole completion)."""
    import gkv_jax
    from gkv_jax.loading import bundled_model_dir

    model, tokenizer = gkv_jax.load(bundled_model_dir(), dtype="float32")
    result = train_reasoner.evaluate_exact(model.config, model.params(), tokenizer,
                                           synthetic.problems(0, 4), batch_size=4)
    assert result["exact"] == 1.0
    assert result["line_accuracy"] == [1.0] * synthetic.NUM_STEPS


# Slow: a second training run from a saved checkpoint.
@pytest.mark.slow
def test_init_from_starts_at_the_saved_weights(train_reasoner, tmp_path):
    """--init-from: fine-tuning starts from a saved model's weights (here the bundled one),
    and a directory holding a model of another size is refused with the flag's name."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    from flax import nnx

    import gkv_jax
    from gkv_jax.loading import bundled_model_dir
    from gkv_jax.models import Transformer

    tokenizer = synthetic.build_tokenizer()
    config = train_reasoner.model_config(tokenizer)
    saved = gkv_jax.load(bundled_model_dir(), dtype="float32")[0].params()
    started = train_reasoner.initial_params(config, bundled_model_dir(), seed=0)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), saved, started))
    fresh = train_reasoner.initial_params(config, None, seed=0)
    assert not jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), saved, fresh))

    smaller = dataclasses.replace(config, num_layers=1)
    train_reasoner.export(smaller, Transformer(smaller, dtype=jnp.float32,
                                               rngs=nnx.Rngs(0)).params(), tokenizer,
                          str(tmp_path))
    with pytest.raises(ValueError, match="--init-from"):
        train_reasoner.initial_params(config, str(tmp_path), seed=0)
