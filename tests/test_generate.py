"""`gkv_jax.generate`: exactness against transformers, batching, recompilation, sampling, EOS,
string prompts, and input validation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from gkv_jax import conversion, generation_inputs, policies
from gkv_jax.decode import generate_tokens
from gkv_jax.eviction import POLICIES, EvictionConfig, Policy, get_policy
from gkv_jax.generation import compiled_programs, generate
from gkv_jax.generation_inputs import bucket_length
from gkv_jax.sampling import SamplingParams
from tests.helpers import SPEC_BY_NAME, tiny_hf_model

SPEC = SPEC_BY_NAME["qwen2-h32-g2-untied"]
RNG = np.random.default_rng(7)
PROMPTS = [RNG.integers(0, SPEC.vocab, n).tolist() for n in (5, 19, 12)]


@functools.cache
def tiny():
    hf = tiny_hf_model(SPEC)
    return hf, conversion.from_hf(hf)


def hf_greedy(hf, prompt, max_new_tokens):
    with torch.no_grad():
        ids = torch.as_tensor([prompt])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids),
                          max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    return out[0, len(prompt):].tolist()


# The built-in policies (gkv_jax.policies.builtin) run in the fast suite; a policy registered
# elsewhere (tova, l2norm, a new one) is swept too, under slow (one more compiled program each).
BUILTIN = tuple(p.name for p in vars(policies.builtin).values() if isinstance(p, Policy))
# Knob overrides of this sweep; every other knob is the registry's default.
WINDOW_OVERRIDES = {"snapkv": 4, "rkv": 4}


def full_cache_knobs(policy: str) -> dict:
    """Budget 64 (above every sequence here), divide_length 8; the policy's default knobs."""
    if not get_policy(policy).evicts:
        return {}
    knobs = dict(budget=64, divide_length=8)
    if policy in WINDOW_OVERRIDES:
        knobs["window"] = WINDOW_OVERRIDES[policy]
    return knobs


FAST_POLICIES = ("full", "gkv")  # the rest under slow (the engine tests sweep them too)


def every_policy():
    """Every registered policy, all but `FAST_POLICIES` under slow."""
    assert set(BUILTIN) <= set(POLICIES) and set(FAST_POLICIES) <= set(BUILTIN)
    assert set(WINDOW_OVERRIDES) <= set(POLICIES), "an override names no registered policy"
    return [policy if policy in FAST_POLICIES else pytest.param(policy, marks=pytest.mark.slow)
            for policy in POLICIES]


@functools.cache
def full_cache_reference(max_new_tokens):
    hf, _ = tiny()
    return [hf_greedy(hf, p, max_new_tokens) for p in PROMPTS]


@pytest.mark.parametrize("policy", every_policy())
def test_budget_above_sequence_length_gives_exactly_the_full_cache_tokens(policy):
    _, model = tiny()
    max_new_tokens = 40  # longest prompt 19 + 40 < 64 = budget
    reference = full_cache_reference(max_new_tokens)
    eviction = EvictionConfig(policy=policy, **full_cache_knobs(policy))
    out = generate(model, PROMPTS, eviction=eviction, max_new_tokens=max_new_tokens,
                   eos_token_id=[], return_kept_positions=True)
    assert out.tokens == reference, policy
    assert out.stats["idle_steps"] == 0  # no EOS: every forward served a sequence
    # Every fed token is still in the cache, none twice.
    for b, prompt in enumerate(PROMPTS):
        fed = len(prompt) + max_new_tokens - 1
        for row in out.kept_positions[:, b].reshape(-1, out.kept_positions.shape[-1]):
            assert sorted(row[row >= 0].tolist()) == list(range(fed)), policy


@pytest.mark.parametrize("policy", ["gkv", pytest.param("streaming", marks=pytest.mark.slow),
                                    pytest.param("h2o", marks=pytest.mark.slow),
                                    pytest.param("snapkv", marks=pytest.mark.slow)])
def test_uneven_batch_equals_each_prompt_alone(policy):
    _, model = tiny()
    knobs = {"gkv": dict(budget=16, window=4, divide_length=6),
             "h2o": dict(budget=12, divide_length=5),
             "streaming": dict(budget=12, divide_length=5),
             "snapkv": dict(budget=14, window=4, divide_length=6)}[policy]
    eviction = EvictionConfig(policy=policy, **knobs)
    prompts = [RNG.integers(0, SPEC.vocab, n).tolist() for n in (3, 25, 11)]
    common = dict(eviction=eviction, max_new_tokens=30, eos_token_id=[],
                  return_kept_positions=True, return_logprobs=True)
    batch = generate(model, prompts, **common)
    # Sampled: row b draws with its own seed, 5 + b, so it equals the prompt alone with it.
    sampled = generate(model, prompts, temperature=0.9, top_p=0.95, seed=5, **common)
    for b, prompt in enumerate(prompts):
        alone = generate(model, [prompt], **common)
        assert batch.tokens[b] == alone.tokens[0]
        np.testing.assert_array_equal(_kept_sets(batch.kept_positions[:, b]),
                                      _kept_sets(alone.kept_positions[:, 0]))
        assert batch.kept_positions[:, b].max() == len(prompt) + 28
        alone = generate(model, [prompt], temperature=0.9, top_p=0.95, seed=5 + b, **common)
        assert sampled.tokens[b] == alone.tokens[0]
        np.testing.assert_allclose(sampled.logprobs[b], alone.logprobs[0], atol=1e-5)
    assert len({tuple(t) for t in sampled.tokens}) == 3


def test_per_prompt_seeds_and_repeated_prompts():
    _, model = tiny()
    kwargs = dict(eviction=EvictionConfig(policy="gkv", budget=16, window=4, divide_length=8),
                  max_new_tokens=20, eos_token_id=[], temperature=1.0)
    prompt = PROMPTS[0]
    # An int seed gives every row its own seed (seed + b): repeated prompts draw differently.
    repeated = generate(model, [prompt] * 3, seed=11, **kwargs)
    assert len({tuple(t) for t in repeated.tokens}) == 3
    # Explicit seeds, one per prompt: the same seed gives the same draw on any row.
    chosen = generate(model, [prompt] * 3, seed=[12, 11, 12], **kwargs)
    assert chosen.tokens == [repeated.tokens[1], repeated.tokens[0], repeated.tokens[1]]
    with pytest.raises(ValueError, match=r"seed: a list of seeds needs one per prompt \(3\)"):
        generate(model, [prompt] * 3, seed=[1, 2], **kwargs)
    with pytest.raises(ValueError, match=r"seed\[1\] must be an integer in \[0, 2\*\*32\)"):
        generate(model, [prompt] * 2, seed=[1, -2], **kwargs)


def _kept_sets(positions):
    return [sorted(row[row >= 0].tolist())
            for row in positions.reshape(-1, positions.shape[-1])]


def test_cache_shape_does_not_depend_on_max_new_tokens():
    _, model = tiny()
    eviction = EvictionConfig(policy="gkv", budget=32, divide_length=16)
    params = model.params()
    tokens = jnp.zeros((2, 16), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
    shapes = []
    for max_new_tokens in (64, 4096):
        _, state = jax.eval_shape(
            functools.partial(generate_tokens, model.config, eviction, max_new_tokens),
            params, tokens, positions, SamplingParams.create(), jnp.zeros((2,), jnp.int32),
            jnp.zeros((1,), jnp.int32))
        shapes.append(jax.tree.map(lambda x: x.shape, state.cache))
    assert shapes[0] == shapes[1]
    assert shapes[0].keys == (SPEC.layers, 2, SPEC.kv_heads, 32 + 16, SPEC.head_dim)


# Slow (the fast suite's cold time; CI runs it with the slow sweeps).
@pytest.mark.slow
def test_same_bucket_and_new_sampling_values_do_not_recompile():
    _, model = tiny()
    eviction = EvictionConfig(policy="gkv", budget=24, window=4, divide_length=8)
    generate(model, [PROMPTS[0]], eviction=eviction, max_new_tokens=20)
    before = compiled_programs()
    out = generate(model, [PROMPTS[2]], eviction=eviction, max_new_tokens=20,
                   temperature=0.7, top_p=0.9, top_k=5, seed=3)
    assert out.stats["compile_seconds"] == 0.0
    generate(model, [PROMPTS[0][:2]], eviction=eviction, max_new_tokens=20, temperature=1.3)
    assert compiled_programs() == before  # lengths 5, 12, 2 share the bucket 16
    generate(model, [PROMPTS[1] * 2], eviction=eviction, max_new_tokens=20)
    assert compiled_programs() == before + 1  # length 38: bucket 64
    assert bucket_length(38, None) == 64 and bucket_length(3, [8, 32]) == 8


def test_user_buckets_are_used_and_checked():
    _, model = tiny()
    out = generate(model, [PROMPTS[1]], max_new_tokens=4, prompt_buckets=[24, 48])
    assert out.stats["prompt_bucket"] == 24
    with pytest.raises(ValueError, match="prompt_buckets"):
        generate(model, [PROMPTS[1]], max_new_tokens=4, prompt_buckets=[8])


def test_sampling_is_seeded_and_filters_reduce_to_greedy():
    _, model = tiny()
    eviction = EvictionConfig(policy="gkv", budget=16, window=4, divide_length=8)
    kwargs = dict(eviction=eviction, max_new_tokens=30, eos_token_id=[])
    greedy = generate(model, PROMPTS, **kwargs)
    a = generate(model, PROMPTS, temperature=1.0, seed=1, **kwargs)
    b = generate(model, PROMPTS, temperature=1.0, seed=1, **kwargs)
    c = generate(model, PROMPTS, temperature=1.0, seed=2, **kwargs)
    assert a.tokens == b.tokens and a.tokens != c.tokens and a.tokens != greedy.tokens
    # numpy integers (seed, max_new_tokens, token ids) are integers; seeds fill [0, 2**32)
    as_numpy = dict(kwargs, max_new_tokens=np.int64(30))
    assert generate(model, [np.asarray(p) for p in PROMPTS], temperature=1.0,
                    seed=np.uint64(1), **as_numpy).tokens == a.tokens
    top = generate(model, PROMPTS, temperature=1.0, seed=2**32 - 1, **kwargs)
    assert top.tokens != a.tokens and top.stats["compile_seconds"] == 0.0
    assert generate(model, PROMPTS, temperature=1.0, top_k=1, seed=5, **kwargs).tokens == \
        greedy.tokens
    assert generate(model, PROMPTS, temperature=1.0, top_p=1e-6, seed=5, **kwargs).tokens == \
        greedy.tokens


def test_logprobs_are_those_of_the_model():
    hf, model = tiny()
    out = generate(model, [PROMPTS[0]], max_new_tokens=6, eos_token_id=[],
                   return_logprobs=True)
    sequence = torch.as_tensor([PROMPTS[0] + out.tokens[0]])
    with torch.no_grad():
        reference = torch.log_softmax(hf(sequence).logits[0].float(), dim=-1).numpy()
    P = len(PROMPTS[0])
    expected = [reference[P - 1 + j, t] for j, t in enumerate(out.tokens[0])]
    np.testing.assert_allclose(out.logprobs[0], expected, atol=1e-4)


# Slow (the fast suite's cold time): EOS mid-cycle is exact in test_engine.
@pytest.mark.slow
def test_eos_stops_a_sequence_and_freezes_its_cache():
    _, model = tiny()
    eviction = EvictionConfig(policy="gkv", budget=16, window=4, divide_length=6)
    free = generate(model, PROMPTS, eviction=eviction, max_new_tokens=30, eos_token_id=[])
    eos = free.tokens[1][14]  # forward 14 is not a compression step
    stop = free.tokens[1].index(eos)
    out = generate(model, PROMPTS, eviction=eviction, max_new_tokens=30, eos_token_id=eos,
                   return_kept_positions=True)
    assert out.tokens[1] == free.tokens[1][:stop + 1]
    cut = generate(model, [PROMPTS[1]], eviction=eviction, max_new_tokens=stop + 1,
                   eos_token_id=[], return_kept_positions=True)
    assert _kept_sets(out.kept_positions[:, 1]) == _kept_sets(cut.kept_positions[:, 0])
    for b in (0, 2):
        hits = [i for i, t in enumerate(free.tokens[b]) if t == eos]
        assert out.tokens[b] == free.tokens[b][:hits[0] + 1] if hits else free.tokens[b]


def test_stops_early_when_every_sequence_is_done():
    _, model = tiny()
    free = generate(model, [PROMPTS[0]], max_new_tokens=8, eos_token_id=[])
    eviction = EvictionConfig(policy="gkv", budget=24, window=4, divide_length=8)
    eos = free.tokens[0][2]
    stop = free.tokens[0].index(eos)
    out = generate(model, [PROMPTS[0]], eviction=eviction, max_new_tokens=400, eos_token_id=eos)
    assert out.tokens[0] == free.tokens[0][:stop + 1]
    assert out.stats["generated_tokens"] == stop + 1
    assert out.stats["forwards"] == 1 + 8  # the first cycle runs, then the loop stops
    # forward i produces token i: the forwards after the answer's last token ran idle
    assert out.stats["idle_steps"] == 9 - (stop + 1) > 0
    assert out.stats["forwards"] - out.stats["idle_steps"] == len(out.tokens[0])
    active_seconds = out.stats["run_seconds"] * (stop + 1) / 9
    assert out.stats["tokens_per_second"] == pytest.approx((stop + 1) / active_seconds)


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(SPEC.vocab - 3)}
    vocab |= {"<unk>": SPEC.vocab - 3, "<s>": SPEC.vocab - 2, "</s>": SPEC.vocab - 1}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = ("{% for m in messages %}<s> w1 {{ m['content'] }} w2 {% endfor %}"
                          "{% if add_generation_prompt %}w3{% endif %}")
    return fast


def test_string_prompts_with_chat_template_and_texts():
    _, model = tiny()
    tokenizer = _word_tokenizer()
    out = generate(model, ["w4 w5 w6"], tokenizer=tokenizer, max_new_tokens=5,
                   chat_template=True, system_prompt="w7")
    by_ids = generate(model, [[SPEC.vocab - 2, 1, 7, 2, SPEC.vocab - 2, 1, 4, 5, 6, 2, 3]],
                      max_new_tokens=5, eos_token_id=SPEC.vocab - 1)
    assert out.tokens == by_ids.tokens
    assert out.texts == [tokenizer.decode(out.tokens[0], skip_special_tokens=True)]


def test_eos_token_strings_are_looked_up_in_the_vocabulary():
    _, model = tiny()
    tokenizer = _word_tokenizer()
    eos = generation_inputs._eos_ids(["</s>", np.int64(3)], tokenizer, model.config)
    assert eos.tolist() == [SPEC.vocab - 1, 3]
    with pytest.raises(ValueError, match="eos_token_id 'stop' is not a token of the "
                                         "tokenizer's vocabulary"):
        generation_inputs._eos_ids("stop", tokenizer, model.config)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(prompts=[]), "prompts"),
    (dict(prompts=[[1, 2], []]), r"prompts\[1\]"),
    (dict(prompts=["w1 w2"]), "tokenizer"),
    (dict(max_new_tokens=600), "max_position_embeddings"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(prompts=[[1, 500]]), "prompts"),
    # each row: the bad value and the start of the message that names it
    (dict(max_new_tokens=None), r"max_new_tokens must be an integer >= 1, got None"),
    (dict(max_new_tokens=2.5), r"max_new_tokens must be an integer >= 1, got 2.5"),
    (dict(seed=1.7), r"seed must be an integer in \[0, 2\*\*32\), got 1.7"),
    (dict(seed="abc"), r"seed must be an integer in \[0, 2\*\*32\), got 'abc'"),
    (dict(seed=None), r"seed must be an integer in \[0, 2\*\*32\), got None"),
    (dict(seed=2**40), r"seed must be an integer in \[0, 2\*\*32\), got 1099511627776"),
    (dict(seed=-1), r"seed must be an integer in \[0, 2\*\*32\), got -1"),
    (dict(prompts=[[1.9, 5.2]]), r"prompts\[0\] must hold integer token ids .*got 1.9"),
    (dict(prompts=[["a", "b"]]), r"prompts\[0\] must hold integer token ids .*got 'a'"),
    (dict(prompts=[np.array([1.0, 2.0])]), r"prompts\[0\] must hold integer token ids"),
    (dict(temperature=float("inf")), r"temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), r"temperature must be a finite number >= 0"),
    (dict(temperature="0.7"), r"temperature must be a finite number >= 0 .*got '0.7'"),
    (dict(top_p=float("nan")), r"top_p must be in \(0, 1\], got nan"),
    (dict(top_k=2.5), r"top_k must be an integer in \[0, 2\*\*31\)"),
    (dict(eos_token_id="</s>"), r"eos_token_id '</s>' is not a token of \(no tokenizer=\)"),
    (dict(eos_token_id=1.5), r"eos_token_id must be a token id, a token string"),
    (dict(add_special_tokens=True), r"add_special_tokens applies to string prompts"),
    (dict(add_special_tokens="yes"), r"add_special_tokens must be True, False or None"),
])
def test_bad_arguments_name_the_parameter(kwargs, match):
    _, model = tiny()
    kwargs = {"prompts": [[1, 2, 3]], **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(model, kwargs.pop("prompts"), **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(policy="gkv", budget=16), r"budget must be > window \(=16\)"),
    (dict(policy="streaming", budget=8, sink=4, recent=8), "sink"),
    (dict(policy="lru", budget=64), "policy must be one of"),
    (dict(policy="gkv", budget=64, divide_length=0), "divide_length"),
    (dict(policy="streaming", budget=8, sink=10),
     r"sink must be < budget \(=8\) so that recent = budget - sink >= 1, got sink=10"),
    (dict(policy="streaming", budget=8, recent=8), r"recent must be < budget \(=8\)"),
    (dict(policy="gkv", budget=64.0), r"budget must be an integer >= 1, got 64.0"),
    (dict(policy="gkv", budget=True), r"budget must be an integer >= 1, got True"),
])
def test_bad_eviction_configs_name_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EvictionConfig(**kwargs)


def test_eviction_config_takes_numpy_integers_as_python_ints():
    config = EvictionConfig(policy="gkv", budget=np.int64(64), window=np.int32(4),
                            divide_length=np.uint16(8))
    assert config == EvictionConfig(policy="gkv", budget=64, window=4, divide_length=8)
    assert type(config.budget) is int and hash(config) == hash(
        EvictionConfig(policy="gkv", budget=64, window=4, divide_length=8))
    streaming = EvictionConfig(policy="streaming", budget=np.int64(8), sink=np.int64(2))
    assert (streaming.sink, streaming.recent, streaming.window) == (2, 6, 6)


# Slow (the fast suite's cold time): bfloat16 eviction is also covered by the kernel tests and the
# sharded tests.
@pytest.mark.slow
def test_bfloat16_model_decodes_batches_with_eviction():
    _, model = tiny()
    bf16 = conversion.model_from_weights(
        model.config, jax.tree.map(lambda x: x.astype(jnp.bfloat16), model.params()),
        jnp.bfloat16)
    eviction = EvictionConfig(policy="gkv", budget=16, window=4, divide_length=6)
    out = generate(bf16, PROMPTS, eviction=eviction, max_new_tokens=20, eos_token_id=[],
                   return_kept_positions=True)
    assert [len(t) for t in out.tokens] == [20, 20, 20]
    assert out.stats["compressions"] > 0
    # bfloat16 rounding may flip a near-tie, but most greedy tokens agree with float32.
    reference = generate(model, PROMPTS, eviction=eviction, max_new_tokens=20, eos_token_id=[])
    agree = np.mean([a == b for x, y in zip(out.tokens, reference.tokens, strict=True)
                     for a, b in zip(x, y, strict=True)])
    assert agree > 0.5
