"""HF <-> Flax conversion: every source kind, round trips, Orbax, and strict errors."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import gkv_jax
from gkv_jax import conversion
from gkv_jax.conversion import ConversionError
from tests.helpers import SPEC_BY_NAME, hf_logits, tiny_hf_model

QWEN2 = SPEC_BY_NAME["qwen2-h32-g2-untied"]
QWEN3_TIED = SPEC_BY_NAME["qwen3-h32-g2-tied"]
IDS = np.random.default_rng(0).integers(0, QWEN2.vocab, size=(2, 12))


@pytest.fixture(scope="module")
def qwen2_hf():
    return tiny_hf_model(QWEN2)


@pytest.fixture(scope="module")
def qwen2_dir(qwen2_hf, tmp_path_factory):
    """The tiny model saved by transformers as several safetensors shards + index."""
    directory = tmp_path_factory.mktemp("qwen2_hf")
    qwen2_hf.save_pretrained(directory, max_shard_size="100KB")
    return directory


def _leaves_equal(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(
        lambda x, y: x.dtype == y.dtype and bool((np.asarray(x) == np.asarray(y)).all()), a, b)))


def test_every_source_kind_gives_the_same_weights(qwen2_hf, qwen2_dir):
    assert os.path.exists(os.path.join(qwen2_dir, "model.safetensors.index.json"))
    from_model = conversion.from_hf(qwen2_hf)
    from_dir = conversion.from_hf(qwen2_dir)
    from_pair = conversion.from_hf((qwen2_hf.state_dict(), qwen2_hf.config))
    assert _leaves_equal(from_model.params(), from_dir.params())
    assert _leaves_equal(from_model.params(), from_pair.params())


def test_bfloat16_conversion_casts_once_and_stays_close(qwen2_hf, qwen2_dir):
    model = conversion.from_hf(qwen2_dir, dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(model.params())} == {jnp.dtype(jnp.bfloat16)}
    reference = conversion.from_hf(qwen2_hf, dtype=jnp.float32)
    np.testing.assert_array_equal(
        np.asarray(model.params()["layers"]["q_proj"]),
        np.asarray(reference.params()["layers"]["q_proj"].astype(jnp.bfloat16)))
    logits = np.asarray(model(jnp.asarray(IDS)))
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, hf_logits(qwen2_hf, IDS), atol=0.25)


@pytest.mark.parametrize("spec_name", ["qwen2-h32-g2-untied", "llama-h32-g1-llama3rope",
                                       "qwen3-h32-g2-tied"])
def test_to_hf_round_trip_gives_identical_logits(spec_name, tmp_path):
    spec = SPEC_BY_NAME[spec_name]
    hf = tiny_hf_model(spec)
    model = conversion.from_hf(hf)
    conversion.to_hf(model, tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = IDS % spec.vocab
    np.testing.assert_array_equal(hf_logits(reloaded, ids), hf_logits(hf, ids))
    assert _leaves_equal(conversion.from_hf(tmp_path).params(), model.params())


def test_to_hf_writes_shards_with_an_index(qwen2_hf, tmp_path):
    model = conversion.from_hf(qwen2_hf)
    conversion.to_hf(model, tmp_path, max_shard_bytes=200_000)
    with open(tmp_path / "model.safetensors.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    assert len(set(weight_map.values())) > 1
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    np.testing.assert_array_equal(hf_logits(reloaded, IDS), hf_logits(qwen2_hf, IDS))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_orbax_round_trip_is_bit_exact(qwen2_hf, tmp_path, dtype):
    model = conversion.from_hf(qwen2_hf, dtype=dtype)
    conversion.save_checkpoint(model, tmp_path / "ckpt")
    restored = conversion.load_checkpoint(tmp_path / "ckpt")
    assert restored.config == model.config
    assert _leaves_equal(restored.params(), model.params())
    with pytest.raises(FileExistsError, match="path"):
        conversion.save_checkpoint(model, tmp_path / "ckpt")


def test_tied_checkpoint_may_store_an_identical_head():
    hf = tiny_hf_model(QWEN3_TIED)
    state = dict(hf.state_dict())
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    conversion.from_hf((state, hf.config))
    state["lm_head.weight"] = state["lm_head.weight"] + 1.0
    with pytest.raises(ConversionError, match="lm_head.weight"):
        conversion.from_hf((state, hf.config))


# ------------------------------------------------------------------------------- errors
def test_missing_tensor_is_named(qwen2_hf):
    state = dict(qwen2_hf.state_dict())
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ConversionError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        conversion.from_hf((state, qwen2_hf.config))


def test_unexpected_tensor_is_named(qwen2_hf):
    state = dict(qwen2_hf.state_dict())
    state["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(QWEN2.heads * QWEN2.head_dim)
    with pytest.raises(ConversionError, match=r"o_proj\.bias.*unexpected"):
        conversion.from_hf((state, qwen2_hf.config))


def test_wrong_shape_names_key_and_both_shapes(qwen2_hf):
    state = dict(qwen2_hf.state_dict())
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 128)
    with pytest.raises(ConversionError,
                       match=r"k_proj\.weight: expected shape \(64, 128\), got \(32, 128\)"):
        conversion.from_hf((state, qwen2_hf.config))


@pytest.mark.parametrize("field, value, match", [
    ("use_sliding_window", True, "use_sliding_window"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}, "yarn"),
    ("hidden_act", "gelu", "hidden_act"),
    ("model_type", "gpt2", "model_type"),
    ("partial_rotary_factor", 0.5, "partial_rotary_factor"),
])
def test_unsupported_config_field_is_rejected(qwen2_hf, field, value, match):
    config = qwen2_hf.config.to_dict()
    config[field] = value
    with pytest.raises(ValueError, match=match):
        gkv_jax.ModelConfig.from_hf_config(config)


def test_llama_attention_bias_is_rejected():
    config = SPEC_BY_NAME["llama-h64-g2-tied"].hf_config().to_dict()
    config["attention_bias"] = True
    with pytest.raises(ValueError, match="attention_bias"):
        gkv_jax.ModelConfig.from_hf_config(config)


@pytest.mark.parametrize("dtype", ["float64", "int8", "fp8"])
def test_unknown_dtype_name_is_rejected(qwen2_hf, dtype):
    with pytest.raises(ValueError, match="dtype must be one of"):
        conversion.from_hf(qwen2_hf, dtype=dtype)


def test_nonexistent_paths_are_rejected(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="source"):
        conversion.from_hf(missing)
    with pytest.raises(FileNotFoundError, match="source"):
        gkv_jax.load(missing)
    with pytest.raises(FileNotFoundError, match="path"):
        conversion.load_checkpoint(missing)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(QWEN2.hf_config().to_dict()))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        conversion.from_hf(tmp_path / "empty")


# ------------------------------------------------------------------------------ load()
def _save_tiny_tokenizer(directory, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size - 1)} | {"<unk>": vocab_size - 1}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")
    fast.save_pretrained(directory)


def test_load_reads_model_and_tokenizer_offline(qwen2_hf, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    qwen2_hf.save_pretrained(tmp_path)
    _save_tiny_tokenizer(tmp_path, QWEN2.vocab)
    model, tokenizer = gkv_jax.load(str(tmp_path), dtype="float32")
    assert tokenizer("w3 w5")["input_ids"] == [3, 5]
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(IDS))), hf_logits(qwen2_hf, IDS),
                               atol=1e-4)
    model_bf16, _ = gkv_jax.load(tmp_path)
    assert model_bf16.dtype == jnp.bfloat16


def test_load_passes_only_hub_ids_to_huggingface_hub(monkeypatch, tmp_path, qwen2_hf):
    import huggingface_hub

    qwen2_hf.save_pretrained(tmp_path)
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append(repo_id)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model, tokenizer = gkv_jax.load("some-org/some-model", dtype="float32")
    assert calls == ["some-org/some-model"] and tokenizer is None
    gkv_jax.load(tmp_path, dtype="float32")
    assert calls == ["some-org/some-model"]
    with pytest.raises(FileNotFoundError):
        gkv_jax.load("./not/a/dir")
    assert len(calls) == 1
