"""The synthetic long chain-of-thought task of the bundled model: a register machine.

A problem is a random function table `f` on the digits, four registers a, b, c, d with
initial digits, and a number of steps n. The table names the entry of digit i by the letter
`KEYS[i]` (A for 0, B for 1, ..., J for 9). The model writes a numbered trace of n steps;
step i updates register X_i with Y_i (X_i, Y_i fixed by the step number, see `schedule`):

    X <- (f(X) + Y) mod 10

and then answers with the final values of a, b, c, d. Prompt and trace, for example:

    f A3 B7 C2 D9 E0 F5 G1 H8 I6 J4
    a4 b1 c8 d0 n40
    00 a4E0+d0=a0
    01 b1B7+c8=b5
    ...
    ans 0539

A step line shows the old value of X (4), the key of that digit in the table (E) and its
entry f(4) (0), the value of Y (d0) and the new value of X written right after its letter
("=a0"). So "the current value of a register is the digit after its latest occurrence" and
"f(x) is the digit after the latest occurrence of x's key". Getting the answer right needs
facts from all over the sequence: a table entry is re-read whenever its digit recurs, from
the prompt or from the last step that used it (often hundreds of tokens back); register d is
written only every 12th step but read every 4th, so its value is read up to ~170 tokens
after it was written; and the answer needs every register's last value. A trace is not
periodic (values depend on the table and the initial state), so copying an earlier stretch
of the trace never gives the next step.

Sizes: prompt 49 tokens with BOS (under 1/12 of a sequence), trace 14 tokens per step, 40
steps (560 tokens), answer 9 tokens, EOS; sequences of 619 tokens. Graded exactly.

The task's problems all have n = 40 steps. `sample_problem` can draw other lengths (training
mixes shorter traces in), but the bundled model learned where traces end from the step
numbers, not by reading `n` (see the README), so it is evaluated on 40-step problems only.
"""

from __future__ import annotations

import dataclasses
import random

REGISTERS = "abcd"
# Every symbol the task uses is one token; plus the special tokens.
KEYS = "ABCDEFGHIJ"  # the table's name for the entry of digit i
CHARACTERS = "0123456789abcdfns+= \n" + KEYS
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, BOS, EOS)
MIN_STEPS, MAX_STEPS = 40, 40  # the task's number of steps (see the module docstring)
SLOW_REGISTER_PERIOD = 12  # d is the target only at steps 11, 23, 35, ...


@dataclasses.dataclass(frozen=True)
class Problem:
    """One register-machine problem.

    Attributes:
      table: f(0..9) as a tuple of 10 digits.
      initial: initial digits of a, b, c, d.
      num_steps: length of the trace.
    """

    table: tuple[int, ...]
    initial: tuple[int, ...]
    num_steps: int

    @property
    def prompt(self) -> str:
        """The question: the table and the initial registers."""
        pairs = " ".join(f"{KEYS[x]}{y}" for x, y in enumerate(self.table))
        registers = " ".join(f"{r}{v}" for r, v in zip(REGISTERS, self.initial, strict=True))
        return f"f {pairs}\n{registers} n{self.num_steps:02d}\n"

    def solve(self) -> tuple[str, str]:
        """The reference trace and the answer (final a, b, c, d as a 4-digit string)."""
        values = dict(zip(REGISTERS, self.initial, strict=True))
        lines = []
        for step in range(self.num_steps):
            target, operand = schedule(step)
            old, other = values[target], values[operand]
            looked_up = self.table[old]
            new = (looked_up + other) % 10
            lines.append(f"{step:02d} {target}{old}{KEYS[old]}{looked_up}+{operand}{other}"
                         f"={target}{new}\n")
            values[target] = new
        answer = "".join(str(values[r]) for r in REGISTERS)
        return "".join(lines), answer

    @property
    def answer(self) -> str:
        return self.solve()[1]

    @property
    def completion(self) -> str:
        """What the model writes after the prompt: the trace and `ans DDDD`."""
        trace, answer = self.solve()
        return f"{trace}ans {answer}\n"


def schedule(step: int) -> tuple[str, str]:
    """(target X, operand Y) of a step: targets cycle a, b, c with d every 12th step;
    operands cycle d, c, b, a, skipping the target."""
    if step % SLOW_REGISTER_PERIOD == SLOW_REGISTER_PERIOD - 1:
        target = "d"
    else:
        target = "abc"[step % 3]
    operand = "dcba"[step % 4]
    if operand == target:
        operand = "dcba"[(step + 1) % 4]
    return target, operand


def sample_problem(rng: random.Random, min_steps: int = MIN_STEPS,
                   max_steps: int = MAX_STEPS) -> Problem:
    """A random problem; the task's problems have 40 steps (training also uses fewer)."""
    if not 1 <= min_steps <= max_steps <= 99:
        raise ValueError(f"need 1 <= min_steps <= max_steps <= 99, got {min_steps}, {max_steps}")
    return Problem(table=tuple(rng.randrange(10) for _ in range(10)),
                   initial=tuple(rng.randrange(10) for _ in REGISTERS),
                   num_steps=rng.randint(min_steps, max_steps))


def problems(seed: int, count: int) -> list[Problem]:
    """`count` problems drawn from `seed` (the same seed always gives the same problems)."""
    rng = random.Random(seed)
    return [sample_problem(rng) for _ in range(count)]


def extract_answer(text: str) -> str | None:
    """The 4-digit answer after the last `ans `, or None if there is none."""
    index = text.rfind("ans ")
    if index < 0:
        return None
    candidate = text[index + 4:index + 8]
    return candidate if len(candidate) == 4 and candidate.isdigit() else None


def grade(text: str, answer: str) -> bool:
    """Exact match of the extracted answer."""
    return extract_answer(text) == answer


def build_tokenizer():
    """A character-level `transformers` fast tokenizer for the task (one token per symbol)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for character in CHARACTERS:
        vocab[character] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=PAD))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, bos_token=BOS,
                                   eos_token=EOS, unk_token=PAD)
    fast.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    return fast
