"""``jaxrnn demo`` (moving here from jaxrnn.demo)."""

from jaxrnn.demo import main  # noqa: F401
