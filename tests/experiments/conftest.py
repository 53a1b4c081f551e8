"""Each experiment's small configuration runs once per test session, through the command line."""

import json
import os

import matplotlib.image
import pytest

from jaxrnn import cli


@pytest.fixture(scope="session")
def experiment_record(tmp_path_factory):
    """``experiment_record(name)``: run ``jaxrnn experiment NAME --config small`` once; ``(record, out folder)``."""
    cache = {}

    def get(name):
        if name not in cache:
            out = tmp_path_factory.mktemp(name)
            assert cli.main(["experiment", name, "--config", "small", "--seed", "0", "--out", str(out)]) == 0
            with open(out / f"{name}.json", encoding="utf-8") as f:
                record = json.load(f)
            assert record["figures"] and all(path.startswith(str(out)) for path in record["figures"])
            assert any(path.endswith(".png") for path in record["figures"])
            for path in record["figures"]:  # every PNG figure is an image of a real size; others (HTML) exist
                if path.endswith(".png"):
                    image = matplotlib.image.imread(path)
                    assert image.ndim == 3 and min(image.shape[:2]) > 200
                else:
                    assert os.path.getsize(path) > 0
            cache[name] = (record, out)
        return cache[name]

    return get
