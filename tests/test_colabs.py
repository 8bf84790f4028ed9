"""The notebooks in colabs/: committed without outputs, and each runs top to bottom.

Each notebook is executed through nbclient with a real Jupyter kernel (ipykernel's
``python3``), from the ``colabs/`` folder, with ``TERRAFORMER_COLAB_SMALL=1`` (small models,
few steps: well under two minutes each on two CPU cores) and ``TERRAFORMER_COLAB_OUT`` set to
a temporary folder, where each notebook must leave its plots.
"""

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

COLABS = Path(__file__).resolve().parent.parent / "colabs"
NOTEBOOKS = {
    "decode_long_document": ["latency_dense_vs_terraformer.png"],
    "reformer_novel": ["reformer_novel_loss.png"],
    "terraformer_sparsity": ["controller_choices.png", "decode_speed_vs_dense.png"],
}
KERNEL = "python3"


def _read(name):
    return nbformat.read(COLABS / f"{name}.ipynb", as_version=4)


def _kernel_problem() -> str | None:
    """Why no python3 Jupyter kernel can start here, or None when one can."""
    try:
        from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    except ImportError:
        return "jupyter_client is not installed (pip install -e '.[test]')"
    try:
        KernelSpecManager().get_kernel_spec(KERNEL)  # ipykernel's bundled spec counts
    except NoSuchKernel:
        try:
            import ipykernel  # noqa: F401
        except ImportError:
            return f"no '{KERNEL}' kernel spec and ipykernel is not installed"
    return None


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_is_committed_without_outputs(name):
    nb = _read(name)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == KERNEL
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        assert cell.outputs == [], f"{name}.ipynb cell {i} has outputs: strip them"
        assert cell.execution_count is None, f"{name}.ipynb cell {i} has an execution count"


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_reads_the_size_switch(name):
    source = "\n".join(c.source for c in _read(name).cells if c.cell_type == "code")
    assert 'os.environ.get("TERRAFORMER_COLAB_SMALL", "0") == "1"' in source
    assert "pip install" in source  # the guarded install cell, for Colab


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_runs_small(name, tmp_path, monkeypatch):
    problem = _kernel_problem()
    if problem is not None:
        pytest.skip(problem)
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    # The kernel inherits this process's environment when it starts.
    monkeypatch.setenv("TERRAFORMER_COLAB_SMALL", "1")
    monkeypatch.setenv("TERRAFORMER_COLAB_OUT", str(tmp_path))
    monkeypatch.delenv("CHECKPOINT_DIR", raising=False)
    monkeypatch.delenv("TERRAFORMER_COLAB_TEXT", raising=False)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    nb = _read(name)
    client = NotebookClient(nb, timeout=600, kernel_name=KERNEL,
                            resources={"metadata": {"path": str(COLABS)}})
    try:
        client.execute()
    except CellExecutionError as error:
        pytest.fail(f"{name}.ipynb failed:\n{error}")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors, [f"{o.ename}: {o.evalue}" for o in errors]
    for png in NOTEBOOKS[name]:
        path = tmp_path / png
        assert path.is_file() and path.stat().st_size > 1000, f"{name}.ipynb made no {png}"
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if "image/png" in o.get("data", {})]
    assert len(images) == len(NOTEBOOKS[name]), "each plot is shown in the notebook"


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_first_cell_installs_without_editing(name):
    """No placeholder to fill in: the install cell takes the repository from
    TERRAFORMER_REPO_URL, else the checkout, and tunes the CPU runtime before JAX starts."""
    nb = _read(name)
    assert not any("<URL" in c.source for c in nb.cells), "a placeholder is left to edit"
    first = next(c.source for c in nb.cells if c.cell_type == "code")
    assert 'os.environ.get("TERRAFORMER_REPO_URL")' in first
    assert "git clone" in first.replace('"git", "clone"', "git clone")
    assert "Path.cwd().resolve().parent" in first  # the checkout the notebook runs in
    assert "terraformer.tune_cpu_runtime()" in first
    assert "import jax" not in first


def test_colab_extra_installs_a_pinned_jupyter():
    import configparser

    setup = configparser.ConfigParser()
    setup.read(COLABS.parent / "setup.cfg")
    extra = setup["options.extras_require"]["colab"].split()
    assert any(req.startswith("notebook==") for req in extra), extra
    assert all("==" in req for req in extra), extra
    assert "pip install -e '.[colab]'" in (COLABS / "README.md").read_text()
