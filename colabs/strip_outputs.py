"""Strips outputs and execution counts from notebooks before they are committed.

    python colabs/strip_outputs.py                # every colabs/*.ipynb
    python colabs/strip_outputs.py path/to/x.ipynb ...
    python colabs/strip_outputs.py --check        # exit 1 when a notebook still has outputs

The test suite (tests/test_colabs.py) fails on a committed notebook with outputs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
VOLATILE_METADATA = ("execution", "collapsed", "scrolled", "jupyter", "outputId", "colab")


def has_outputs(nb) -> bool:
    """Whether any code cell of `nb` holds outputs or an execution count."""
    return any(
        cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
        for cell in nb.cells
    )


def strip(nb):
    """Empties every code cell's outputs and execution count and drops per-run cell metadata;
    returns `nb` (changed in place)."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        for key in VOLATILE_METADATA:
            cell.metadata.pop(key, None)
    nb.metadata.pop("widgets", None)
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path,
                        help="notebooks to strip (default: colabs/*.ipynb)")
    parser.add_argument("--check", action="store_true",
                        help="only report notebooks with outputs; exit 1 if there are any")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted(HERE.glob("*.ipynb"))
    dirty = []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        if not has_outputs(nb):
            continue
        dirty.append(path)
        if not args.check:
            nbformat.write(strip(nb), path)
            print(f"stripped {path}")
    if args.check and dirty:
        print("notebooks with outputs: " + ", ".join(map(str, dirty)), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
