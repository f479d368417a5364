"""notebooks/colab_tpu.ipynb cannot rot silently: valid notebook JSON, and every cell but the install
runs here, in order, on tiny synthetic settings (the install cell runs with pip stubbed out)."""

import json
import subprocess
import sys
import types
import zipfile

import pytest

from conftest import ROOT

NOTEBOOK = ROOT / "notebooks" / "colab_tpu.ipynb"
TINY = dict(EPOCHS=1, SEEDS=[0], NORMS=["bn"], DATASET="synthetic", EXTRA=["--preset", "narrow"], PROJECT=None)


def code_cells():
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    return [(c.get("metadata", {}).get("tags", []), "".join(c["source"])) for c in cells if c["cell_type"] == "code"]


def execute(source, namespace, name):
    exec(compile(source, f"{NOTEBOOK.name}:{name}", "exec"), namespace)


def test_the_notebook_is_valid_nbformat_4_stored_clean_and_plain_python():
    text = NOTEBOOK.read_text()
    notebook = json.loads(text)
    assert notebook["nbformat"] == 4 and isinstance(notebook["metadata"], dict)
    for cell in notebook["cells"]:
        assert cell["cell_type"] in ("markdown", "code") and isinstance(cell["metadata"], dict)
        assert isinstance(cell["source"], list) and all(isinstance(line, str) for line in cell["source"])
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None  # stored without outputs
            compile("".join(cell["source"]), "cell", "exec")  # plain Python: no `!` or `%` magics to fail silently
    tags = [tags for tags, _ in code_cells()]
    assert tags[0] == ["parameters"] and sum("install" in t for t in tags) == 1
    try:
        import nbformat
    except ImportError:
        return  # the structure checks above stand in for the schema
    nbformat.validate(nbformat.reads(text, as_version=4))


@pytest.fixture
def fake_display(monkeypatch):
    """IPython.display, recording what the notebook shows (and that the files exist)."""
    shown = []
    module = types.ModuleType("IPython.display")
    module.display = shown.append

    def image(path):
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", path
        return ("image", str(path))

    module.Image, module.Markdown = image, lambda text: ("markdown", text)
    monkeypatch.setitem(sys.modules, "IPython", types.ModuleType("IPython"))
    monkeypatch.setitem(sys.modules, "IPython.display", module)
    return shown


def test_the_notebook_runs_the_study_on_tiny_settings(tmp_path, monkeypatch, capsys, fake_display):
    monkeypatch.chdir(ROOT / "notebooks")  # opened from a checkout: the project is found in ".."
    cells = code_cells()
    namespace = {}
    execute(cells[0][1], namespace, "settings")
    assert set(TINY) | {"STORE"} <= set(namespace)  # the settings the test overrides still exist
    namespace.update(TINY, STORE=str(tmp_path / "store"))
    commands = []
    for i, (tags, source) in enumerate(cells[1:], 1):
        if "install" in tags:  # pip stubbed: the commands it would run are checked below
            real_run, namespace["run"] = namespace["run"], lambda *c: commands.append([str(a) for a in c])
            execute(source, namespace, f"cell {i}")
            namespace["run"] = real_run
        else:
            execute(source, namespace, f"cell {i}")
    output = capsys.readouterr().out

    assert namespace["PROJECT"] == str(ROOT)
    # The runtime's jax is kept: no jax requirement, jax held by a constraint; then the package itself.
    assert "-c" in commands[0] and not any(a.startswith("jax") for a in commands[0])
    assert commands[-1][-3:] == ["--no-deps", "--force-reinstall", str(ROOT)]
    assert "device(s): [CpuDevice" in output
    assert (tmp_path / "store" / "runs" / "synthetic" / "bn-s0" / "metrics.json").is_file()
    markdown = [item[1] for item in fake_display if item[0] == "markdown"]
    images = [item[1] for item in fake_display if item[0] == "image"]
    assert len(markdown) == 1 and "BatchNorm" in markdown[0]
    assert [p.rsplit("/", 1)[1] for p in images] == ["curves.png", "misclassified-bn.png"]

    # A failing command stops the notebook (an exception, not a printed error and on to the next cell).
    with pytest.raises(subprocess.CalledProcessError):
        namespace["run"](sys.executable, "-c", "raise SystemExit(3)")


def test_the_notebook_finds_the_project_in_an_uploaded_zip(tmp_path, monkeypatch, capsys):
    # GitHub's "Download ZIP": jaxnorm-main.zip holding jaxnorm-main/.
    with zipfile.ZipFile(tmp_path / "jaxnorm-main.zip", "w") as archive:
        archive.writestr("jaxnorm-main/pyproject.toml", "")
        archive.writestr("jaxnorm-main/scripts/study.py", "")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    execute(code_cells()[0][1], namespace, "settings")
    namespace.update(STORE=str(tmp_path / "store"), PROJECT=str(ROOT))
    execute(code_cells()[1][1], namespace, "cell 1")
    # Search only here (the test machine might hold other copies in /content or /kaggle).
    namespace.update(PLACES=["./*"], ZIPS=["*.zip"])
    project = namespace["find_project"]()
    assert (tmp_path / project).resolve() == tmp_path / "jaxnorm-main" / "jaxnorm-main"
