"""The bottom layer: argument checks and warnings shared by every entry point.

Every module of jaxrnn may import this one; it imports nothing of jaxrnn.
Each check raises a ``TypeError`` (wrong kind of value) or ``ValueError``
(right kind, wrong value or shape) whose message starts with the argument's
name and states what was expected and what was given, so that bad input is
reported before any tracing reaches XLA.

Example:
  >>> check_index(np.int64(3), "num_layers")
  3
  >>> check_one_of("mode", "mean", ("last", "mean", "max"))
  'mean'
"""

from __future__ import annotations

import operator
import warnings
from typing import Any, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.interpreters import ad

__all__ = [
    "check_float_dtype",
    "check_index",
    "check_int_array",
    "check_inputs",
    "check_key",
    "check_lengths",
    "check_one_of",
    "check_rate",
    "check_static",
    "in_forward_mode",
    "is_traced",
    "shape_of",
    "warn_once",
]


def shape_of(x) -> tuple:
    """``x``'s shape as a tuple of ints (works for arrays, tracers, scalars and lists)."""
    return tuple(np.shape(x))


def is_traced(x) -> bool:
    """Whether ``x`` is a JAX tracer (an abstract value under ``jit``/``grad``/``vmap``)."""
    return isinstance(x, jax.core.Tracer)


def in_forward_mode(tree) -> bool:
    """Whether any leaf of ``tree`` is being differentiated in forward mode (``jax.jvp``, ``jacfwd``, ``hessian``).

    Walks through nested tracers (``vmap``, ``linearize``) down to a JVP
    tracer. Reverse mode (``jax.grad``, ``vjp``, ``jacrev``) linearizes and is
    not forward mode. Forward mode under an outer ``jit`` is only visible where
    it is applied inside that ``jit``.
    """
    for leaf in jax.tree_util.tree_leaves(tree):
        while isinstance(leaf, jax.core.Tracer):
            if isinstance(leaf, ad.JVPTracer):
                return True
            leaf = getattr(leaf, "primal", getattr(leaf, "val", None))
    return False


def check_index(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` as a Python ``int`` ``>= minimum``.

    Accepts anything :func:`operator.index` accepts (Python and NumPy
    integers), but not ``bool``.

    Raises:
      TypeError: ``value`` is not an integer.
      ValueError: ``value < minimum``.
    """
    kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected {kind}, got {value!r}")
    try:
        index = operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected {kind}, got {type(value).__name__} {value!r}") from None
    if index < minimum:
        raise ValueError(f"{name}: expected {kind}, got {index}")
    return index


def check_one_of(name: str, value: Any, choices: Sequence[Any], allow_callable: bool = False, hint: str = "") -> Any:
    """Return ``value`` if it is one of ``choices`` (or a callable, with ``allow_callable``).

    Raises:
      ValueError: naming ``name``, the choices and ``value``; ``hint`` is appended.
    """
    if allow_callable and callable(value):
        return value
    try:
        ok = value in choices
    except TypeError:  # an unhashable or array value
        ok = False
    if not ok:
        extra = " or a callable" if allow_callable else ""
        raise ValueError(f"{name}: expected one of {tuple(choices)}{extra}, got {value!r}{hint}")
    return value


def check_rate(
    name: str, value: Any, low: float = 0.0, high: float = 1.0, *, closed_low=True, closed_high=False, what="a rate"
) -> float:
    """``value`` as a float in the interval ``[low, high)`` (brackets per ``closed_*``); ``what`` names it in errors.

    Raises:
      TypeError: ``value`` is not a real number (strings and bools included).
      ValueError: ``value`` is outside the interval or not finite.
    """
    interval = f"{'[' if closed_low else '('}{low:g}, {high:g}{']' if closed_high else ')'}"
    if isinstance(value, (bool, np.bool_, str, bytes)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected {what} in {interval}, got {type(value).__name__} {value!r}")
    v = float(value)
    above = v >= low if closed_low else v > low
    below = v <= high if closed_high else v < high
    if not (np.isfinite(v) and above and below):
        raise ValueError(f"{name}: expected {what} in {interval}, got {value!r}")
    return v


def check_float_dtype(name: str, dtype: Any, allow_none: bool = False):
    """``dtype`` as a floating ``jnp.dtype`` (``None`` passes with ``allow_none``).

    Raises:
      TypeError: not a dtype, or not a floating-point one (integer dtypes
        would silently truncate parameters and activations).
    """
    if dtype is None and allow_none:
        return None
    try:
        d = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name}: expected a floating-point dtype, got {dtype!r}") from None
    if not jnp.issubdtype(d, jnp.floating):
        raise TypeError(f"{name}: expected a floating-point dtype (float32, bfloat16, ...), got {d}")
    return d


def check_static(name: str, value: Any, kind: type = bool) -> Any:
    """``value`` as a Python ``kind``; a traced value gets an error saying it must be static.

    Options such as ``reverse`` and ``time_major`` choose the program that is
    traced, so they must be Python values (mark them static under ``jit``).
    """
    if is_traced(value):
        raise TypeError(
            f"{name}: expected a Python {kind.__name__}, got a traced value; it selects the computation, "
            f"so pass it as a static argument (e.g. jax.jit(..., static_argnames=({name!r},)))"
        )
    if kind is bool:
        if not isinstance(value, (bool, np.bool_, int, np.integer)) or value not in (0, 1):
            raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")
        return bool(value)
    if not isinstance(value, kind):
        raise TypeError(f"{name}: expected a {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def check_int_array(value, shape: Iterable[int], name: str, what: str = "an integer array"):
    """``value`` (lists, tuples and scalars converted with NumPy) if it is an integer array of ``shape``.

    Raises:
      TypeError: not an integer array (``what`` describes the expectation).
      ValueError: the wrong shape.
    """
    if isinstance(value, (list, tuple)) or np.isscalar(value):
        value = np.asarray(value)
    dtype = getattr(value, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{name}: expected {what}, got dtype {dtype}")
    if shape_of(value) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {shape_of(value)}")
    return value


def check_lengths(seq_lengths, batch_shape: Iterable[int], T: int, name: str = "seq_lengths"):
    """Check an integer lengths array of shape ``batch_shape``; concrete values must be in ``[0, T]``.

    Lists, tuples and scalars are converted with NumPy. Traced values are
    returned unchanged (the runner clamps them).

    Returns:
      ``seq_lengths`` as an array.
    """
    seq_lengths = check_int_array(seq_lengths, batch_shape, name)
    if not is_traced(seq_lengths):
        values = np.asarray(seq_lengths)
        if values.size and (values.min() < 0 or values.max() > T):
            raise ValueError(
                f"{name}: expected values in [0, {T}] (the sequence length), "
                f"got min {values.min()} and max {values.max()}"
            )
    return seq_lengths


def check_inputs(xs, name: str = "xs", time_major: bool = False, ranks: Sequence[int] = (2, 3)) -> None:
    """Check ``xs`` is a floating-point array of rank 2 (unbatched ``(T, I)``) or 3."""
    dtype = getattr(xs, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name}: expected a floating-point array, got {type(xs).__name__} of dtype {dtype}")
    layout = "(T, B, input_size)" if time_major else "(B, T, input_size)"
    if np.ndim(xs) not in ranks:
        raise ValueError(f"{name}: expected shape {layout} or (T, input_size), got {shape_of(xs)}")


def check_key(name: str, key: Any, allow_none: bool = True):
    """Check ``key`` is a PRNG key (new-style ``jax.random.key`` or raw ``uint32[2]``)."""
    if key is None and allow_none:
        return None
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key) and np.ndim(key) == 0:
        return key
    if dtype == jnp.uint32 and shape_of(key) == (2,):
        return key
    raise TypeError(
        f"{name}: expected a PRNG key (jax.random.key(seed)), got {type(key).__name__}"
        f"{'' if dtype is None else f' of dtype {dtype} and shape {shape_of(key)}'}"
    )


def warn_once(message: str, _seen: Optional[set] = None) -> None:
    """Emit ``message`` as a ``UserWarning`` once per process."""
    seen = _WARNED if _seen is None else _seen
    if message not in seen:
        seen.add(message)
        warnings.warn(message, stacklevel=3)


_WARNED: set = set()
