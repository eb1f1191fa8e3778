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


@pytest.mark.parametrize("shape, view", [
    ((300, 200), lambda w: w.T),                       # transposed, not a multiple of 128
    ((96, 130), lambda w: w.T.reshape(130, 3, 32)),    # a projection into heads
    ((96, 130), lambda w: w.reshape(3, 32, 130)),      # contiguous innermost axis
    ((257,), lambda w: w),
    # Above the size the copy splits over threads (rows per thread, or tiles per thread):
    ((2500, 1100), lambda w: w.T),
    ((2500, 1100), lambda w: w),
    ((2500, 1100), lambda w: w.T.reshape(1100, 20, 125)),   # q/k/v: trailing axes merge
    ((2500, 1100), lambda w: w.T.reshape(20, 125, 1100)),   # o: leading axes merge
    ((2500, 1100), lambda w: w.T.reshape(1100, 20, 125)[:, ::2]),  # neither merges
])
def test_the_blocked_copy_equals_a_plain_copy(shape, view):
    from gkv_jax.conversion.fast_copy import _copy_blocked

    source = view(np.random.default_rng(0).integers(0, 2**16, shape, dtype=np.uint16))
    destination = np.zeros(source.shape, np.uint16)
    _copy_blocked(destination, source, block=64)
    np.testing.assert_array_equal(destination, source)


def test_to_hf_streams_one_shard_at_a_time(qwen2_hf, tmp_path, capsys):
    """The host holds one shard's tensors and their serialised copy at a time, never the
    whole model twice (numpy and bytes allocations traced); the shards reload exactly."""
    import tracemalloc

    from gkv_jax.conversion.export import hf_tensors

    model = conversion.from_hf(qwen2_hf)
    tensors = hf_tensors(model)
    model_bytes = sum(t.nbytes for t in tensors)
    largest = max(t.nbytes for t in tensors)
    max_shard = max(model_bytes // 10, largest)
    tracemalloc.start()
    try:
        conversion.to_hf(model, tmp_path, max_shard_bytes=max_shard)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= 2 * max_shard + 2 * largest < model_bytes, (peak, max_shard, model_bytes)
    with open(tmp_path / "model.safetensors.index.json") as f:
        index = json.load(f)
    assert index["metadata"]["total_size"] == model_bytes
    assert list(index["weight_map"]) == [t.name for t in tensors]
    shard_sizes = {}
    for t in tensors:
        shard_sizes[index["weight_map"][t.name]] = (
            shard_sizes.get(index["weight_map"][t.name], 0) + t.nbytes)
    assert len(shard_sizes) >= 10 and max(shard_sizes.values()) <= max_shard
    assert "to_hf shards" in capsys.readouterr().err  # a bar over several shards
    assert _leaves_equal(conversion.from_hf(tmp_path).params(), model.params())
    conversion.to_hf(model, tmp_path, max_shard_bytes=max_shard, progress=False)
    assert "to_hf shards" not in capsys.readouterr().err
    with pytest.raises(ValueError, match="max_shard_bytes must be an integer >= 1"):
        conversion.to_hf(model, tmp_path, max_shard_bytes=0)


def test_loading_shows_a_progress_bar_over_the_tensors_when_asked(qwen2_dir, capsys):
    """Off by default for a checkpoint this small (a load of milliseconds), on with
    progress=True, counting every tensor read; gkv_jax.load passes it through."""
    from safetensors import safe_open

    conversion.from_hf(qwen2_dir)
    assert "loading tensors" not in capsys.readouterr().err
    conversion.from_hf(qwen2_dir, progress=True)
    err = capsys.readouterr().err
    count = 0
    for name in os.listdir(qwen2_dir):
        if name.endswith(".safetensors"):
            with safe_open(str(qwen2_dir / name), framework="numpy") as handle:
                count += len(list(handle.keys()))
    assert "loading tensors" in err and f"{count}/{count}" in err, err[-500:]
    gkv_jax.load(qwen2_dir, progress=True)
    assert "loading tensors" in capsys.readouterr().err


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
    model_as_stored, _ = gkv_jax.load(tmp_path)  # dtype=None: the checkpoint's own
    assert model_as_stored.dtype == jnp.float32


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


# ------------------------------------------------- re-export, and errors that name the file
def test_to_hf_over_a_sharded_export_leaves_no_stale_shards(qwen2_hf, tmp_path):
    first = conversion.from_hf(qwen2_hf)
    second = conversion.model_from_weights(
        first.config, jax.tree.map(lambda w: w * 2, first.params()))
    conversion.to_hf(first, tmp_path, max_shard_bytes=200_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    (tmp_path / "README.md").write_text("my notes")
    conversion.to_hf(second, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "config.json", "model.safetensors"]
    assert _leaves_equal(conversion.from_hf(tmp_path).params(), second.params())


@pytest.fixture()
def qwen2_copy(qwen2_dir, tmp_path):
    """A sharded checkpoint to damage."""
    import shutil

    return shutil.copytree(qwen2_dir, tmp_path / "copy")


def _first_shard(directory):
    with open(directory / "model.safetensors.index.json") as f:
        return directory / sorted(set(json.load(f)["weight_map"].values()))[0]


def test_config_json_without_a_field_names_file_and_field(qwen2_copy):
    config = json.loads((qwen2_copy / "config.json").read_text())
    del config["num_attention_heads"]
    (qwen2_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json: missing required field "
                                         r"'num_attention_heads'"):
        conversion.from_hf(qwen2_copy)


def test_config_json_cut_short_names_file_and_position(qwen2_copy):
    text = (qwen2_copy / "config.json").read_text()
    (qwen2_copy / "config.json").write_text(text[:len(text) // 2])
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON \(.* at line \d+ "
                                         r"column \d+\); is the file truncated"):
        gkv_jax.load(qwen2_copy)


@pytest.mark.parametrize("damage", ["half", "last 8 bytes", "first 100 bytes", "random"])
def test_damaged_safetensors_names_the_shard(qwen2_copy, damage):
    shard = _first_shard(qwen2_copy)
    data = shard.read_bytes()
    shard.write_bytes({"half": data[:len(data) // 2], "last 8 bytes": data[:-8],
                       "first 100 bytes": data[:100],
                       "random": np.random.default_rng(0).bytes(4096)}[damage])
    with pytest.raises(ConversionError, match="truncated or corrupt") as err:
        conversion.from_hf(qwen2_copy)
    assert str(shard) in str(err.value)


def test_integer_weights_are_rejected_naming_tensor_and_file(qwen2_hf, tmp_path):
    from safetensors.numpy import save_file

    model = conversion.from_hf(qwen2_hf)
    state = conversion.hf_state_dict(model)
    for i in range(QWEN2.layers):
        key = f"model.layers.{i}.mlp.down_proj.weight"
        state[key] = (state[key] * 1000).astype(np.int32)
    conversion.to_hf(model, tmp_path)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"model\.layers\.0\.mlp\.down_proj\.weight in "
                                              r".*model\.safetensors: stored as int32; "
                                              "weights must be floating point"):
        conversion.from_hf(tmp_path)


def test_load_checkpoint_on_a_hugging_face_dir_says_so(qwen2_dir):
    with pytest.raises(ValueError, match=r"is a Hugging Face checkpoint .* gkv_jax\.load"):
        conversion.load_checkpoint(qwen2_dir)
