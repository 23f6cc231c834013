"""The notebooks: committed stripped, importing the packages only, and executing top to bottom with figures.

The execution test is ``slow`` (about 2 minutes with the fast quickstart's models; 1-3 more the first time,
when ``tools.notebook_support`` trains them):

    HF_HUB_OFFLINE=1 uv run pytest tests/tools/test_notebooks.py -m slow
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch

from tokenizer.data.phantoms import PhantomDataset
from tokenizer.errors import InputError
from tools import notebook_support as nbs

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXPECTED = {"01_tokenize_and_reconstruct", "02_token_space", "03_generate_and_describe"}
ALLOWED_IMPORTS = {"os", "pathlib", "textwrap", "matplotlib", "numpy", "torch", "tokenizer", "lm"}


def test_the_three_notebooks_exist():
    assert {path.stem for path in NOTEBOOKS} >= EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_valid_and_stripped(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, f"{path.name} has no code cells"
    for cell in code:
        assert cell.outputs == [], f"{path.name}: cell {cell.id} has outputs; strip them before committing"
        assert cell.execution_count is None, f"{path.name}: cell {cell.id} has an execution count"
    assert nb.metadata.kernelspec.name == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_imports_the_packages_and_defines_no_models(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        tree = ast.parse(cell.source)  # plain Python: no magics
        for node in ast.walk(tree):
            assert not isinstance(node, ast.ClassDef), f"{path.name}: cell {cell.id} defines a class"
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [
                    f"{node.module}.{a.name}" if node.module == "tools" else node.module for a in node.names
                ]
            else:
                continue
            for name in names:  # tools: only the shared helper, never an entry point's internals
                ok = name == "tools.notebook_support" or name.split(".")[0] in ALLOWED_IMPORTS
                assert ok, f"{path.name}: cell {cell.id} imports {name}"


# ------------------------------------------------------------------------------------------ notebook_support
def _fake_variant(outputs: Path, variant: str, *, lm: bool = True) -> None:
    stages = outputs / f"quickstart-{variant}"
    (stages / "tokenizer_text" / "tokenizer").mkdir(parents=True)
    (stages / "tokenizer_text" / "tokenizer" / "config.json").write_text("{}")
    if lm:
        (stages / "lm" / "model").mkdir(parents=True)
        (stages / "lm" / "model" / "config.json").write_text("{}")


def test_find_quickstart_models_prefers_full_and_needs_both_models(tmp_path):
    assert nbs.find_quickstart_models(tmp_path) is None
    _fake_variant(tmp_path, "full", lm=False)  # an unfinished full run
    assert nbs.find_quickstart_models(tmp_path) is None
    _fake_variant(tmp_path, "fast")
    found = nbs.find_quickstart_models(tmp_path)
    assert found.variant == "fast" and found.lm == tmp_path / "quickstart-fast" / "lm" / "model"
    (tmp_path / "quickstart-full" / "lm" / "model").mkdir(parents=True)
    (tmp_path / "quickstart-full" / "lm" / "model" / "config.json").write_text("{}")
    found = nbs.find_quickstart_models(tmp_path)
    assert found.variant == "full"
    assert found.tokenizer == tmp_path / "quickstart-full" / "tokenizer_text" / "tokenizer"


def test_quickstart_models_reuses_what_it_finds(tmp_path, monkeypatch, capsys):
    _fake_variant(tmp_path, "fast")
    monkeypatch.setenv(nbs.OUTPUTS_ENV, str(tmp_path))
    assert nbs.default_outputs() == tmp_path
    assert nbs.quickstart_models().stages == tmp_path / "quickstart-fast"  # no training: it exists
    assert "quickstart-fast" in capsys.readouterr().out


def test_quickstart_models_runs_the_fast_quickstart_when_nothing_is_there(tmp_path, monkeypatch):
    calls = []

    def fake_run(command, **kwargs):
        calls.append((command, kwargs))
        _fake_variant(tmp_path, "fast")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(nbs.subprocess, "run", fake_run)
    assert nbs.quickstart_models(tmp_path).variant == "fast"
    (command, kwargs), *more = calls
    assert not more and command == [
        sys.executable,
        "-m",
        "tools.quickstart",
        "--fast",
        "--outputs",
        str(tmp_path),
    ]
    assert kwargs["cwd"] == ROOT and not kwargs.get("shell")
    assert nbs.quickstart_models(tmp_path).variant == "fast" and len(calls) == 1  # reused, not retrained


def test_quickstart_models_reports_a_failed_run(tmp_path, monkeypatch):
    def failing(command, **kwargs):
        return subprocess.CompletedProcess(command, 2, "", "InputError: something specific")

    monkeypatch.setattr(nbs.subprocess, "run", failing)
    with pytest.raises(RuntimeError, match="exit code 2:\\nInputError: something specific"):
        nbs.quickstart_models(tmp_path)


def test_repo_root_walks_up_to_pyproject(tmp_path):
    assert nbs.repo_root(ROOT / "notebooks") == ROOT
    assert nbs.repo_root(ROOT / "tools") == ROOT
    with pytest.raises(InputError, match="pyproject.toml"):
        nbs.repo_root(tmp_path)


def test_package_file_finds_shipped_data_and_names_what_is_missing():
    path = nbs.package_file("pydicom", "data", "test_files", "CT_small.dcm")
    assert path.is_file() and path.name == "CT_small.dcm"
    with pytest.raises(InputError, match="no_such_file.dcm"):
        nbs.package_file("pydicom", "data", "test_files", "no_such_file.dcm")
    with pytest.raises(InputError, match="not an installed package"):
        nbs.package_file("no_such_package_medtok")


@pytest.mark.parametrize("channels", [1, 3])
def test_phantom_input_matches_the_dataset(channels):
    dataset = PhantomDataset(6, seed=4, size=32, channels=channels)
    for i in range(len(dataset)):  # seed 4 draws both grayscale and colour looks
        expected = dataset[i]["image"]
        got = nbs.phantom_input(dataset.phantom(i), channels)
        assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-6)
    assert {dataset.phantom(i).image.ndim for i in range(len(dataset))} == {2, 3}


def test_to_display_maps_to_unit_range_and_keeps_grayscale_2d():
    gray = torch.tensor([-1.0, 0.0, 1.0]).view(1, 1, 1, 3).expand(2, 3, 1, 3)
    shown = nbs.to_display(gray)
    assert shown.shape == (2, 1, 3) and np.allclose(shown[0, 0], [0.0, 0.5, 1.0])
    colour = torch.rand(3, 4, 5) * 2 - 1
    shown = nbs.to_display(colour)
    assert shown.shape == (1, 4, 5, 3) and np.allclose(shown[0], ((colour + 1) / 2).permute(1, 2, 0).numpy())


# ------------------------------------------------------------------------------------------ execution
@pytest.fixture
def kernel_name(tmp_path, monkeypatch):
    """A kernelspec for the running interpreter, found through JUPYTER_PATH (nothing installed for the user)."""
    name = "medtok-notebook-test"
    spec = tmp_path / "jupyter" / "kernels" / name
    spec.mkdir(parents=True)
    kernel = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "MedTok-LM tests",
        "language": "python",
        # one thread: small models decode token by token, and two threads on a busy 2-core machine fight
        "env": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    }
    (spec / "kernel.json").write_text(json.dumps(kernel))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return name


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("index", range(len(NOTEBOOKS)), ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes_and_draws(index, kernel_name):
    from nbclient import NotebookClient

    path = NOTEBOOKS[index]
    cwd = ROOT / "notebooks" if index % 2 == 0 else ROOT  # Jupyter may start in either; both must work
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, kernel_name=kernel_name, timeout=900, resources={"metadata": {"path": str(cwd)}}
    ).execute()

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    errors = [out for out in outputs if out.output_type == "error"]
    assert not errors, f"{path.name}: {errors[0].ename}: {errors[0].evalue}"
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert images, f"{path.name} drew no figure"
