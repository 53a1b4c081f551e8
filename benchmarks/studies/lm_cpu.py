"""Character language model on the CPU: jaxrnn against the equivalent PyTorch program, training and generation.

The two targets of the CPU-performance issue, each measured against the
PyTorch program a PyTorch user would write for the same model, in the same
process, with the same weights:

* **training** throughput, tokens per second (``batch * window`` tokens per
  step over the step's median wall time), of the character LM of
  :mod:`benchmarks.studies.shakespeare`'s ``baseline``: embedding (``V=65``,
  ``E=64``) → 2-layer LSTM (``H=256``) → linear to ``V``, mean
  cross-entropy of the next character, gradient clipping at global norm 1,
  Adam (learning rate 2e-3), on ``(batch, window + 1) = (32, 129)`` windows
  of random token ids (NumPy, fixed seed; the cost does not depend on the
  text). Target: jaxrnn >= 1.3x PyTorch's tokens/s.

  - jaxrnn: ``train_step = lm.make_train_step(model, lm.make_optimizer(lr,
    clip))``, called as ``params, opt_state, metrics = train_step(params,
    opt_state, tokens)`` with ``tokens`` a NumPy ``(B, window + 1)`` int32
    array, then ``jax.block_until_ready`` on all three. That step is the
    jitted program :func:`jaxrnn.train.fit` runs per step (loss, gradient,
    global norm, clipping, Adam, the non-finite guard, all in one
    ``jax.jit``). Not timed: what ``fit`` adds around it per step, i.e. a
    ``tree_all_finite(params)`` reduction inside its jit, the
    ``jax.device_get`` of four scalars, the history record and the progress
    line (host bookkeeping of some microseconds, plus one pass over the
    parameters).
  - PyTorch: ``nn.Embedding → nn.LSTM(num_layers=2, batch_first=True) →
    nn.Linear``, then ``optimizer.zero_grad()``, ``F.cross_entropy``,
    ``loss.backward()``, ``clip_grad_norm_(model.parameters(), 1.0)``,
    ``optimizer.step()`` with ``torch.optim.Adam``: the standard loop, no
    ``loss.item()`` (eager CPU PyTorch is synchronous, so the step has
    finished when the call returns). ``torch.set_num_threads(os.cpu_count())``
    as in :mod:`benchmarks.impls`. nn.LSTM keeps two bias vectors per layer
    (``b_ih``, ``b_hh``) where jaxrnn keeps their sum: the same function and
    gradient, but PyTorch's clipping norm counts the bias gradient twice and
    Adam moves the sum twice as far; the cost differs by two ``(4H,)``
    vectors per layer.

* **generation** of ``--gen-length`` (1000) characters after a one-character
  prompt, at batch 1 and batch 32, sampled from the full softmax
  (temperature 1). Reported: tokens per second (``batch * length`` over the
  call's median time) and latency per generated token (median time /
  ``length``, in ms). Target: jaxrnn >= 5x the PyTorch per-token loop.

  - jaxrnn: ``lm.generate(model, params, key, prompt, length)``: the
    prompt read by ``model.apply``, then one ``lax.scan`` inside one ``jit``
    (sample with ``jax.random.categorical``, one ``cell.step`` per layer),
    plus the argument checks of a user's call, ended by
    ``jax.block_until_ready``. Its compilation (the first call's time minus
    the steady-state median) is reported separately and excluded.
  - PyTorch: :func:`torch_generate`, under ``torch.no_grad()``: the model
    reads the prompt, then per token ``softmax`` + ``torch.multinomial``
    and one call of the model on that token with the carried ``(h, c)``.

Both generators run ``length + 1`` steps of the network (the prompt's and
one per sampled token; the last one's logits are unused) and sample
``length`` tokens.

Timing (:mod:`benchmarks.measure`): each callable is called once (jaxrnn
compiles), warmed up with more untimed calls, then the two are timed in
interleaved round-robin rounds (``--rounds`` for training, ``--gen-rounds``
per generation batch), a call under 0.5 s re-warmed by untimed calls for at
least 20 ms before each timed one (``measure.REWARM_BELOW_S``,
``measure.REWARM_S``); ``time.perf_counter`` around each call. Reported:
median, quartiles, min and max per implementation and the ratio
``jaxrnn tokens/s / PyTorch tokens/s`` (= PyTorch median time / jaxrnn median
time). Both libraries run in this one process, as the issue asks, so their
thread pools may contend: PyTorch's OpenMP workers spin for a while after
each parallel region, into the next (jaxrnn) call (:mod:`benchmarks.studies.kernels_cpu`
runs PyTorch in a worker process for that reason).

Equal work is checked, not assumed (:func:`check_equivalence`, after the
timing, on copies of the initial weights): PyTorch's initial weights are
loaded into jaxrnn (:func:`jaxrnn_from_torch`, built on
:func:`jaxrnn.interop.from_torch`) and both timed programs start from them;
the first step of both training programs reports the same loss, the
gradients agree parameter by parameter, and greedy generation (``top_k=1``;
``argmax`` in PyTorch) yields the same tokens from the same logits. Without
PyTorch the study says so and times jaxrnn alone.

What the machine allows is measured, not assumed: both programs do the same
matmuls (:func:`lm_flops`), so each one's FLOP rate is reported beside the
float32 matmul ceiling of the run (the fastest large square matmul in JAX,
at the start and the end), with the **ratio at the ceiling**: PyTorch's time
over the time the model's matmuls take at that rate, the most any program
could beat this PyTorch run by. A target above it cannot be met on that
machine by a faster kernel; only by less work.

Writes ``<out>/lm_cpu.json`` (environment, load averages at the start and
the end, configuration, per-implementation statistics, ratios, the issue's
targets with met / not met, FLOP rates and the ratio at the ceiling, the
equivalence check) and ``<out>/lm_cpu.md``,
``<out>`` being ``benchmarks/results/cpu`` by default; a table on stdout,
progress on stderr.

Example:
  $ python -m benchmarks.studies.lm_cpu                    # the issue's sizes (minutes)
  $ python -m benchmarks.studies.lm_cpu --quick --out /tmp/lm   # tiny sizes (seconds)
  $ python -m benchmarks.studies.lm_cpu --gen-length 200 --gen-batches 1 --rounds 5
"""

from __future__ import annotations

import copy
import os
import sys
import time
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import measure, report
from jaxrnn import LSTM, Stack, interop
from jaxrnn.cli.args import Parser, parse, positive_float, positive_int
from jaxrnn.models import lm
from jaxrnn.runner import IMPLS, resolve_backend

#: The issue's targets: jaxrnn's tokens/s over PyTorch's.
TARGETS = {"training": 1.3, "generation": 5.0}
#: The issue's sizes (the Tiny Shakespeare baseline's model and batches).
DEFAULTS = dict(
    vocab=65, embed=64, hidden=256, layers=2, batch=32, window=128, lr=2e-3, clip=1.0,
    gen_length=1000, gen_batches=(1, 32), rounds=15, gen_rounds=10, settle_s=2.0,
)  # fmt: skip
#: ``--quick``: tiny sizes for the tests (explicit flags still win).
QUICK = dict(hidden=32, batch=4, window=16, gen_length=20, gen_batches=(1, 4), rounds=3, gen_rounds=3, settle_s=0.0)
#: Distinct random batches the training steps cycle through.
NUM_BATCHES = 4
#: Untimed calls after the first, before the rounds (at least 2: eager PyTorch settles over its first calls).
WARMUP = 2
#: Float32 tolerance of the equivalence check, relative to the largest magnitude compared.
RTOL = 1e-5
#: Greedy tokens compared by the equivalence check.
CHECK_GEN_STEPS = 8
#: Square matmul sizes whose fastest rate is the run's float32 matmul ceiling (measured at the start and the end).
CEILING_SIZES = (1024, 2048)
CEILING_SIZES_QUICK = (256,)


def log(message: str) -> None:
    """A progress line on stderr."""
    print(f"[lm_cpu] {message}", file=sys.stderr, flush=True)


def import_torch():
    """``(torch, None)``, or ``(None, reason)`` when PyTorch cannot be imported (it is optional)."""
    try:
        import torch  # noqa: PLC0415  (optional)
    except Exception as e:  # noqa: BLE001  (ImportError, or a broken installation)
        return None, f"torch is not importable ({type(e).__name__}: {e})"
    return torch, None


# --------------------------------------------------------------------------
# The two models, with the same weights
# --------------------------------------------------------------------------
def torch_lm(vocab: int, embed: int, hidden: int, layers: int, seed: int = 0):
    """The PyTorch character LM: ``nn.Embedding(V, E) → nn.LSTM(E, H, layers, batch_first=True) → nn.Linear(H, V)``.

    Its ``forward(tokens, state=None)`` maps ``(B, T)`` int64 ids (and an
    optional ``(h, c)``, each ``(layers, B, H)``) to ``(logits, (h, c))``,
    logits ``(B, T, V)`` float32. Weights: PyTorch's default initialisation
    after ``torch.manual_seed(seed)``.
    """
    import torch  # noqa: PLC0415

    nn = torch.nn

    class CharLSTM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab, embed)
            self.lstm = nn.LSTM(embed, hidden, num_layers=layers, batch_first=True)
            self.out = nn.Linear(hidden, vocab)

        def forward(self, tokens, state=None):
            ys, state = self.lstm(self.embed(tokens), state)
            return self.out(ys), state

    torch.manual_seed(seed)
    return CharLSTM()


def jaxrnn_from_torch(module, impl="auto"):
    """``(model, params)``: the jaxrnn :class:`~jaxrnn.models.lm.LanguageModel` computing what ``module`` computes.

    ``module`` is a :func:`torch_lm` (``embed``, ``lstm``, ``out``). The LSTM
    converts with :func:`jaxrnn.interop.from_torch` (kernels transposed, the
    two biases summed); the embedding ``(V, E)`` is copied, the output layer's
    ``(V, H)`` weight is transposed into ``w_out`` ``(H, V)`` and its bias is
    ``b_out`` ``(V,)``. The model is ``LanguageModel(V, Stack(LSTM(H),
    layers), embed_size=E, impl=impl)``, the model of ``jaxrnn train``.
    """

    def array(t):
        return jnp.asarray(t.detach().cpu().numpy())

    stack, rnn = interop.from_torch(module.lstm)
    vocab, embed = module.embed.weight.shape
    model = lm.LanguageModel(int(vocab), stack, embed_size=int(embed), impl=impl)
    params = lm.LMParams(
        embed=array(module.embed.weight), rnn=rnn, w_out=array(module.out.weight).T, b_out=array(module.out.bias)
    )
    return model, params


def jaxrnn_lm(vocab: int, embed: int, hidden: int, layers: int, seed: int = 0, impl="auto"):
    """``(model, params)`` of the same shapes without PyTorch: jaxrnn's own initialisation."""
    model = lm.LanguageModel(vocab, Stack(LSTM(hidden), layers), embed_size=embed, impl=impl)
    return model, model.init(jax.random.key(seed))


def random_batches(count: int, batch: int, window: int, vocab: int, seed: int = 0) -> np.ndarray:
    """``(count, batch, window + 1)`` int32 token ids, uniform in ``[0, vocab)``: inputs ``[:, :-1]``, targets ``[:, 1:]``."""
    return np.random.default_rng(seed).integers(0, vocab, size=(count, batch, window + 1), dtype=np.int32)


# --------------------------------------------------------------------------
# The two training programs
# --------------------------------------------------------------------------
class JaxrnnTraining:
    """jaxrnn's training loop body: one call = one jitted step on the next batch, finished.

    ``lm.make_train_step(model, lm.make_optimizer(lr, clip))``; the
    parameters and Adam state carry from call to call. A call returns the
    step's metrics (``loss`` at the parameters the step started from,
    ``grad_norm`` before clipping, ...) as arrays.
    """

    def __init__(self, model, params, batches: np.ndarray, lr: float, clip: float):
        self.train_step = lm.make_train_step(model, lm.make_optimizer(lr, clip))
        self.params, self.opt_state = params, self.train_step.init(params)
        self.batches, self.i = batches, 0

    def __call__(self):
        tokens = self.batches[self.i % len(self.batches)]  # (B, window + 1) NumPy int32, as fit passes it
        self.i += 1
        self.params, self.opt_state, metrics = self.train_step(self.params, self.opt_state, tokens)
        return jax.block_until_ready((self.params, self.opt_state, metrics))[2]


class TorchTraining:
    """PyTorch's standard training loop body: one call = one step on the next batch.

    ``zero_grad``, forward, ``F.cross_entropy`` (mean over ``B * window``
    predictions), ``backward``, ``clip_grad_norm_(…, clip)``, ``Adam.step``.
    A call returns ``{"loss", "grad_norm"}`` (tensors; the norm before
    clipping, as ``clip_grad_norm_`` returns it).
    """

    def __init__(self, module, batches: np.ndarray, lr: float, clip: float):
        import torch  # noqa: PLC0415

        self.torch, self.F = torch, torch.nn.functional
        self.module, self.clip = module.train(), clip
        self.optimizer = torch.optim.Adam(module.parameters(), lr=lr)
        as_long = [torch.from_numpy(b.astype(np.int64)) for b in batches]  # ready tensors, as a DataLoader gives
        self.batches, self.i = [(b[:, :-1], b[:, 1:]) for b in as_long], 0

    def __call__(self):
        inputs, targets = self.batches[self.i % len(self.batches)]
        self.i += 1
        self.optimizer.zero_grad()
        logits, _ = self.module(inputs)
        loss = self.F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        grad_norm = self.torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
        self.optimizer.step()
        return {"loss": loss.detach(), "grad_norm": grad_norm}


# --------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------
def torch_generate(module, prompt, length: int, *, greedy: bool = False, return_logits: bool = False):
    """Sample ``length`` tokens after ``prompt`` the way PyTorch users do: one model call per token.

    Under ``torch.no_grad()``: the model reads ``prompt`` ``(B, P)`` int64,
    then each step draws ``torch.multinomial(softmax(logits), 1)`` (or the
    ``argmax`` with ``greedy``) and calls the model on that ``(B, 1)`` token
    with the carried ``(h, c)``.

    Returns:
      ``(B, length)`` int64 tokens; with ``return_logits`` also the
      ``(B, length, V)`` logits each token was drawn from (as
      :func:`jaxrnn.models.lm.generate` returns them).
    """
    import torch  # noqa: PLC0415

    module.eval()
    tokens, seen = [], []
    with torch.no_grad():
        logits, state = module(prompt)
        logits = logits[:, -1]
        for _ in range(length):
            if greedy:
                token = logits.argmax(dim=-1, keepdim=True)
            else:
                token = torch.multinomial(torch.softmax(logits, dim=-1), 1)
            tokens.append(token)
            if return_logits:
                seen.append(logits)
            logits, state = module(token, state)
            logits = logits[:, -1]
    out = torch.cat(tokens, dim=1)
    return (out, torch.stack(seen, dim=1)) if return_logits else out


def jaxrnn_generator(model, params, prompt: np.ndarray, length: int, seed: int = 0):
    """A callable: ``lm.generate(model, params, key, prompt, length)`` (``prompt`` ``(B, P)``), finished."""
    key, prompt = jax.random.key(seed), jnp.asarray(prompt)
    return lambda: jax.block_until_ready(lm.generate(model, params, key, prompt, length))


def torch_generator(module, prompt: np.ndarray, length: int):
    """A callable: :func:`torch_generate` on ``prompt`` ``(B, P)``."""
    import torch  # noqa: PLC0415

    prompt = torch.from_numpy(np.asarray(prompt, np.int64))
    return lambda: torch_generate(module, prompt, length)


# --------------------------------------------------------------------------
# Equal work
# --------------------------------------------------------------------------
def _relative_error(a, b) -> float:
    """``max |a - b| / max(max |b|, tiny)`` over two pytrees of arrays."""
    diff = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    scale = max(float(np.max(np.abs(np.asarray(y)))) for y in jax.tree.leaves(b))
    return diff / max(scale, 1e-30)


def torch_gradients(module, tokens: np.ndarray):
    """PyTorch's gradient of the mean cross-entropy on ``tokens`` ``(B, L)``, in jaxrnn's layout (an ``LMParams``).

    One forward/backward on a copy of ``module`` (nothing clipped, nothing
    updated); the gradients are put in place of the weights and converted by
    :func:`jaxrnn_from_torch`, with ``bias_hh``'s gradient zeroed so that
    the summed LSTM bias receives the gradient of one bias (both equal the
    gradient of their sum).
    """
    import torch  # noqa: PLC0415

    work = copy.deepcopy(module).train()
    work.zero_grad()
    ids = torch.from_numpy(np.asarray(tokens, np.int64))
    logits, _ = work(ids[:, :-1])
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
    with torch.no_grad():
        for name, p in work.named_parameters():
            p.copy_(torch.zeros_like(p) if name.startswith("lstm.bias_hh") else p.grad)
    return jaxrnn_from_torch(work)[1]


def check_equivalence(module, tokens: np.ndarray, *, lr: float = 2e-3, clip: float = 1.0, impl="auto",
                      gen_steps: int = CHECK_GEN_STEPS, rtol: float = RTOL):  # fmt: skip
    """Check that jaxrnn and PyTorch compute the same thing from ``module``'s weights (``module`` is not modified).

    Args:
      module: a :func:`torch_lm`.
      tokens: ``(B, L)`` int token ids, ``L >= 2`` (one training batch).
      lr, clip, impl: the training programs' settings and jaxrnn's recurrence.
      gen_steps: greedy tokens generated after the prompt ``tokens[:, :2]``.
      rtol: tolerance, relative to the largest magnitude compared.

    Returns:
      A dict: ``loss_jaxrnn`` / ``loss_torch`` (the first step of
      :class:`JaxrnnTraining` and :class:`TorchTraining`) and their
      ``loss_rel_error``; ``grad_rel_error`` (the largest gradient difference
      over the largest gradient, all parameters, unclipped);
      ``grad_norm_jaxrnn`` / ``grad_norm_torch`` (the steps' norms before
      clipping) and ``grad_norm_torch_expected`` (jaxrnn's norm with the LSTM
      bias gradients counted twice, as nn.LSTM's two biases count them);
      ``greedy_tokens_equal`` and ``greedy_logits_rel_error`` (``lm.generate(...,
      top_k=1)`` against :func:`torch_generate` with ``greedy=True``); and
      ``ok``, all of it within ``rtol``.
    """
    import torch  # noqa: PLC0415

    tokens = np.asarray(tokens, np.int32)
    model, params = jaxrnn_from_torch(module, impl)
    jax_step = JaxrnnTraining(model, params, tokens[None], lr, clip)()
    torch_step = TorchTraining(copy.deepcopy(module), tokens[None], lr, clip)()
    loss_jax, loss_torch = float(jax_step["loss"]), float(torch_step["loss"])

    grads = jax.grad(lambda p: lm.loss(model, p, jnp.asarray(tokens)))(params)
    bias_sq = sum(float(jnp.sum(layer.fwd.b**2)) for layer in grads.rnn)
    norm_jax, norm_torch = float(jax_step["grad_norm"]), float(torch_step["grad_norm"])
    prompt = tokens[:, :2]
    ids_jax, logits_jax = lm.generate(model, params, jax.random.key(0), prompt, gen_steps, top_k=1, return_logits=True)
    ids_torch, logits_torch = torch_generate(
        copy.deepcopy(module), torch.from_numpy(prompt.astype(np.int64)), gen_steps, greedy=True, return_logits=True
    )
    result = {
        "loss_jaxrnn": loss_jax,
        "loss_torch": loss_torch,
        "loss_rel_error": abs(loss_jax - loss_torch) / abs(loss_torch),
        "grad_rel_error": _relative_error(grads, torch_gradients(module, tokens)),
        "grad_norm_jaxrnn": norm_jax,
        "grad_norm_torch": norm_torch,
        "grad_norm_torch_expected": float(np.sqrt(norm_jax**2 + bias_sq)),
        "greedy_tokens_equal": bool(np.array_equal(np.asarray(ids_jax), ids_torch.numpy())),
        "greedy_logits_rel_error": _relative_error(logits_jax, logits_torch.numpy()),
        "greedy_steps": gen_steps,
        "batch_shape": list(tokens.shape),
        "rtol": rtol,
    }
    norm_error = abs(result["grad_norm_torch"] - result["grad_norm_torch_expected"]) / result["grad_norm_torch"]
    result["ok"] = bool(
        result["loss_rel_error"] <= rtol
        and result["grad_rel_error"] <= rtol
        and norm_error <= rtol
        and result["greedy_tokens_equal"]
        and result["greedy_logits_rel_error"] <= rtol
    )
    return result


# --------------------------------------------------------------------------
# The work: matmul FLOPs, and what the machine's matmul rate allows
# --------------------------------------------------------------------------
def lm_flops(cfg, *, training: bool, batch: int, steps: int) -> float:
    """Matmul FLOPs of the language model over ``batch x steps`` tokens (:data:`benchmarks.measure.FLOP_MODEL`).

    Per token, forward: each LSTM layer ``2 * 4H * (I_l + H)`` (``I_0`` the
    embedding width, ``H`` above; :func:`benchmarks.measure.model_flops`)
    plus the output layer ``2 * H * V``; training counts each matmul 3 times
    (forward, input gradient, weight gradient). Embedding lookups, gate
    math, softmax, sampling and Adam are not counted: both programs do them
    alike, and they cost little beside the matmuls.

    Example:
      >>> lm_flops(dict(vocab=65, embed=64, hidden=32, layers=2), training=True, batch=4, steps=16)
      8663040.0
    """
    case = SimpleNamespace(hidden_size=cfg["hidden"], bidirectional=False, num_layers=cfg["layers"],
                           input_size=cfg["embed"], batch=batch, seq_len=steps, mode="fwdbwd" if training else "fwd")  # fmt: skip
    output = 2.0 * batch * steps * cfg["hidden"] * cfg["vocab"]
    return measure.model_flops(case, 4) + (3.0 if training else 1.0) * output


def work_bound(result, flops: float, ceiling_flop_s):
    """Add the FLOP rates of a measured workload (``result`` from :func:`measure_training` / :func:`measure_generation`).

    Sets ``model_flops`` (per call), each implementation's ``flop_per_s``
    (``model_flops`` over its median) and ``matmul_fraction`` (of
    ``ceiling_flop_s``), and ``ratio_at_ceiling``: PyTorch's median time
    over ``model_flops / ceiling_flop_s``, the most any implementation could
    be faster than this PyTorch run if all its work ran at the large-matmul
    rate of this machine (``None`` without PyTorch or a ceiling).
    """
    result["model_flops"] = flops
    for name in ("jaxrnn", "torch"):
        if name in result:
            rate = flops / result[name]["median_s"]
            result[name]["flop_per_s"] = rate
            result[name]["matmul_fraction"] = rate / ceiling_flop_s if ceiling_flop_s else None
    bound = "torch" in result and ceiling_flop_s
    result["ratio_at_ceiling"] = result["torch"]["median_s"] / (flops / ceiling_flop_s) if bound else None
    return result


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------
def time_pair(runs, rounds: int, settle_s: float):
    """:func:`benchmarks.measure.time_together` for exactly ``rounds`` rounds; ``(first_s, times)``, raising on a failure."""
    first, times, errors = measure.time_together(runs, warmup=WARMUP, min_reps=rounds, max_reps=rounds, target_s=settle_s)
    if errors:
        name, error = next(iter(errors.items()))
        raise RuntimeError(f"{name} failed while timed: {error}") from error
    return first, times


def statistics(times, first_s: float, tokens: int, *, compiled: bool, steps: int = None):
    """Time statistics of one implementation and the throughput they give.

    ``tokens`` per call; ``steps`` (generation) adds the latency per token in
    ms. ``compile_s`` (``compiled``: jaxrnn) is the first call's time minus the
    median: compilation, excluded from every other number.
    """
    s = measure.summarize_times(times)
    out = {
        **s,
        "rounds": len(times),
        "times_s": list(times),
        "first_call_s": first_s,
        "tokens_per_call": tokens,
        "tokens_per_s": tokens / s["median_s"],
        "tokens_per_s_q25": tokens / s["q75_s"],
        "tokens_per_s_q75": tokens / s["q25_s"],
    }
    if compiled:
        out["compile_s"] = max(first_s - s["median_s"], 0.0)
    if steps is not None:
        out["ms_per_token"] = 1e3 * s["median_s"] / steps
    return out


def ratio_of(result):
    """jaxrnn tokens/s over PyTorch's, or ``None`` without PyTorch."""
    return result["jaxrnn"]["tokens_per_s"] / result["torch"]["tokens_per_s"] if "torch" in result else None


def measure_training(model, params, module, cfg):
    """Training tokens/s of both programs (``module`` ``None``: jaxrnn only), from the same weights."""
    batches = random_batches(NUM_BATCHES, cfg["batch"], cfg["window"], cfg["vocab"], cfg["seed"])
    runs = {"jaxrnn": JaxrnnTraining(model, params, batches, cfg["lr"], cfg["clip"])}
    if module is not None:
        runs["torch"] = TorchTraining(module, batches, cfg["lr"], cfg["clip"])
    log(f"training: {' and '.join(runs)}, batch {cfg['batch']} x window {cfg['window']}, {cfg['rounds']} rounds")
    first, times = time_pair(runs, cfg["rounds"], cfg["settle_s"])
    tokens = cfg["batch"] * cfg["window"]
    result = {name: statistics(times[name], first[name], tokens, compiled=name == "jaxrnn") for name in runs}
    result["ratio"] = ratio_of(result)
    return result


def measure_generation(model, params, module, cfg, batch: int):
    """Generation tokens/s and ms per token of both at ``batch`` (``module`` ``None``: jaxrnn only)."""
    length = cfg["gen_length"]
    prompt = random_batches(1, batch, 0, cfg["vocab"], cfg["seed"] + 1)[0]  # (batch, 1)
    runs = {"jaxrnn": jaxrnn_generator(model, params, prompt, length, cfg["seed"])}
    if module is not None:
        runs["torch"] = torch_generator(module, prompt, length)
    log(f"generation: batch {batch}, {length} tokens, {cfg['gen_rounds']} rounds")
    first, times = time_pair(runs, cfg["gen_rounds"], cfg["settle_s"])
    result = {"batch": batch, "length": length}
    for name in runs:
        result[name] = statistics(times[name], first[name], batch * length, compiled=name == "jaxrnn", steps=length)
    result["ratio"] = ratio_of(result)
    return result


def targets(training, generation):
    """The issue's targets: ratio, threshold and met (``None`` without PyTorch)."""
    gen_ratios = {str(g["batch"]): g["ratio"] for g in generation.values()}
    gen_ratio = None if None in gen_ratios.values() else min(gen_ratios.values())
    gen_bounds = {str(g["batch"]): g.get("ratio_at_ceiling") for g in generation.values()}
    return {
        "training": {
            "description": f"jaxrnn training tokens/s >= {TARGETS['training']}x PyTorch's",
            "threshold": TARGETS["training"],
            "ratio": training["ratio"],
            "ratio_at_ceiling": training.get("ratio_at_ceiling"),
            "met": None if training["ratio"] is None else training["ratio"] >= TARGETS["training"],
        },
        "generation": {
            "description": f"jaxrnn generation tokens/s >= {TARGETS['generation']}x PyTorch's per-token loop, at every batch",
            "threshold": TARGETS["generation"],
            "ratio_by_batch": gen_ratios,
            "ratio": gen_ratio,
            "ratio_at_ceiling_by_batch": gen_bounds,
            "ratio_at_ceiling": None if None in gen_bounds.values() else min(gen_bounds.values()),
            "met": None if gen_ratio is None else gen_ratio >= TARGETS["generation"],
        },
    }


# --------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------
def _fmt(x, spec=",.0f"):
    return "n/a" if x is None else format(x, spec)


def _met(target):
    return {True: "met", False: "not met", None: "n/a"}[target["met"]]


def rows(record):
    """Per measurement: ``(workload, jaxrnn tokens/s, torch tokens/s, ratio, jaxrnn ms/token, torch ms/token,
    jaxrnn GFLOP/s, its fraction of the matmul ceiling, torch GFLOP/s, the ratio at the ceiling)``."""
    c = record["config"]

    def row(name, result, per_token):
        j, t = result["jaxrnn"], result.get("torch", {})
        gflops = lambda r: None if r.get("flop_per_s") is None else r["flop_per_s"] / 1e9  # noqa: E731
        return (name, j["tokens_per_s"], t.get("tokens_per_s"), result["ratio"],
                j.get("ms_per_token") if per_token else None, t.get("ms_per_token") if per_token else None,
                gflops(j), j.get("matmul_fraction"), gflops(t), result.get("ratio_at_ceiling"))  # fmt: skip

    out = [row(f"training B={c['batch']} T={c['window']}", record["training"], False)]
    return out + [row(f"generation B={g['batch']} ({g['length']} tokens)", g, True) for g in record["generation"].values()]


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.0f}%"


def table(record) -> str:
    """The short plain-text table printed at the end."""
    lines = [f"{'workload':<34} {'jaxrnn tok/s':>13} {'torch tok/s':>12} {'ratio':>6} {'jaxrnn ms/tok':>14} "
             f"{'torch ms/tok':>13} {'jaxrnn GFLOP/s':>15} {'torch GFLOP/s':>14} {'at ceiling':>11}"]  # fmt: skip
    for name, tj, tt, r, mj, mt, gj, fj, gt, rc in rows(record):
        lines.append(f"{name:<34} {_fmt(tj):>13} {_fmt(tt):>12} {_fmt(r, '.2f'):>6} {_fmt(mj, '.3f'):>14} "
                     f"{_fmt(mt, '.3f'):>13} {_fmt(gj, '.0f') + ' (' + _pct(fj) + ')':>15} {_fmt(gt, '.0f'):>14} "
                     f"{_fmt(rc, '.2f'):>11}")  # fmt: skip
    tg = record["targets"]
    lines.append(f"targets: training >= {tg['training']['threshold']}x: {_met(tg['training'])}; "
                 f"generation >= {tg['generation']['threshold']}x: {_met(tg['generation'])}")  # fmt: skip
    lines.append(f"float32 matmul ceiling: {record['matmul_ceiling']['float32']['ceiling_flop_s'] / 1e9:.0f} GFLOP/s")
    lines.append("jaxrnn compilation (excluded): " + ", ".join(f"{k} {v:.2f} s" for k, v in compile_times(record)))
    return "\n".join(lines)


def compile_times(record):
    """``[(what, seconds)]``: jaxrnn's compilation, the first call's time minus the median (excluded from the rest)."""
    out = [("training step", record["training"]["jaxrnn"]["compile_s"])]
    return out + [(f"generate B={g['batch']}", g["jaxrnn"]["compile_s"]) for g in record["generation"].values()]


def markdown(record) -> str:
    """The Markdown summary ``lm_cpu.md``."""
    env, c, eq = record["environment"], record["config"], record["equivalence"]
    lines = [
        "# Character LM on the CPU: jaxrnn vs PyTorch",
        "",
        f"{env['date_utc']}, {env['cpu_model']} ({env['cpu_count']} CPUs), JAX platform {env['platform']}; "
        f"jax {env['jax']}, jaxlib {env['jaxlib']}, torch {env['torch']} ({record['torch']['threads']} threads), "
        f"git {str(env['git_commit'])[:10]}{' (dirty)' if env['git_dirty'] else ''}; "
        f"load average {record['load_average_start']} at the start, {record['load_average_end']} at the end.",
        "",
        "C allocator: " + ("freed memory kept for reuse in this process, for both libraries (`--retain-memory`, "
                           "jaxrnn.host.retain_freed_memory)" if env.get("retain_freed_memory") else
                           "the default (glibc returns large freed blocks to the OS; every call faults its buffers "
                           "in again; see jaxrnn.host)")
        + (f"; environment {env['malloc_environment']}" if env.get("malloc_environment") else "") + ".",
        "",
        f"Model: embedding {c['vocab']}x{c['embed']} → LSTM {c['layers']}x{c['hidden']} → linear to {c['vocab']} "
        f"(jaxrnn impl {c['impl']!r} → {c['impl_resolved']!r}); training: batch {c['batch']}, window {c['window']}, "
        f"Adam {c['lr']}, clip {c['clip']}; generation: {c['gen_length']} tokens after a 1-token prompt, temperature 1. "
        f"Median of {c['rounds']} (training) / {c['gen_rounds']} (generation) interleaved rounds.",
        "",
        f"Float32 matmul ceiling of this run: {record['matmul_ceiling']['float32']['ceiling_flop_s'] / 1e9:.0f} GFLOP/s "
        "(the fastest square matmul in JAX, at the start and the end).",
        "",
        "| workload | jaxrnn tokens/s | PyTorch tokens/s | ratio | jaxrnn ms/token | PyTorch ms/token "
        "| jaxrnn GFLOP/s (% ceiling) | PyTorch GFLOP/s | ratio at the ceiling |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, tj, tt, r, mj, mt, gj, fj, gt, rc in rows(record):
        lines.append(f"| {name} | {_fmt(tj)} | {_fmt(tt)} | {_fmt(r, '.2f')} | {_fmt(mj, '.3f')} | {_fmt(mt, '.3f')} "
                     f"| {_fmt(gj, '.0f')} ({_pct(fj)}) | {_fmt(gt, '.0f')} | {_fmt(rc, '.2f')} |")  # fmt: skip
    lines.append("")
    for key, tg in record["targets"].items():
        at = tg.get("ratio_at_ceiling")
        bound = "" if at is None else f" (at most {at:.2f}x with every matmul at the ceiling)"
        lines.append(f"* target {key}: {tg['description']}: ratio {_fmt(tg['ratio'], '.2f')}, **{_met(tg)}**{bound}")
    lines.append("* jaxrnn compilation (first call minus the median; excluded): "
                 + ", ".join(f"{k} {v:.2f} s" for k, v in compile_times(record)))  # fmt: skip
    if not record["torch"]["available"]:
        lines.append(f"* PyTorch: {record['torch']['reason']}; jaxrnn only.")
    elif eq.get("ok") is not None:
        lines.append(
            f"* equal work: {'verified' if eq['ok'] else '**NOT verified**'} (same weights; first-step loss "
            f"{eq['loss_jaxrnn']:.6f} vs {eq['loss_torch']:.6f}, gradients within {eq['grad_rel_error']:.1e}, "
            f"greedy tokens {'identical' if eq['greedy_tokens_equal'] else 'different'})"
        )
    lines += ["", record["method"], "", record["flop_model"], ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------
def build_parser() -> Parser:
    p = Parser(prog="python -m benchmarks.studies.lm_cpu", description=__doc__.split("\n\n")[0])
    d = DEFAULTS
    for name in ("vocab", "embed", "hidden", "layers", "batch", "window"):
        p.add_argument(f"--{name}", type=positive_int, default=None, help=f"default {d[name]} ({QUICK.get(name, d[name])} with --quick)")
    p.add_argument("--lr", type=positive_float, default=d["lr"], help="Adam's learning rate (%(default)s)")
    p.add_argument("--clip", type=positive_float, default=d["clip"], help="global gradient-norm clip (%(default)s)")
    p.add_argument("--gen-length", type=positive_int, default=None, help=f"generated tokens per call (default {d['gen_length']})")
    p.add_argument("--gen-batches", type=positive_int, nargs="+", default=None, help="generation batch sizes (default 1 32)")
    p.add_argument("--rounds", type=positive_int, default=None, help=f"timed training rounds (default {d['rounds']})")
    p.add_argument("--gen-rounds", type=positive_int, default=None, help=f"timed rounds per generation batch (default {d['gen_rounds']})")
    p.add_argument("--impl", choices=IMPLS, default="auto", help="jaxrnn's recurrence implementation (%(default)s)")
    p.add_argument("--seed", type=int, default=0, help="weights, batches and prompts (%(default)s)")
    p.add_argument("--retain-memory", action="store_true",
                   help="keep freed memory for reuse in this process, for both libraries (jaxrnn.host); "
                        "writes lm_cpu-retained.*")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="tiny sizes and few rounds (tests)")
    p.add_argument("--out", default=os.path.join(report.RESULTS_DIR, "cpu"), metavar="DIR", help="output folder (benchmarks/results/cpu)")
    return p


def config_of(args) -> dict:
    """The run's settings: the defaults, ``--quick``'s sizes over them, explicit flags over both."""
    cfg = dict(DEFAULTS, **(QUICK if args.quick else {}))
    for key in ("vocab", "embed", "hidden", "layers", "batch", "window", "gen_length", "gen_batches", "rounds", "gen_rounds"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    cfg.update(retain_memory=args.retain_memory)
    cfg.update(gen_batches=list(dict.fromkeys(cfg["gen_batches"])), lr=args.lr, clip=args.clip, impl=args.impl,
               seed=args.seed, quick=args.quick, dtype="float32", prompt_length=1, sampling="temperature 1, full softmax")  # fmt: skip
    # The cell as the runner resolves it for float32 inputs (compute dtype float32).
    cfg["impl_resolved"] = resolve_backend(args.impl, LSTM(cfg["hidden"]).resolve(jnp.float32))[0]
    return cfg


METHOD = (
    "Same process, same weights (PyTorch's initialisation loaded into jaxrnn). Each callable: one first call (jaxrnn "
    f"compiles), {WARMUP} or more untimed warm-up calls, then jaxrnn and PyTorch timed in interleaved round-robin rounds "
    f"(benchmarks.measure.time_together; calls under {measure.REWARM_BELOW_S * 1e3:.0f} ms re-warmed by untimed calls "
    f"for at least {measure.REWARM_S * 1e3:.0f} ms before each timed call), wall clock per call, "
    "jax.block_until_ready for jaxrnn. Training: jaxrnn's jitted lm.make_train_step(model, lm.make_optimizer(lr, clip)) "
    "(what jaxrnn.train.fit runs per step, without fit's host bookkeeping and params-finite check) on a NumPy batch vs "
    "PyTorch's zero_grad / cross_entropy / backward / clip_grad_norm_ / Adam.step; tokens/s = batch*window / median step "
    "time. Generation: lm.generate (one jit: the prompt, then the decode, with the ffi backend one custom call, kernels.ffi.lstm_decode; argument checks included; compilation reported apart and "
    "excluded) vs a torch.no_grad() loop of one model call per token with the carried (h, c), softmax + "
    "torch.multinomial; tokens/s = batch*length / median call time, ms/token = median / length. Ratio = jaxrnn tokens/s "
    "over PyTorch's."
)
FLOP_MODEL = (
    "Matmul FLOPs per call (lm_flops): per token, 2*4H*(I_l + H) per LSTM layer (I_0 the embedding width) plus "
    "2*H*V for the output layer; training counts each matmul 3 times (forward, input and weight gradients), "
    "generation the length + 1 network steps once. FLOP/s = model FLOPs / median time; % of the float32 matmul "
    "ceiling, the fastest square matmul in JAX (CEILING_SIZES; CEILING_SIZES_QUICK with --quick) at the start and the end of the run. 'At the ceiling' is "
    "PyTorch's median time over model FLOPs / ceiling: the most any program doing these matmuls could beat this "
    "PyTorch run by, were all of its work to run at the large-matmul rate."
)


def run(cfg, out: str) -> dict:
    """Measure, check equal work, write ``lm_cpu.json`` and ``lm_cpu.md`` under ``out`` (``lm_cpu-retained.*``
    with ``retain_memory``); return the record."""
    if cfg.get("retain_memory"):
        measure.retain_freed_memory()
    env = measure.environment()
    if env["platform"] != "cpu":
        log(f"warning: JAX runs on {env['platform']}, not the CPU (set JAX_PLATFORMS=cpu for this study)")
    torch, reason = import_torch()
    sizes = dict(vocab=cfg["vocab"], embed=cfg["embed"], hidden=cfg["hidden"], layers=cfg["layers"], seed=cfg["seed"])
    torch_info = {"available": torch is not None, "reason": reason, "threads": None}
    if torch is not None:
        torch.set_num_threads(os.cpu_count() or 1)
        torch_info.update(version=torch.__version__, threads=torch.get_num_threads())
        initial = torch_lm(**sizes)
        model, params = jaxrnn_from_torch(initial, cfg["impl"])
    else:
        log(f"PyTorch unavailable ({reason}): timing jaxrnn alone")
        initial = None
        model, params = jaxrnn_lm(**sizes, impl=cfg["impl"])

    def fresh():
        return None if initial is None else copy.deepcopy(initial)

    sizes = CEILING_SIZES_QUICK if cfg["quick"] else CEILING_SIZES
    log(f"float32 matmul ceiling ({', '.join(f'{n}x{n}' for n in sizes)})")
    ceiling_s = 0.0 if cfg["quick"] else 1.0  # seconds per size (at least 5 calls)
    ceiling_start = measure.matmul_ceiling(["float32"], sizes, target_s=ceiling_s)
    start = time.perf_counter()
    training = measure_training(model, params, fresh(), cfg)
    generation = {f"batch_{b}": measure_generation(model, params, fresh(), cfg, b) for b in cfg["gen_batches"]}
    ceiling = measure.merge_ceilings(ceiling_start, measure.matmul_ceiling(["float32"], sizes, target_s=ceiling_s))
    peak = ceiling["float32"]["ceiling_flop_s"]
    work_bound(training, lm_flops(cfg, training=True, batch=cfg["batch"], steps=cfg["window"]), peak)
    for g in generation.values():  # the prompt's step and one per sampled token
        work_bound(g, lm_flops(cfg, training=False, batch=g["batch"], steps=g["length"] + 1), peak)
    if initial is not None:
        log("checking equal work (same loss, gradients and greedy tokens)")
        batch = random_batches(1, cfg["batch"], cfg["window"], cfg["vocab"], cfg["seed"])[0]
        equivalence = check_equivalence(initial, batch, lr=cfg["lr"], clip=cfg["clip"], impl=cfg["impl"])
        if not equivalence["ok"]:
            log(f"warning: the two programs differ: {equivalence}")
    else:
        equivalence = {"ok": None, "reason": reason}
    record = {
        "benchmark": "lm_cpu",
        "claim": "the CPU-performance issue's targets for the character LM: training >= 1.3x PyTorch's tokens/s, "
        "generation >= 5x PyTorch's per-token sampling loop",
        "environment": env,
        "load_average_start": env["loadavg_start"],
        "load_average_end": measure.loadavg(),
        "seconds": time.perf_counter() - start,
        "config": cfg,
        "torch": torch_info,
        "method": METHOD,
        "flop_model": FLOP_MODEL,
        "matmul_ceiling": ceiling,
        "training": training,
        "generation": generation,
        "targets": targets(training, generation),
        "equivalence": equivalence,
    }
    os.makedirs(out, exist_ok=True)
    report.save_json(os.path.join(out, output_name(cfg) + ".json"), record, indent=2)
    with open(os.path.join(out, output_name(cfg) + ".md"), "w") as f:
        f.write(markdown(record))
    return record


def output_name(cfg) -> str:
    """``lm_cpu``, or ``lm_cpu-retained`` for a run with freed memory kept (``--retain-memory``)."""
    return "lm_cpu-retained" if cfg.get("retain_memory") else "lm_cpu"


def main(argv=None) -> int:
    """Run the study; exit status 2 (one line on stderr) for a bad command line."""
    args, status = parse(build_parser(), argv)
    if status is not None:
        return status
    cfg = config_of(args)
    record = run(cfg, args.out)
    print(table(record))
    name = output_name(cfg)
    print(f"wrote {os.path.join(args.out, name + '.json')} and {name}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
