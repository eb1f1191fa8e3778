"""The synthetic long chain-of-thought task of the bundled model: a table walk.

A problem is a random function table `f` on the digits, written in the prompt as ten
entries in shuffled order, each named by a key letter (`KEYS[i]`, A for 0 ... J for 9),
and a two-digit start state `ab`. The model writes 50 numbered lines; line i looks up the
entry of digit i mod 3 and takes one step of the walk:

    line i:  "ii K v ab"   K = KEYS[i mod 3], v = f(i mod 3),
                           (a, b) = (b', (a' + v) mod 10) from the previous state (a', b')

and then answers with the final state. Prompt and completion, for example:

    H5 I9 E1 A1 J3 G6 F5 C7 B5 D8
    s 87
    00 A 1 79
    01 B 5 92
    02 C 7 26
    03 A 1 63
    ...
    49 B 5 36
    ans 36

Three of the ten entries (A-C) are read, each re-read periodically all through the trace
(entry K at lines K, K + 3, ...: every 30 tokens, the last time 470-500 tokens after the
prompt); the other seven are never needed. The state needs only the previous line. So the
working set is small (three entries and the last line) and a cache of 1/8 of the sequence
that keeps the entries as they come round again can answer, while one that keeps only
recent tokens cannot: the prompt's table is gone from 64 recent tokens from line 6 on, and
the bundled model reads the table from the prompt (its trace writes "K v", not the
prompt's "Kv", and it was trained never to need the copies). One wrong entry changes
every later state, and the answer is graded exactly. No (state, line number mod 3) pair
repeats within a problem (the generator redraws problems whose walk does), so the trace is
not periodic and copying an earlier stretch never gives the next line.

Sizes: prompt 36 tokens with BOS (7% of a sequence), trace 10 tokens per line, 50 lines
(500 tokens), answer 7 tokens, EOS; sequences of 544 tokens.

The chained variant (`lookup="chained"`, the dataset "synthetic-chain", the second bundled
model's task) keys each look-up by the walk itself: line i reads the entry of b, the
second digit of the previous state, so each look-up's result chooses a later one (a
multi-hop chain through the table). Every one of the ten entries is needed, at times no
fixed schedule predicts, so the working set is the whole table and the last line:

    line i:  "ii K v ab"   K = KEYS[b'], v = f(b'),  (a, b) = (b', (a' + v) mod 10)

Its step is a bijection of the 100 states, so a walk is a cycle; the generator keeps the
walks that visit no state twice within the trace.
"""

from __future__ import annotations

import dataclasses
import random
import re

KEYS = "ABCDEFGHIJ"  # the table's name for the entry of digit i
# Every symbol the task uses is one token; plus the special tokens.
CHARACTERS = "0123456789ans \n" + KEYS
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, BOS, EOS)
NUM_STEPS = 50  # lines of every problem's trace
PERIOD = 3      # line i reads the entry of digit i mod PERIOD
LOOKUPS = ("periodic", "chained")  # which entry a line reads: by line number, or by state
_ANSWER = re.compile(r"ans (\d\d)(?!\d)")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One table-walk problem.

    Attributes:
      table: f(0..9) as a tuple of 10 digits.
      order: the order of the digits whose entries the prompt lists (a permutation of 0..9).
      start: the start state, two digits (a, b).
      num_steps: lines of the trace (`NUM_STEPS` for the task; training also uses prefixes).
      period: line i reads the entry of digit i mod period (`PERIOD` for the task; the
        bundled model's earlier training phases used 10 and 5).
      compact: write a line's entry as "Kv" (the bundled model's first training phases)
        instead of "K v" (the task).
      lookup: "periodic" (line i reads digit i mod period) or "chained" (line i reads the
        second digit of the previous state; `period` is then unused).
    """

    table: tuple[int, ...]
    order: tuple[int, ...]
    start: tuple[int, int]
    num_steps: int = NUM_STEPS
    period: int = PERIOD
    compact: bool = False
    lookup: str = "periodic"

    def read_digit(self, step: int, state: tuple[int, int]) -> int:
        """The digit whose entry line `step` reads, from the state before it."""
        return state[1] if self.lookup == "chained" else step % self.period

    @property
    def prompt(self) -> str:
        """The question: the table entries in `order`, then the start state."""
        entries = " ".join(f"{KEYS[x]}{self.table[x]}" for x in self.order)
        return f"{entries}\ns {self.start[0]}{self.start[1]}\n"

    def states(self) -> list[tuple[int, int]]:
        """The num_steps + 1 states of the walk, the start state first."""
        states = [self.start]
        for i in range(self.num_steps):
            a, b = states[-1]
            states.append((b, (a + self.table[self.read_digit(i, (a, b))]) % 10))
        return states

    def solve(self) -> tuple[str, str]:
        """The reference trace (one line per step) and the answer (the final state)."""
        states = self.states()
        gap = "" if self.compact else " "
        reads = [self.read_digit(i, state) for i, state in enumerate(states[:-1])]
        lines = [f"{i:02d} {KEYS[x]}{gap}{self.table[x]} {a}{b}\n"
                 for i, (x, (a, b)) in enumerate(zip(reads, states[1:], strict=True))]
        return "".join(lines), "".join(map(str, states[-1]))

    @property
    def answer(self) -> str:
        return self.solve()[1]

    @property
    def completion(self) -> str:
        """What the model writes after the prompt: the trace and `ans DD`."""
        trace, answer = self.solve()
        return f"{trace}ans {answer}\n"


def walk_repeats(table: tuple[int, ...], start: tuple[int, int], num_steps: int,
                 period: int = PERIOD, lookup: str = "periodic") -> bool:
    """Whether the walk from `start` meets the same (state, step mod period) twice within
    `num_steps` steps (from then on the trace would repeat itself); chained: the same
    state."""
    states = Problem(table, tuple(range(10)), start, num_steps, period,
                     lookup=lookup).states()[:-1]
    phase = 1 if lookup == "chained" else period
    phases = [(state, i % phase) for i, state in enumerate(states)]
    return len(set(phases)) < len(phases)


def sample_problem(rng: random.Random, num_steps: int = NUM_STEPS,
                   period: int = PERIOD, compact: bool = False,
                   lookup: str = "periodic") -> Problem:
    """A random problem whose walk does not repeat a (state, step mod period) pair
    (chained: a state) within `num_steps` steps."""
    if not 1 <= num_steps <= 99:
        raise ValueError(f"num_steps must be in [1, 99], got {num_steps}")
    if not 1 <= period <= 10:
        raise ValueError(f"period must be in [1, 10], got {period}")
    if lookup not in LOOKUPS:
        raise ValueError(f"lookup must be one of {LOOKUPS}, got {lookup!r}")
    while True:
        table = tuple(rng.randrange(10) for _ in range(10))
        start = (rng.randrange(10), rng.randrange(10))
        if not walk_repeats(table, start, num_steps, period, lookup):
            order = tuple(rng.sample(range(10), 10))
            return Problem(table=table, order=order, start=start, num_steps=num_steps,
                           period=period, compact=compact, lookup=lookup)


def problems(seed: int, count: int, period: int = PERIOD, compact: bool = False,
             lookup: str = "periodic") -> list[Problem]:
    """`count` problems drawn from `seed` (the same seed always gives the same problems)."""
    rng = random.Random(seed)
    return [sample_problem(rng, period=period, compact=compact, lookup=lookup)
            for _ in range(count)]


def extract_answer(text: str) -> str | None:
    """The two digits after the last `ans `, or None if there are none."""
    matches = _ANSWER.findall(text)
    return matches[-1] if matches else None


def grade(text: str, answer: str) -> bool:
    """Exact match of the extracted answer."""
    return extract_answer(text) == answer


def build_tokenizer():
    """A character-level `transformers` fast tokenizer for the task (one token per symbol).

    Like most LLM tokenizers, `tokenizer(text)` starts with BOS, the token every training
    sequence of the bundled model starts with; `tokenizer(text, add_special_tokens=False)`
    gives the bare characters (for continuations).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for character in CHARACTERS:
        vocab[character] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=PAD))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, vocab[BOS])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, bos_token=BOS,
                                   eos_token=EOS, unk_token=PAD)
    fast.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    return fast
