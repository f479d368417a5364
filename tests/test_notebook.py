"""notebooks/colab_tpu.ipynb cannot rot silently: valid notebook JSON, and every cell but the install
runs here, in order, on tiny synthetic settings (the install cell runs with pip stubbed out), after a
disconnect that left a run half-finished and locked by a VM that is gone. The install's choices are
tried for other runtimes (Python, jax, accelerator) without installing anything; Kaggle's folders too."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import types
import zipfile
from importlib.metadata import version

import pytest
from packaging.requirements import Requirement

from conftest import ROOT
from jaxnorm.runlock import LOCK_NAME, STALE_SECONDS
from test_robust import _load_script

NOTEBOOK = ROOT / "notebooks" / "colab_tpu.ipynb"
TINY = dict(EPOCHS=2, SEEDS=[0], NORMS=["bn"], DATASET="synthetic", EXTRA=["--preset", "narrow"],
            PROJECT=None)


def code_cells():
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    return [(c.get("metadata", {}).get("tags", []), "".join(c["source"]))
            for c in cells if c["cell_type"] == "code"]


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
            # plain Python: no `!` or `%` magics to fail silently
            compile("".join(cell["source"]), "cell", "exec")
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


def leave_a_run_as_a_lost_vm_does(store):
    """What a Colab disconnect during epoch 2 leaves on Drive: run bn-s0 of the study with the checkpoint
    of epoch 1 as its latest, and the lock of a VM that is gone (another host name, untouched for longer
    than a running holder ever leaves it)."""
    workdir = store / "runs" / "synthetic" / "bn-s0"
    (store / "data").mkdir(parents=True)
    _load_script().main(["--dataset", "synthetic", "--data-dir", str(store / "data"), "--epochs", "2",
                         "--seed", "0", "--norm", "bn", "--preset", "narrow", "--no-progress",
                         "--workdir", str(workdir)])
    steps = sorted(int(p.name) for p in (workdir / "ckpt").iterdir() if p.name.isdigit())
    shutil.rmtree(workdir / "ckpt" / str(steps[-1]))  # epoch 2's save never happened
    lock = workdir / LOCK_NAME
    lock.write_text(json.dumps({"pid": 4242, "host": "lost-vm", "since": "2026-05-04 10:00:00"}))
    then = time.time() - STALE_SECONDS - 60
    os.utime(lock, (then, then))
    return workdir


def test_the_notebook_runs_the_study_on_tiny_settings_resuming_a_lost_vms_run(tmp_path, monkeypatch, capsys,
                                                                              fake_display):
    run_folder = leave_a_run_as_a_lost_vm_does(tmp_path / "store")
    capsys.readouterr()
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
    # The runtime's jax (the tested one here) is kept: no jax requirement, jax held by a constraint; then
    # the package itself.
    assert f"jax {version('jax')}: this runtime's, within the tested range" in output
    assert "-c" in commands[0] and not any(a.startswith("jax") for a in commands[0])
    assert commands[-1][-3:] == ["--no-deps", "--force-reinstall", str(ROOT)]
    assert "device(s): [CpuDevice" in output
    # The lost VM's lock was taken over, its run resumed at epoch 2 and finished.
    assert f"note: {run_folder} was locked by PID 4242 on host lost-vm (since 2026-05-04 10:00:00)" in output
    assert "training bn seed 0 (resuming at epoch 1)" in output
    assert len(json.loads((run_folder / "metrics.json").read_text())) == 2
    assert not (run_folder / LOCK_NAME).exists()
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


@pytest.fixture
def install_plan(tmp_path, monkeypatch, capsys):
    """The install cell's decision, a pure function: what it would install on another runtime."""
    namespace = {}
    execute(code_cells()[0][1], namespace, "settings")
    namespace.update(STORE=str(tmp_path / "store"), PROJECT=str(ROOT))
    for i, (tags, source) in enumerate(code_cells()[1:], 1):
        if "install" in tags:
            namespace["run"] = lambda *command: None
            execute(source, namespace, f"cell {i}")
            break
        execute(source, namespace, f"cell {i}")
    capsys.readouterr()
    pyproject = (ROOT / "pyproject.toml").read_text()
    return lambda *runtime: namespace["install_plan"](pyproject, *runtime)


def _project():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    tested = next(r.specifier for r in requirements if r.name == "jax")
    return project, tested, [str(r) for r in requirements if r.name != "jax"]


@pytest.mark.parametrize("jax, accelerator, cuda, extra", [
    ("0.4.38", "tpu", None, "tpu"),      # an older jax than tested: the project's tpu extra
    (None, "tpu", None, "tpu"),          # no jax at all
    ("99.0.0", "gpu", 13, "cuda13"),     # a newer jax; the driver supports CUDA 13
    ("0.4.38", "gpu", 12, "cuda12"),
    (None, "gpu", None, "cuda12"),       # driver version unknown
    (None, "cpu", None, None),
])
def test_a_jax_outside_the_tested_range_is_replaced_by_the_tested_one(install_plan, jax, accelerator, cuda,
                                                                      extra):
    project, tested, others = _project()
    requirements, keep, choice = install_plan("3.11.7", jax, accelerator, cuda)
    wanted = Requirement(requirements[0])
    assert not keep and requirements[1:] == others
    assert wanted.name == "jax" and wanted.specifier == tested
    assert wanted.extras == ({extra} if extra else set())
    if extra == "tpu":
        assert requirements[0] == project["optional-dependencies"]["tpu"][0]  # the project's own extra
    found = (f"this runtime's jax {jax} is outside the tested range {tested}" if jax
             else "this runtime has no jax")
    assert choice == f"{found}: installing {requirements[0]} with the project"


def test_a_jax_within_the_tested_range_is_kept(install_plan):
    _, tested, others = _project()
    for accelerator in ("tpu", "gpu", "cpu"):
        requirements, keep, choice = install_plan("3.12.1", version("jax"), accelerator, 12)
        assert keep and requirements == others
        assert choice == f"jax {version('jax')}: this runtime's, within the tested range {tested}: kept"


def test_a_python_older_than_requires_python_stops_the_install_with_one_line(install_plan, monkeypatch):
    monkeypatch.setitem(sys.modules, "tomllib", None)  # as on Python 3.10: checked before it is needed
    needs = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    with pytest.raises(RuntimeError) as info:
        install_plan("3.10.12", "0.10.2", "tpu", None)
    message = str(info.value)
    assert message.startswith(f"this runtime's Python 3.10.12 is too old: jaxnorm needs Python {needs}. "
                              "Choose a newer runtime") and "\n" not in message


def test_on_kaggle_the_project_copy_and_the_store_are_apart(tmp_path, monkeypatch, capsys):
    # A Kaggle dataset: read-only (root may write anywhere, so the test says so through os.access).
    dataset = tmp_path / "input" / "jaxnorm-main"
    (dataset / "scripts").mkdir(parents=True)
    (dataset / "pyproject.toml").write_text("")
    (dataset / "scripts" / "study.py").write_text("")
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: not str(path).startswith(str(dataset))
                        and access(path, mode, **kw))
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    namespace = {}
    execute(code_cells()[0][1], namespace, "settings")
    namespace.update(PROJECT=str(dataset))
    execute(code_cells()[1][1], namespace, "cell 1")
    store, project = namespace["STORE"], namespace["PROJECT"]
    assert store == "/kaggle/working/jaxnorm" and project == str(tmp_path / "tmp" / "jaxnorm-project")
    assert os.path.isfile(f"{project}/scripts/study.py")  # the copy pip builds from
    assert os.path.commonpath([store, project]) not in (store, project)  # neither holds the other
    output = capsys.readouterr().out
    assert "Internet must be on" in output
    assert "/kaggle/working is kept only as the output of a saved version (Save Version)" in output
