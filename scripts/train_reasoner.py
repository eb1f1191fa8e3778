"""Trains the bundled reasoning model on the register-machine task (`gkv_jax.synthetic`).

A small Qwen2-architecture model (GQA, q/k/v bias) learns to write the step-by-step trace
and the answer, teacher-forced, with AdamW (warm-up + cosine). Every `--eval-every` steps
it decodes held-out problems greedily with a full cache through `gkv_jax.generate` and
reports exact-answer accuracy and per-step accuracy. Checkpoints (Orbax) go to `--run-dir`
and the run resumes from the latest one. At the end, and whenever held-out accuracy
improves, the model is exported in Hugging Face format (config.json, model.safetensors,
tokenizer files) to `--export-dir` with `gkv_jax.conversion.to_hf`.

    python scripts/train_reasoner.py --steps 2000   # the bundled model's recipe: README
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from gkv_jax import synthetic
from gkv_jax.conversion import model_from_weights, to_hf
from gkv_jax.generation import generate
from gkv_jax.models import ModelConfig, Transformer, forward

DEFAULT_EXPORT = os.path.join(os.path.dirname(__file__), "..", "gkv_jax", "assets", "reasoner")
EVAL_SEED = 0          # held-out problems: synthetic.problems(EVAL_SEED, n)
TRAIN_SEED = 12345     # training problems are drawn from here and never equal a held-out one
SEQUENCE_LENGTH = 640  # longest prompt + completion + EOS: 1 + 57 + 40 * 14 + 9 + 1 = 628
# Training mixes shorter traces in (cheaper, and the step rule is the same): a batch draws one
# length bucket, then problems whose number of steps fits it. Most batches are full length.
STEP_BUCKETS = ((1, 9, 0.15), (10, 18, 0.2), (19, 27, 0.2), (28, 40, 0.45))
# (min steps, max steps, probability); each bucket pads to its longest sequence (x16).


def model_config(tokenizer) -> ModelConfig:
    """4 layers x 256 wide, 4 query / 2 KV heads of 64: about 3.2M parameters."""
    return ModelConfig(
        family="qwen2", vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768,
        num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-6,
        rope_theta=10000.0, max_position_embeddings=1024, tie_word_embeddings=False,
        qkv_bias=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_ids=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id)


def encode(tokenizer, problem: synthetic.Problem) -> tuple[list[int], int]:
    """Token ids of BOS + prompt + completion + EOS, and the prompt's length (BOS included)."""
    prompt = [tokenizer.bos_token_id] + tokenizer(problem.prompt)["input_ids"]
    completion = tokenizer(problem.completion)["input_ids"] + [tokenizer.eos_token_id]
    return prompt + completion, len(prompt)


def padded_length(tokenizer, steps: int) -> int:
    """Tokens of the longest sequence with `steps` steps, rounded up to a multiple of 16."""
    longest = synthetic.Problem(table=(0,) * 10, initial=(0,) * 4, num_steps=steps)
    return -(-len(encode(tokenizer, longest)[0]) // 16) * 16


def batches(tokenizer, batch_size: int, seed: int, held_out: set, stop_weight: float = 1.0,
            min_steps: int = 1):
    """Endless (tokens [B, T], loss weights [B, T]) batches. The weights cover completion +
    EOS; the first token of every line (and EOS) gets `stop_weight`: that token decides
    between another step and the answer, once per sequence, and without extra weight the
    model settles for the prior of the number of steps instead of reading `n`. Problems have
    at least `min_steps` steps (buckets below it are dropped, the others clipped)."""
    rng = random.Random(seed)
    newline = tokenizer.convert_tokens_to_ids("\n")
    buckets = [(max(low, min_steps), high, p) for low, high, p in STEP_BUCKETS if high >= min_steps]
    weights = [bucket[2] for bucket in buckets]
    while True:
        low, max_steps, _ = rng.choices(buckets, weights)[0]
        length = padded_length(tokenizer, max_steps)
        tokens = np.full((batch_size, length), tokenizer.pad_token_id, np.int32)
        mask = np.zeros((batch_size, length), np.float32)
        row = 0
        while row < batch_size:
            problem = synthetic.sample_problem(rng, low, max_steps)
            if (problem.table, problem.initial) in held_out:
                continue
            ids, prompt_length = encode(tokenizer, problem)
            tokens[row, :len(ids)] = ids
            mask[row, prompt_length:len(ids)] = 1.0
            after_newline = np.flatnonzero(np.asarray(ids[prompt_length - 1:-1]) == newline)
            mask[row, prompt_length + after_newline] = stop_weight
            row += 1
        yield tokens, mask


def value_tokens(tokenizer, tokens: np.ndarray) -> np.ndarray:
    """[B, T] bool: the tokens that hold a fact, a register or table digit and the name
    before it ("a4", "E0" in "00 a4E0+d0=a0"); the rest is layout (step numbers, + = space)."""
    names = [tokenizer.convert_tokens_to_ids(c) for c in synthetic.REGISTERS + synthetic.KEYS]
    digits = [tokenizer.convert_tokens_to_ids(c) for c in "0123456789"]
    digit = np.isin(tokens, digits)
    named = np.zeros_like(digit)
    named[:, 1:] = digit[:, 1:] & np.isin(tokens[:, :-1], names)
    fact = named.copy()
    fact[:, :-1] |= named[:, 1:]
    return fact


def eviction_masks(rng: np.random.Generator, facts: np.ndarray, prompt_lengths: np.ndarray,
                   num_layers: int, num_kv_heads: int, evict_fraction: float) -> np.ndarray:
    """[L, B, K, T, T] bool: random evictions, so that the model learns to answer from
    whichever copies of the facts it still sees (a model trained only on full causal
    attention fails even when every needed fact is kept).

    A sequence is evicted with probability `evict_fraction` (else it sees everything).
    Then, per layer and KV head, key j stays visible to queries q < end_j: end_j = inf
    (kept for good) with probability 0.9 for a fact token and `keep` ~ U(0.1, 0.7) for a
    layout token, else end_j = j + window + delay, window ~ U{4..40}, delay ~ U{0..120}.
    Evictions are permanent and start after the prompt (`prompt_lengths` [B]), as during
    generation.
    """
    B, T = facts.shape
    shape = (num_layers, B, num_kv_heads, T)
    evicted = rng.random(B) < evict_fraction
    keep = np.where(facts, 0.9, rng.uniform(0.1, 0.7, (B, 1)))
    kept = (rng.random(shape) < keep[None, :, None]) | ~evicted[None, :, None, None]
    window = rng.integers(4, 41, (num_layers, B, num_kv_heads, 1))
    end = np.arange(T) + window + rng.integers(0, 121, shape)
    end = np.maximum(np.where(kept, T, end), prompt_lengths[None, :, None, None])
    return np.arange(T)[:, None] < end[..., None, :]


def loss_fn(config: ModelConfig, params, tokens, mask, kv_mask=None):
    """Mean next-token cross-entropy over the masked (completion) targets, and accuracy.
    `kv_mask`: optional [L, B, K, T-1, T-1] eviction masks on the inputs."""
    logits = forward(config, params, tokens[:, :-1], kv_mask=kv_mask)
    targets, weights = tokens[:, 1:], mask[:, 1:]
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    counted = weights > 0
    correct = (jnp.argmax(logits, axis=-1) == targets) & counted
    accuracy = correct.sum() / jnp.maximum(counted.sum(), 1)
    return (nll * weights).sum() / jnp.maximum(weights.sum(), 1.0), accuracy


def make_optimizer(steps: int, peak_lr: float, warmup: int):
    schedule = optax.warmup_cosine_decay_schedule(0.0, peak_lr, warmup, steps, peak_lr * 0.01)
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=0.01))


def make_train_step(config: ModelConfig, optimizer):
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, tokens, mask, kv_mask=None):
        (loss, accuracy), grads = jax.value_and_grad(
            functools.partial(loss_fn, config), has_aux=True)(params, tokens, mask, kv_mask)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, accuracy
    return train_step


def evaluate_exact(config, params, tokenizer, problems, batch_size: int = 50) -> dict:
    """Greedy full-cache decoding of held-out problems: exact-answer accuracy, and the
    fraction of trace lines that are right (per step index, to see where errors sit)."""
    model = model_from_weights(config, params)
    correct, line_hits, line_counts = 0, np.zeros(synthetic.MAX_STEPS), np.zeros(
        synthetic.MAX_STEPS)
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        prompts = [encode(tokenizer, p)[0][:encode(tokenizer, p)[1]] for p in chunk]
        out = generate(model, prompts, max_new_tokens=SEQUENCE_LENGTH - 60,
                       eos_token_id=tokenizer.eos_token_id, prompt_buckets=[64])
        for problem, tokens in zip(chunk, out.tokens, strict=True):
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            correct += synthetic.grade(text, problem.answer)
            got = text.split("\n")
            for i, line in enumerate(problem.completion.split("\n")[:problem.num_steps]):
                line_counts[i] += 1
                line_hits[i] += i < len(got) and got[i] == line
    per_step = (line_hits / np.maximum(line_counts, 1)).round(3).tolist()
    return {"exact": correct / len(problems), "line_accuracy": per_step}


def export(config, params, tokenizer, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    to_hf(model_from_weights(config, params), directory)
    tokenizer.save_pretrained(directory)
    # transformers would pick the Qwen2 tokenizer class from config.json; ours is a plain
    # `tokenizers` JSON, so name the generic fast class (gkv_jax.load honours it).
    path = os.path.join(directory, "tokenizer_config.json")
    with open(path) as f:
        tokenizer_config = json.load(f)
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(path, "w") as f:
        json.dump(tokenizer_config, f, indent=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--eval-problems", type=int, default=50)
    parser.add_argument("--stop-weight", type=float, default=10.0,
                        help="loss weight of each line's first token (step or answer?)")
    parser.add_argument("--min-train-steps", type=int, default=1,
                        help="train only on problems with at least this many steps")
    parser.add_argument("--evict-fraction", type=float, default=0.0,
                        help="fraction of sequences trained under random evictions")
    parser.add_argument("--stop-at", type=int, default=None,
                        help="save a checkpoint and exit after this step (to resume later)")
    parser.add_argument("--run-dir", default="runs/reasoner")
    parser.add_argument("--export-dir", default=DEFAULT_EXPORT)
    args = parser.parse_args()
    if not 1 <= args.min_train_steps <= synthetic.MAX_STEPS:
        parser.error(f"--min-train-steps must be in [1, {synthetic.MAX_STEPS}], "
                     f"got {args.min_train_steps}")
    if args.stop_weight <= 0:
        parser.error(f"--stop-weight must be > 0, got {args.stop_weight}")
    if not 0.0 <= args.evict_fraction <= 1.0:
        parser.error(f"--evict-fraction must be in [0, 1], got {args.evict_fraction}")
    if args.stop_at is not None and not 1 <= args.stop_at <= args.steps:
        parser.error(f"--stop-at must be in [1, --steps={args.steps}], got {args.stop_at}")

    tokenizer = synthetic.build_tokenizer()
    config = model_config(tokenizer)
    optimizer = make_optimizer(args.steps, args.lr, args.warmup)
    params = Transformer(config, dtype=jnp.float32, rngs=nnx.Rngs(args.seed)).params()
    opt_state = optimizer.init(params)
    run_dir = os.path.abspath(args.run_dir)
    manager = ocp.CheckpointManager(run_dir, options=ocp.CheckpointManagerOptions(max_to_keep=2))
    start = 0
    if manager.latest_step() is not None:
        start = manager.latest_step()
        restored = manager.restore(start, args=ocp.args.StandardRestore(
            {"params": params, "opt_state": opt_state}))
        params, opt_state = restored["params"], restored["opt_state"]
        print(f"resumed from step {start}", flush=True)
    held_out_problems = synthetic.problems(EVAL_SEED, 1000)
    held_out = {(p.table, p.initial) for p in held_out_problems}
    eval_problems = held_out_problems[:args.eval_problems]
    data = batches(tokenizer, args.batch_size, TRAIN_SEED + start, held_out, args.stop_weight,
                   args.min_train_steps)
    train_step = make_train_step(config, optimizer)
    mask_rng = np.random.default_rng(TRAIN_SEED + start)
    print(f"{config}\nparameters: {config.num_parameters():,}", flush=True)
    best = -1.0
    tic = time.perf_counter()
    for step in range(start + 1, args.steps + 1):
        tokens, mask = next(data)
        kv_mask = None
        if args.evict_fraction > 0:
            prompt_lengths = np.argmax(mask > 0, axis=1)
            kv_mask = eviction_masks(mask_rng, value_tokens(tokenizer, tokens[:, :-1]),
                                     prompt_lengths, config.num_layers, config.num_kv_heads,
                                     args.evict_fraction)
        params, opt_state, loss, accuracy = train_step(params, opt_state, tokens, mask, kv_mask)
        if step % 25 == 0 or step == start + 1:
            elapsed = time.perf_counter() - tic
            print(json.dumps({"step": step, "loss": round(float(loss), 5),
                              "token_accuracy": round(float(accuracy), 5),
                              "seconds": round(elapsed, 1)}), flush=True)
        if step == args.stop_at and step % args.eval_every:
            manager.save(step, args=ocp.args.StandardSave(
                {"params": params, "opt_state": opt_state}))
        if step % args.eval_every == 0 or step == args.steps:
            manager.save(step, args=ocp.args.StandardSave(
                {"params": params, "opt_state": opt_state}))
            result = evaluate_exact(config, params, tokenizer, eval_problems)
            print(json.dumps({"step": step, "eval": result}), flush=True)
            if result["exact"] >= best:
                best = result["exact"]
                export(config, params, tokenizer, args.export_dir)
                print(f"exported to {args.export_dir} (held-out exact {best:.3f})", flush=True)
        if step == args.stop_at:
            print(f"stopped after step {step} (--stop-at)", flush=True)
            break
    manager.wait_until_finished()


if __name__ == "__main__":
    main()
