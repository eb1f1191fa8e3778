"""Trains the bundled reasoning model on the table-walk task (`gkv_jax.synthetic`).

A small Qwen2-architecture model (GQA, q/k/v bias) learns to write the step-by-step trace
and the answer, teacher-forced, with AdamW (warm-up + cosine). Batches mix prefixes of the
trace (cheaper; every line follows the same rule) with whole sequences (the only place
where the answer follows line 49); `--evict-fraction` trains part of them under random
permanent evictions so that the model answers from whatever part of its context an eviction
policy leaves it (a model trained only on full attention fails even when every needed token
is kept). Every `--eval-every` steps it decodes held-out problems greedily with a full
cache through `gkv_jax.generate` and reports exact-answer accuracy and per-step accuracy.
Checkpoints (Orbax) go to `--run-dir` and the run resumes from the latest one. At the end,
and whenever held-out accuracy improves, the model is exported in Hugging Face format
(config.json, model.safetensors, tokenizer files) to `--export-dir` with
`gkv_jax.conversion.to_hf`.

    bash scripts/train_reasoner.sh   # the bundled model's recipe (docs/bundled-model.md)
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
from gkv_jax.loading import load
from gkv_jax.models import ModelConfig, Transformer, forward

DEFAULT_EXPORT = os.path.join(os.path.dirname(__file__), "..", "gkv_jax", "assets", "reasoner")
EVAL_SEED = 0          # held-out problems: synthetic.problems(EVAL_SEED, n)
TRAIN_SEED = 12345     # training problems are drawn from here and never equal a held-out one
SEQUENCE_LENGTH = 544  # prompt + completion + EOS: 36 + 50 * 10 + 7 + 1
PROMPT_BUCKET = 48     # every prompt is 36 tokens
# A batch draws one bucket: (fewest lines, most lines). A prefix of k < 50 lines has no
# answer; the last bucket is the whole sequence with its answer and EOS, drawn with
# probability `whole_share` (the prefixes share the rest equally). Each bucket pads to its
# longest sequence (x16).
LINE_BUCKETS = ((4, 16), (17, 33), (50, 50))


def model_config(tokenizer) -> ModelConfig:
    """4 layers x 256 wide, 4 query / 2 KV heads of 64: about 3.2M parameters."""
    return ModelConfig(
        family="qwen2", vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768,
        num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-6,
        rope_theta=10000.0, max_position_embeddings=1024, tie_word_embeddings=False,
        qkv_bias=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_ids=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id)


def encode(tokenizer, problem: synthetic.Problem, lines: int | None = None
           ) -> tuple[list[int], int]:
    """Token ids of BOS + prompt + completion + EOS, and the prompt's length (BOS included).
    With `lines` < problem.num_steps: BOS + prompt + the first `lines` lines of the trace."""
    def bare(text: str) -> list[int]:  # the characters only (the tokenizer would add BOS)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prompt = [tokenizer.bos_token_id] + bare(problem.prompt)
    if lines is not None and lines < problem.num_steps:
        trace = "".join(problem.completion.splitlines(keepends=True)[:lines])
        return prompt + bare(trace), len(prompt)
    completion = bare(problem.completion) + [tokenizer.eos_token_id]
    return prompt + completion, len(prompt)


def problem_key(problem: synthetic.Problem) -> tuple:
    return problem.table, problem.order, problem.start


def batches(tokenizer, batch_size: int, seed: int, held_out: set, answer_weight: float = 1.0,
            period: int = synthetic.PERIOD, compact: bool = False, whole_share: float = 0.4,
            lookup: str = "periodic"):
    """Endless (tokens [B, T], loss weights [B, T]) batches of prefixes or whole sequences
    (`LINE_BUCKETS`); the weights cover the completion (and EOS), the answer line and EOS
    with `answer_weight` (it comes once per whole sequence, after 50 lines)."""
    rng = random.Random(seed)
    prefix_share = (1.0 - whole_share) / (len(LINE_BUCKETS) - 1)
    weights = [prefix_share] * (len(LINE_BUCKETS) - 1) + [whole_share]
    while True:
        low, high = rng.choices(LINE_BUCKETS, weights)[0]
        # every problem of a bucket has the same length: measure it on any one
        longest = len(encode(tokenizer, synthetic.Problem(
            (0,) * 10, tuple(range(10)), (0, 0), compact=compact), high)[0])
        tokens = np.full((batch_size, -(-longest // 16) * 16), tokenizer.pad_token_id, np.int32)
        mask = np.zeros(tokens.shape, np.float32)
        row = 0
        while row < batch_size:
            problem = synthetic.sample_problem(rng, period=period, compact=compact,
                                               lookup=lookup)
            if problem_key(problem) in held_out:
                continue
            ids, prompt_length = encode(tokenizer, problem, rng.randint(low, high))
            tokens[row, :len(ids)] = ids
            mask[row, prompt_length:len(ids)] = 1.0
            if ids[-1] == tokenizer.eos_token_id:
                mask[row, len(ids) - len("ans DD\n") - 1:len(ids)] = answer_weight
            row += 1
        yield tokens, mask


def value_tokens(tokenizer, tokens: np.ndarray) -> np.ndarray:
    """[B, T] bool: the tokens that hold a fact, a table entry's key letter and digit ("H8",
    in the prompt and in every line that looked it up); the rest is layout (step numbers,
    states, spaces), needed only by the next line."""
    keys = [tokenizer.convert_tokens_to_ids(c) for c in synthetic.KEYS]
    digits = [tokenizer.convert_tokens_to_ids(c) for c in "0123456789"]
    entry = np.zeros(tokens.shape, bool)
    entry[:, 1:] = np.isin(tokens[:, 1:], digits) & np.isin(tokens[:, :-1], keys)
    fact = entry.copy()
    fact[:, :-1] |= entry[:, 1:]
    return fact


def eviction_masks(rng: np.random.Generator, facts: np.ndarray, prompt_lengths: np.ndarray,
                   num_layers: int, num_kv_heads: int, evict_fraction: float,
                   min_window: int = 4, fact_keep: float = 0.9,
                   layout_keep: tuple[float, float] = (0.1, 0.7), max_delay: int = 120
                   ) -> np.ndarray:
    """[L, B, K, T, T] bool: random evictions, so that the model learns to answer from
    whichever copies of the facts it still sees (a model trained only on full causal
    attention fails even when every needed fact is kept).

    A sequence is evicted with probability `evict_fraction` (else it sees everything).
    Then, per layer and KV head, key j stays visible to queries q < end_j: end_j = inf
    (kept for good) with probability `fact_keep` for a fact token and `keep` ~ U(*layout_keep)
    (per sequence) for a layout token, else end_j = j + window + delay, window ~
    U{min_window..40}, delay ~ U{0..max_delay}: a query always sees the `min_window` tokens
    before it, as a generation always keeps its observation window. Small `layout_keep` and
    `max_delay` give contexts as sparse as a cache of 1/8 of the sequence.
    Evictions are permanent and start after the prompt (`prompt_lengths` [B]), as during
    generation.
    """
    B, T = facts.shape
    shape = (num_layers, B, num_kv_heads, T)
    evicted = rng.random(B) < evict_fraction
    keep = np.where(facts, fact_keep, rng.uniform(*layout_keep, (B, 1)))
    kept = (rng.random(shape) < keep[None, :, None]) | ~evicted[None, :, None, None]
    window = rng.integers(min_window, max(min_window, 40) + 1,
                          (num_layers, B, num_kv_heads, 1))
    end = np.arange(T) + window + rng.integers(0, max_delay + 1, shape)
    end = np.maximum(np.where(kept, T, end), prompt_lengths[None, :, None, None])
    return np.arange(T)[:, None] < end[..., None, :]


def initial_params(config: ModelConfig, init_from: str | None, seed: int):
    """Random weights, or those of the model saved in `init_from`, which must have the same
    parameter names and shapes as `config`'s."""
    params = Transformer(config, dtype=jnp.float32, rngs=nnx.Rngs(seed)).params()
    if init_from is None:
        return params
    saved = load(init_from, dtype="float32")[0].params()
    shapes = jax.tree.map(jnp.shape, params)
    if jax.tree.map(jnp.shape, saved) != shapes:
        raise ValueError(f"--init-from: {init_from} holds a model whose parameters differ in "
                         f"names or shapes from this script's ({config.num_parameters():,} "
                         f"parameters)")
    return saved


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
    fraction of trace lines that are right (per line index, to see where errors sit)."""
    model = model_from_weights(config, params)
    correct = 0
    line_hits, line_counts = np.zeros(synthetic.NUM_STEPS), np.zeros(synthetic.NUM_STEPS)
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        prompts = [encode(tokenizer, p, 0)[0] for p in chunk]
        out = generate(model, prompts, max_new_tokens=SEQUENCE_LENGTH - len(prompts[0]),
                       eos_token_id=tokenizer.eos_token_id, prompt_buckets=[PROMPT_BUCKET])
        for problem, tokens in zip(chunk, out.tokens, strict=True):
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            correct += synthetic.grade(text, problem.answer)
            got = text.split("\n")
            for i, line in enumerate(problem.completion.split("\n")[:problem.num_steps]):
                line_counts[i] += 1
                line_hits[i] += i < len(got) and got[i] == line
    per_line = (line_hits / np.maximum(line_counts, 1)).round(3).tolist()
    return {"exact": correct / len(problems), "line_accuracy": per_line}


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
    parser.add_argument("--evict-fraction", type=float, default=0.0,
                        help="fraction of sequences trained under random evictions")
    parser.add_argument("--evict-min-window", type=int, default=16,
                        help="tokens before a query that an eviction never hides")
    parser.add_argument("--evict-fact-keep", type=float, default=0.9,
                        help="probability that an eviction keeps a table entry for good")
    parser.add_argument("--evict-layout-keep", type=float, nargs=2, default=(0.1, 0.7),
                        metavar=("LOW", "HIGH"),
                        help="a sequence keeps each layout token for good with probability "
                             "U(LOW, HIGH)")
    parser.add_argument("--evict-max-delay", type=int, default=120,
                        help="an evicted token stays visible up to this many tokens after "
                             "its window")
    parser.add_argument("--answer-weight", type=float, default=1.0,
                        help="loss weight of the answer line and EOS")
    parser.add_argument("--period", type=int, default=synthetic.PERIOD,
                        help="line i reads the entry of digit i mod PERIOD (the task: "
                             f"{synthetic.PERIOD}; the bundled model's first phases: 10)")
    parser.add_argument("--lookup", default="periodic", choices=synthetic.LOOKUPS,
                        help="which entry a line reads: by line number (the bundled model) "
                             "or by the previous state (the chained model)")
    parser.add_argument("--whole-share", type=float, default=0.4,
                        help="share of batches of whole sequences (the rest are prefixes)")
    parser.add_argument("--compact-lines", action="store_true",
                        help='write entries as "Kv" instead of "K v" (the first phases)')
    parser.add_argument("--stop-at", type=int, default=None,
                        help="save a checkpoint and exit after this step (to resume later)")
    parser.add_argument("--init-from", default=None,
                        help="start from this Hugging Face directory's weights (e.g. "
                             "gkv_jax/assets/reasoner) with a fresh optimizer, not at random")
    parser.add_argument("--run-dir", default="runs/reasoner")
    parser.add_argument("--export-dir", default=DEFAULT_EXPORT)
    args = parser.parse_args()
    if not 0.0 <= args.evict_fraction <= 1.0:
        parser.error(f"--evict-fraction must be in [0, 1], got {args.evict_fraction}")
    if not 1 <= args.evict_min_window <= SEQUENCE_LENGTH:
        parser.error(f"--evict-min-window must be in [1, {SEQUENCE_LENGTH}], "
                     f"got {args.evict_min_window}")
    if not 0.0 <= args.evict_fact_keep <= 1.0:
        parser.error(f"--evict-fact-keep must be in [0, 1], got {args.evict_fact_keep}")
    if not 0.0 <= args.whole_share <= 1.0:
        parser.error(f"--whole-share must be in [0, 1], got {args.whole_share}")
    low, high = args.evict_layout_keep
    if not 0.0 <= low <= high <= 1.0:
        parser.error(f"--evict-layout-keep must be LOW HIGH with 0 <= LOW <= HIGH <= 1, "
                     f"got {low} {high}")
    if not 0 <= args.evict_max_delay <= SEQUENCE_LENGTH:
        parser.error(f"--evict-max-delay must be in [0, {SEQUENCE_LENGTH}], "
                     f"got {args.evict_max_delay}")
    if args.answer_weight <= 0:
        parser.error(f"--answer-weight must be > 0, got {args.answer_weight}")
    if not 1 <= args.period <= 10:
        parser.error(f"--period must be in [1, 10], got {args.period}")
    if args.stop_at is not None and not 1 <= args.stop_at <= args.steps:
        parser.error(f"--stop-at must be in [1, --steps={args.steps}], got {args.stop_at}")

    tokenizer = synthetic.build_tokenizer()
    config = model_config(tokenizer)
    optimizer = make_optimizer(args.steps, args.lr, args.warmup)
    params = initial_params(config, args.init_from, args.seed)
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
    held_out_problems = synthetic.problems(EVAL_SEED, 1000, args.period, args.compact_lines,
                                           args.lookup)
    held_out = {problem_key(p) for p in held_out_problems}
    eval_problems = held_out_problems[:args.eval_problems]
    data = batches(tokenizer, args.batch_size, TRAIN_SEED + start, held_out, args.answer_weight,
                   args.period, args.compact_lines, args.whole_share, args.lookup)
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
                                     args.evict_fraction, args.evict_min_window,
                                     args.evict_fact_keep, tuple(args.evict_layout_keep),
                                     args.evict_max_delay)
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
