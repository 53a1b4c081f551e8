"""What ``jaxrnn train``, ``jaxrnn sample`` and ``jaxrnn eval`` share: the text, the model, its checkpoint.

A training run stores, in the metadata of every checkpoint that
:func:`jaxrnn.train.fit` writes, everything the other two commands need to
rebuild the model and its data:

* ``"model": "lm"`` (:data:`MODEL`): a :class:`jaxrnn.models.LanguageModel`
  checkpoint (``sample`` and ``eval`` refuse anything else);
* ``"config"``: the model's configuration (:func:`model_config`, rebuilt by
  :func:`build_model`);
* ``"vocab"``: :meth:`jaxrnn.data.Vocab.to_dict`;
* ``"data"``: where the text came from (a file's absolute path, or ``None``
  for the embedded corpus), its length and SHA-256, the token level and the
  validation fraction, so that the same split can be made again
  (:func:`corpus_of_metadata`);
* ``"training"``: batch, window, ``stateful`` and seed (a resumed run must
  keep them).

The text is split by position: the first 90% trains, the last 10% validates
(:data:`VAL_FRACTION`). The vocabulary is that of the whole text (every
character of the validation part is in it, as in the demo). Training windows
are either random (:func:`random_windows`) or consecutive windows of
``batch`` parallel streams with the recurrent state carried from one window
to the next (:func:`stream_windows`, truncated BPTT). Validation reads the
whole validation split with :func:`jaxrnn.models.lm.evaluate`.

:mod:`benchmarks.studies.shakespeare` trains with the same functions.

Example:
  >>> corpus = load_corpus(None, "char")
  >>> config = model_config(corpus.vocab.size, cell="lstm", hidden=64)
  >>> model = build_model(config)
  >>> params, history = fit_lm(model, model.init(jax.random.key(0)), corpus.train_ids, corpus.val_ids,
  ...                          batch=16, window=64, steps=100, learning_rate=3e-3,
  ...                          metadata=make_metadata(config, corpus, batch=16, window=64, stateful=False, seed=0))
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrnn import data, train
from jaxrnn.cells import GRU, LSTM, Elman
from jaxrnn.cli.args import UsageError, number, read_text_file
from jaxrnn.models import lm
from jaxrnn.stack import Stack
from jaxrnn.train.checkpoint import CheckpointStore

__all__ = [
    "CELLS",
    "Corpus",
    "EVAL_WINDOW",
    "LoadedLM",
    "MODEL",
    "VAL_FRACTION",
    "build_model",
    "check_windows",
    "corpus_of_metadata",
    "describe_model",
    "evaluate_split",
    "fit_lm",
    "load_corpus",
    "load_lm",
    "make_loss",
    "make_mesh",
    "make_metadata",
    "model_config",
    "random_windows",
    "read_metadata",
    "run_command",
    "same_run",
    "seed",
    "stream_windows",
    "training_batches",
]

#: ``metadata["model"]`` of a language-model checkpoint of ``jaxrnn train``.
MODEL = "lm"
#: The trailing fraction of the text held out for validation.
VAL_FRACTION = 0.1
#: Tokens read per step of :func:`jaxrnn.models.lm.evaluate` (memory only: the carry runs on).
EVAL_WINDOW = 256
#: ``--cell`` names.
CELLS = {"lstm": LSTM, "gru": GRU, "elman": Elman}
CONFIG_KEYS = (
    "vocab_size", "cell", "hidden", "layers", "embed", "tie_weights",
    "dropout", "dropout_mode", "embedding_dropout", "impl",
)  # fmt: skip

seed = number(int, lambda v: 0 <= v < 2**31, "an integer in [0, 2**31)")


# --------------------------------------------------------------------------
# The text
# --------------------------------------------------------------------------
class Corpus(NamedTuple):
    """A text as token ids, split by position.

    Attributes:
      text: the whole text.
      vocab: its :class:`jaxrnn.data.Vocab` (of the whole text).
      train_ids: the leading ``1 - VAL_FRACTION`` of the ids.
      val_ids: the trailing :data:`VAL_FRACTION` of the ids.
      data: the ``"data"`` metadata (source path or ``None``, length, SHA-256, level, ...).
    """

    text: str
    vocab: data.Vocab
    train_ids: np.ndarray
    val_ids: np.ndarray
    data: Dict[str, Any]

    @property
    def source(self) -> str:
        """``'the embedded corpus'`` or the file's path, quoted."""
        path = self.data["text"]
        return "the embedded corpus" if path is None else repr(path)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_corpus(
    path: Optional[str],
    level: str = "char",
    min_count: int = 1,
    vocab: Optional[data.Vocab] = None,
    limit: Optional[int] = None,
) -> Corpus:
    """The text of ``path`` (``None``: the embedded corpus), tokenised at ``level`` and split 90/10 by position.

    Args:
      path: a UTF-8 text file, or ``None``.
      level: ``"char"`` or ``"word"``.
      min_count: tokens seen fewer times become ``<unk>`` (word level).
      vocab: use this vocabulary instead of the text's own (a checkpoint's).
      limit: use only the first ``limit`` characters of the text.

    Raises:
      UsageError: a missing, empty or binary file (naming ``--text``).
    """
    text = data.default_text() if path is None else read_text_file(path, "--text")
    text = text if limit is None else text[:limit]
    if vocab is None:
        try:
            vocab = data.Vocab.from_text(text, level, min_count=min_count)
        except ValueError as e:
            raise UsageError(f"--min-count: {str(e).removeprefix('min_count: ')}") from None
    ids = vocab.encode(text)
    train_ids, val_ids = data.train_val_split(ids, VAL_FRACTION)
    if val_ids.size < 2 or train_ids.size < 2:
        raise UsageError(
            f"--text: expected a text whose last {VAL_FRACTION:.0%} holds at least 2 {level} tokens (to validate on), "
            f"got {ids.size} tokens in all"
        )
    meta = {
        "text": None if path is None else os.path.abspath(path),
        "length": len(text),
        "sha256": sha256(text),
        "limit": limit,
        "level": level,
        "min_count": min_count,
        "val_fraction": VAL_FRACTION,
        "train_tokens": int(train_ids.size),
        "val_tokens": int(val_ids.size),
        "first_token": vocab.tokens[int(ids[0])],
    }
    return Corpus(text, vocab, train_ids, val_ids, meta)


def corpus_of_metadata(metadata: Dict[str, Any], vocab: data.Vocab) -> Corpus:
    """The training text of a checkpoint, split as the run split it.

    Raises:
      UsageError: the recorded file is missing or no longer the text the model was trained on.
    """
    info = metadata.get("data")
    if not isinstance(info, dict) or not {"text", "level", "min_count", "sha256"} <= set(info):
        raise UsageError(f"--checkpoint-dir: the checkpoint's metadata does not say which text trained the model (data: {info!r})")
    path = info["text"]
    if path is not None and not os.path.isfile(path):
        raise UsageError(f"--checkpoint-dir: the training text {path!r} recorded in the checkpoint is missing; pass --text")
    corpus = load_corpus(path, info["level"], info["min_count"], vocab=vocab, limit=info.get("limit"))
    if corpus.data["sha256"] != info["sha256"]:
        where = "the embedded corpus" if path is None else repr(path)
        raise UsageError(f"--checkpoint-dir: the training text {where} has changed since the model was trained on it")
    return corpus


# --------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------
def model_config(
    vocab_size: int,
    *,
    cell: str = "lstm",
    hidden: int = 128,
    layers: int = 1,
    embed: int = 32,
    tie_weights: bool = False,
    dropout: float = 0.0,
    dropout_mode: str = "per_step",
    embedding_dropout: float = 0.0,
    impl: str = "auto",
) -> Dict[str, Any]:
    """The JSON configuration of a language model (``metadata["config"]``), checked by building it."""
    config = dict(
        vocab_size=int(vocab_size), cell=cell, hidden=int(hidden), layers=int(layers), embed=int(embed),
        tie_weights=bool(tie_weights), dropout=float(dropout), dropout_mode=dropout_mode,
        embedding_dropout=float(embedding_dropout), impl=impl,
    )  # fmt: skip
    build_model(config)
    return config


def build_model(config: Dict[str, Any]) -> lm.LanguageModel:
    """The :class:`~jaxrnn.models.LanguageModel` of a :func:`model_config` dict."""
    if not isinstance(config, dict) or set(config) != set(CONFIG_KEYS) or config["cell"] not in CELLS:
        raise ValueError(f"config: expected a language-model configuration with the keys {list(CONFIG_KEYS)}, got {config!r}")
    stack = Stack(
        CELLS[config["cell"]](config["hidden"]), config["layers"], dropout=config["dropout"], dropout_mode=config["dropout_mode"]
    )
    return lm.LanguageModel(
        config["vocab_size"], stack, embed_size=config["embed"], impl=config["impl"],
        tie_weights=config["tie_weights"], embedding_dropout=config["embedding_dropout"],
    )  # fmt: skip


def describe_model(config: Dict[str, Any]) -> str:
    """``'LSTM 2x256, embedding 64'`` and the options that differ from the defaults."""
    text = f"{CELLS[config['cell']].__name__} {config['layers']}x{config['hidden']}, embedding {config['embed']}"
    if config["tie_weights"]:
        text += ", tied"
    if config["dropout"] and config["layers"] > 1:
        text += f", dropout {config['dropout']:g} ({config['dropout_mode']})"
    if config["embedding_dropout"]:
        text += f", embedding dropout {config['embedding_dropout']:g}"
    return text


def uses_dropout(model: lm.LanguageModel) -> bool:
    return model.stack.uses_dropout or model.embedding_dropout > 0


def make_metadata(config, corpus: Corpus, *, batch: int, window: int, stateful: bool, seed: int) -> Dict[str, Any]:
    """The checkpoint metadata of a run (see the module docstring)."""
    training = {"batch": int(batch), "window": int(window), "stateful": bool(stateful), "seed": int(seed)}
    return {"model": MODEL, "config": config, "vocab": corpus.vocab.to_dict(), "data": corpus.data, "training": training}


class LoadedLM(NamedTuple):
    """A language model read back from a checkpoint of ``jaxrnn train``."""

    model: lm.LanguageModel
    params: lm.LMParams
    vocab: data.Vocab
    metadata: Dict[str, Any]
    step: int


def read_metadata(checkpoint_dir: str):
    """``(step, metadata)`` of the latest checkpoint in ``checkpoint_dir``, or ``(None, None)`` if it holds none.

    Raises:
      UsageError: ``checkpoint_dir`` is not a directory.
    """
    if not os.path.isdir(checkpoint_dir):
        what = "is not a directory" if os.path.exists(checkpoint_dir) else "does not exist"
        raise UsageError(f"--checkpoint-dir: {checkpoint_dir!r} {what}")
    store = CheckpointStore(checkpoint_dir, max_to_keep=None, read_only=True)
    try:
        step = store.latest_step()
        return (None, None) if step is None else (step, store.read_meta(step).get("metadata", {}))
    finally:
        store.close()


def load_lm(checkpoint_dir: str) -> LoadedLM:
    """The model, parameters and vocabulary of the latest checkpoint of ``jaxrnn train`` in ``checkpoint_dir``.

    Raises:
      UsageError: no such directory, no checkpoint in it, or a checkpoint of another model.
    """
    step, metadata = read_metadata(checkpoint_dir)
    if step is None:
        raise UsageError(f"--checkpoint-dir: {checkpoint_dir!r} holds no checkpoint")
    if metadata.get("model") != MODEL:
        raise UsageError(
            f"--checkpoint-dir: {checkpoint_dir!r} holds a checkpoint of another model "
            f"(metadata model {metadata.get('model')!r}, expected {MODEL!r}: a language model of 'jaxrnn train')"
        )
    try:
        model = build_model(metadata.get("config"))
        vocab = data.Vocab.from_dict(metadata.get("vocab"))
        if vocab.size != model.vocab_size:
            raise ValueError(f"vocab: {vocab.size} tokens for a model of {model.vocab_size}")
        params, _ = train.load_checkpoint(checkpoint_dir, jax.eval_shape(model.init, jax.random.key(0)), step=step)
    except (TypeError, ValueError) as e:
        raise UsageError(f"--checkpoint-dir: {checkpoint_dir!r} holds an unreadable language-model checkpoint ({e})") from None
    return LoadedLM(model, params, vocab, metadata, step)


def evaluate_split(model, params, ids, streams: int = 1) -> lm.Evaluation:
    """:func:`jaxrnn.models.lm.evaluate` of a whole split, :data:`EVAL_WINDOW` tokens per scan step, ``streams`` streams."""
    return lm.evaluate(model, params, ids, window=EVAL_WINDOW, batch=streams)


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------
def check_windows(train_ids, batch: int, window: int, stateful: bool) -> None:
    """A :class:`UsageError` naming ``--window`` if the training split cannot hold the windows."""
    need = (window + 1) * (batch if stateful else 1)
    if train_ids.size < need:
        how = f"{batch} streams (--batch) of window + 1" if stateful else "window + 1"
        raise UsageError(
            f"--window: {window} is too long for a training split of {train_ids.size} tokens "
            f"(it must hold {how} = {need} tokens)"
        )


def random_windows(train_ids, batch: int, window: int, seed: int):
    """``batches(i)``: ``(batch, window + 1)`` windows at random offsets, a function of ``(seed, i)`` only."""
    ids = np.asarray(train_ids, np.int32)
    offsets = np.arange(window + 1)

    def batches(i):
        starts = np.random.default_rng([seed, i]).integers(0, ids.size - window, size=batch)
        return ids[starts[:, None] + offsets[None, :]]

    return batches


def stream_windows(train_ids, batch: int, window: int):
    """``batches(i)``: window ``i`` of ``batch`` parallel streams, ``(batch, window + 1)``.

    The training split is cut into ``batch`` contiguous streams; batch ``i``
    holds tokens ``o .. o + window`` of every stream, ``o = (i mod W) *
    window`` (consecutive windows overlap by one token, so every token is
    predicted once per epoch of ``W`` batches). With the carry passed from
    batch to batch this is truncated BPTT; after the last window of an epoch
    the streams start again from their beginnings with the carry they have.
    """
    ids = np.asarray(train_ids, np.int32)
    length = ids.size // batch
    streams = ids[: length * batch].reshape(batch, length)
    per_epoch = (length - 1) // window

    def batches(i):
        start = (i % per_epoch) * window
        return streams[:, start : start + window + 1]

    return batches


def training_batches(train_ids, *, batch: int, window: int, stateful: bool, seed: int):
    """:func:`stream_windows` with ``stateful``, else :func:`random_windows`."""
    return stream_windows(train_ids, batch, window) if stateful else random_windows(train_ids, batch, window, seed)


def make_loss(model: lm.LanguageModel, stateful: bool):
    """The ``loss_fn`` of :func:`jaxrnn.train.fit` for ``(B, L)`` windows: mean NLL in nats per token.

    With ``stateful`` it is ``loss_fn(params, tokens, carry) -> (loss, new_carry)``
    (the carry enters the model as its ``initial_carry``); both take ``key=``
    (dropout) when the model has dropout.
    """

    def loss_fn(params, tokens, carry=None, *, key=None):
        if not stateful:
            return lm.loss(model, params, tokens, dropout_key=key)
        logits, new_carry = model.apply(params, tokens[:, :-1], initial_carry=carry, dropout_key=key)
        return jnp.mean(lm.token_nll(logits, tokens[:, 1:])), new_carry

    return loss_fn


def make_mesh(devices: int):
    """``None`` for one device, else a 1-D ``("data",)`` mesh of the first ``devices`` devices (``AxisType.Auto``).

    Raises:
      UsageError: fewer devices exist.
    """
    available = jax.devices()
    if devices > len(available):
        raise UsageError(
            f"--devices: {devices} requested, but only {len(available)} {available[0].platform} device(s) exist"
        )
    if devices == 1:
        return None
    return jax.make_mesh((devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=available[:devices])


def fit_lm(
    model: lm.LanguageModel,
    params,
    train_ids,
    val_ids,
    *,
    batch: int,
    window: int,
    steps: int,
    stateful: bool = False,
    seed: int = 0,
    optimizer=None,
    learning_rate: Optional[float] = 3e-3,
    clip: Optional[float] = 1.0,
    batches=None,
    eval_every: Optional[int] = None,
    eval_streams: int = 1,
    eval_fn=None,
    mesh=None,
    **fit_kwargs,
):
    """Train a language model with :func:`jaxrnn.train.fit`; ``(params, history)``.

    Args:
      model, params: the model and its initial parameters.
      train_ids, val_ids: the splits (``val_ids`` is scored whole by :func:`evaluate_split`).
      batch, window: ``(batch, window + 1)`` token windows per step.
      steps: the step the run ends at (counted over resumes).
      stateful: consecutive windows with the carry passed on (:func:`stream_windows`).
      seed: the random windows' and the dropout masks' seed.
      optimizer: an optax factory ``lambda lr: ...`` (default Adam) or transformation (then ``learning_rate=None``).
      learning_rate, clip: the learning rate and global gradient-norm clip.
      batches: the batches instead of :func:`training_batches` (e.g. an iterator that stops on a time budget).
      eval_every: steps between validations on the whole ``val_ids`` (``{"val_loss": nats per token}``).
      eval_streams: parallel streams of those validations (1: exact).
      eval_fn: ``eval_fn(params) -> dict`` instead.
      mesh: data parallelism (:func:`make_mesh`).
      fit_kwargs: the rest of :func:`jaxrnn.train.fit`'s arguments (checkpoints, metadata, ...).
    """
    if batches is None:
        batches = training_batches(train_ids, batch=batch, window=window, stateful=stateful, seed=seed)
    if eval_fn is None:
        eval_fn = lambda p: {"val_loss": evaluate_split(model, p, val_ids, eval_streams).nll}  # noqa: E731
    return train.fit(
        make_loss(model, stateful),
        params,
        (lambda lr: optax.adam(lr)) if optimizer is None else optimizer,
        batches,
        steps=steps,
        learning_rate=learning_rate,
        max_grad_norm=clip,
        initial_carry=model.zero_carry((batch,)) if stateful else None,
        key=jax.random.key(seed + 1) if uses_dropout(model) else None,
        mesh=mesh,
        eval_fn=eval_fn,
        eval_every=eval_every,
        loss_is_nll=True,
        tokens_per_batch=batch * window,
        **fit_kwargs,
    )


def same_run(saved: Dict[str, Any], current: Dict[str, Any]) -> Optional[str]:
    """Which of ``config``, ``vocab``, ``data`` or ``training`` differs between two runs' metadata (``None``: none)."""
    for key in ("model", "config", "vocab", "data", "training"):
        if json.loads(json.dumps(current.get(key))) != saved.get(key):
            if isinstance(saved.get(key), dict) and isinstance(current.get(key), dict):
                diff = sorted(k for k in set(saved[key]) | set(current[key]) if saved[key].get(k) != current[key].get(k))
                if key == "data" and "text" not in diff and "sha256" in diff:
                    return "the training text differs"
                return f"{key} differs ({', '.join(diff[:4])})"
            return f"{key} differs"
    return None


def run_command(prog: str, build_parser, prepare, run, argv=None) -> int:
    """The ``main`` of ``train``, ``sample`` and ``eval``: parse ``argv`` and check it with ``prepare(args)``
    (a ``ValueError``, e.g. :class:`UsageError`, is one line ``"<prog>: <message>"`` on stderr and exit status 2,
    before any work), then ``run(args, *prepare(args))``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        prepared = prepare(args)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except ValueError as e:  # UsageError
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    return int(run(args, *prepared) or 0)
