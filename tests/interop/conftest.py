"""Loading the trax 1.4.1 fixtures written by benchmarks/trax_fixtures.py (no trax needed)."""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@dataclass
class TraxCase:
    """One fixture: trax's weights (flat, in trax's order, with their tree paths), the inputs,
    trax's outputs, the constructor arguments (`meta`) and any extra arrays."""

    meta: dict
    weights: list
    names: list
    inputs: tuple
    outputs: tuple
    extra: dict

    @property
    def x(self):
        return self.inputs[0] if len(self.inputs) == 1 else self.inputs


def load_case(name: str) -> TraxCase:
    with np.load(FIXTURES / f"{name}.npz") as z:
        meta = json.loads(str(z["meta"]))
        names = meta["order"]
        arrays = {k: z[k] for k in z.files}
    count = lambda prefix: sum(k.startswith(prefix) for k in arrays)  # noqa: E731
    return TraxCase(
        meta=meta,
        weights=[arrays[k] for k in names],
        names=names,
        inputs=tuple(arrays[f"in/{i}"] for i in range(count("in/"))),
        outputs=tuple(arrays[f"out/{i}"] for i in range(count("out/"))),
        extra={k: v for k, v in arrays.items()
               if not k.startswith(("w/", "in/", "out/")) and k != "meta"},
    )


@pytest.fixture
def trax_case():
    """`trax_case(name)` -> TraxCase of tests/interop/fixtures/<name>.npz."""
    return load_case


@pytest.fixture
def fixtures_dir():
    return FIXTURES
