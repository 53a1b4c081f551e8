"""``jaxrnn sample``: print text sampled from a language model that ``jaxrnn train`` checkpointed.

The model is rebuilt from the checkpoint's metadata (configuration and
vocabulary) and the samples are one call of
:func:`jaxrnn.models.generate` on ``--num-samples`` copies of the prompt
with the key ``jax.random.key(--seed)``: the same seed prints the same text.
Each sample is printed as the prompt followed by its continuation; with
several, each is preceded by a ``--- sample i ---`` line.

Example:
  $ jaxrnn sample --checkpoint-dir runs/lm --prompt "The " --length 300 --temperature 0.8 --top-p 0.9
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np

from jaxrnn.cli import lm_common
from jaxrnn.cli.args import Parser, UsageError, number, positive_int
from jaxrnn.models import generate

__all__ = ["build_parser", "main", "prepare", "run", "sample"]

temperature = number(float, lambda v: v >= 0, "a finite number >= 0")
probability = number(float, lambda v: 0 < v <= 1, "a probability in (0, 1]")


def build_parser() -> Parser:
    p = Parser(prog="jaxrnn sample", description="Print text sampled from a language model checkpointed by jaxrnn train.")
    p.add_argument("--checkpoint-dir", default=os.path.join("runs", "lm"), metavar="DIR", help="the run's checkpoints (%(default)s)")
    p.add_argument("--prompt", default=None, help="start of every sample (default: the first token of the training text)")
    p.add_argument("--length", type=positive_int, default=200, help="tokens sampled after the prompt (%(default)s)")
    p.add_argument("--temperature", type=temperature, default=1.0, help="softmax temperature (%(default)s; 0 is greedy)")
    p.add_argument("--top-k", type=positive_int, default=None, help="sample among the k most likely tokens only")
    p.add_argument("--top-p", type=probability, default=None, help="sample from the smallest set of probability >= p")
    p.add_argument("--seed", type=lm_common.seed, default=0, help="PRNG seed (%(default)s)")
    p.add_argument("--num-samples", type=positive_int, default=1, help="samples to print (%(default)s)")
    return p


def prepare(args):
    """``(loaded model, prompt ids)``, after checking the checkpoint, the prompt and ``--top-k`` against the vocabulary."""
    loaded = lm_common.load_lm(args.checkpoint_dir)
    vocab = loaded.vocab
    prompt = loaded.metadata["data"]["first_token"] if args.prompt is None else args.prompt
    if not vocab.tokenize(prompt):
        raise UsageError("--prompt: expected at least one token")
    if vocab.level == "char":
        missing = sorted(set(prompt) - set(vocab.chars))
        if missing:
            raise UsageError(f"--prompt: characters {''.join(missing)!r} are not in the model's vocabulary")
    if args.top_k is not None and args.top_k > vocab.size:
        raise UsageError(f"--top-k: expected at most {vocab.size} (the vocabulary size), got {args.top_k}")
    return loaded, vocab.encode(prompt)


def sample(loaded, prompt_ids, args):
    """The ``--num-samples`` texts (prompt + continuation): one :func:`jaxrnn.models.generate` call."""
    prompts = np.tile(prompt_ids[None, :], (args.num_samples, 1))
    tokens = generate(
        loaded.model, loaded.params, jax.random.key(args.seed), prompts, args.length, args.temperature,
        top_k=args.top_k, top_p=args.top_p,
    )  # fmt: skip
    return [loaded.vocab.decode(np.concatenate([prompt_ids, row])) for row in np.asarray(tokens)]


def main(argv=None) -> int:
    """Print the samples; returns the exit status (2 for a bad command line or checkpoint, before sampling)."""
    return lm_common.run_command("jaxrnn sample", build_parser, prepare, run, argv)


def run(args, loaded, prompt_ids) -> int:
    """Sample and print."""
    texts = sample(loaded, prompt_ids, args)
    for i, text in enumerate(texts, start=1):
        if len(texts) > 1:
            print(f"--- sample {i} ---")
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
