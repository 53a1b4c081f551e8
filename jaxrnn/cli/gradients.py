"""``jaxrnn gradients`` (moving here from jaxrnn.plotting)."""

from jaxrnn.plotting import main  # noqa: F401
