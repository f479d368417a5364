import dataclasses
import json

import jax
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from conftest import ROOT, run_script
from jaxnorm import parallel
from jaxnorm.checkpoint import CheckpointError
from jaxnorm.config import Config
from jaxnorm.evaluate import (
    choose_misclassified,
    classification_metrics,
    evaluate_run,
    format_metrics,
    make_predict,
    network_name,
    restore_run,
    run_title,
    write_run_report,
)
from jaxnorm.figures import misclassified_grid, plot_curves
from jaxnorm.models import build_model, count_params, model_summary
from jaxnorm.networks import receptive_field
from jaxnorm.train import train_and_evaluate


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One tiny BatchNorm run of 2 epochs (its checkpoints are read, never written, by the tests)."""
    from jaxnorm.data import synthetic_dataset
    data = synthetic_dataset(64, 32, image_shape=(16, 16, 3))
    config = Config(dataset="synthetic", width=8, transition_width=8, batch_size=16, epochs=2, dropout=0.0,
                    eval_batch_size=32)
    workdir = tmp_path_factory.mktemp("run")
    result = train_and_evaluate(config, workdir, dataset=data, progress=False)
    return workdir, data, result


def test_receptive_field_reproduces_the_seed_hand_computation():
    table = receptive_field(build_model(Config()).spatial_layers(), 32)
    rf = {r["layer"]: r["rf"] for r in table}
    assert [rf[n] for n in ("C1", "C2", "P1", "C3", "C4", "C5", "P2", "C7", "C8", "C9", "GAP")] == \
        [3, 5, 6, 10, 14, 18, 20, 28, 36, 44, 72]
    assert rf["c3"] == rf["C2"] and rf["c6"] == rf["C5"] and rf["c10"] == rf["GAP"]  # 1x1 convs: no change
    sizes = {r["layer"]: r["output_size"] for r in table}
    assert (sizes["C2"], sizes["P1"], sizes["P2"], sizes["GAP"]) == (32, 16, 8, 1)
    assert {r["layer"]: r["jump"] for r in table}["C9"] == 4


def test_summary_table_counts_the_parameters_of_the_model():
    model = build_model(Config())
    text = model_summary(model, (32, 32, 3))
    assert "34,872" in text and "C1" in text and "c10" in text and "[-1, 8, 8, 24]" in text
    assert "BatchNorm running statistics" in text and "384" in text
    variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3)), train=False)
    assert count_params(variables["params"]) == 34_872


def test_summary_script_takes_the_network_variant_options():
    result = run_script("summary.py", "--norm", "gn", "--skip", "--relu-before-norm",
                        "--weight-standardization")
    assert result.returncode == 0, result.stderr
    assert "34,872" in result.stdout and "C1_norm    GroupNorm" in result.stdout  # none adds a parameter


def test_classification_metrics_match_a_direct_computation():
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(50, 4)), rng.integers(0, 4, 50)
    m = classification_metrics(logits, labels, 4)
    predicted = logits.argmax(-1)
    assert m["accuracy"] == pytest.approx(np.mean(predicted == labels))
    confusion = np.asarray(m["confusion_matrix"])
    assert confusion.sum() == 50 and np.trace(confusion) == np.sum(predicted == labels)
    for c in range(4):
        assert m["per_class_accuracy"][c] == pytest.approx(np.mean(predicted[labels == c] == c))
        assert confusion[c, 2] == np.sum((labels == c) & (predicted == 2))


def test_grid_shows_only_misclassified_images_with_their_annotations(tmp_path):
    images = np.zeros((6, 8, 8, 1), np.uint8)  # grayscale images must plot too
    labels = np.array([0, 1, 2, 0, 1, 2])
    logits = np.log(np.array([[.8, .1, .1], [.7, .2, .1], [.1, .1, .8], [.2, .2, .6], [.1, .9, 0.0001],
                              [.3, .5, .2]]))
    chosen = choose_misclassified(logits, labels, 4)
    misclassified_grid(images, chosen, ["a", "b", "c"], tmp_path / "grid.png", rows=2, cols=2)
    assert [c["index"] for c in chosen] == [1, 3, 5]
    assert [(c["true"], c["predicted"]) for c in chosen] == [(1, 0), (0, 2), (2, 1)]
    assert [c["probability"] for c in chosen] == pytest.approx([0.7, 0.6, 0.5])
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert len(choose_misclassified(logits, labels, 2)) == 2


def test_restore_rebuilds_the_model_from_the_saved_config_alone(trained_run):
    workdir, data, result = trained_run
    run = restore_run(workdir, step=8)  # the last epoch's step: 2 epochs x 4 steps
    assert run.config.width == 8 and run.config.norm == "bn" and run.step == 8
    expected = result["state"].apply_fn({"params": result["state"].params,
                                         "batch_stats": result["state"].batch_stats}, data.test_images)
    variables = {"params": run.state.params, "batch_stats": run.state.batch_stats}
    np.testing.assert_allclose(run.model.apply(variables, data.test_images), expected, atol=1e-5)


def test_evaluation_accuracy_equals_a_direct_computation(trained_run):
    workdir, data, _ = trained_run
    run = restore_run(workdir)
    results = evaluate_run(run, data)
    for split, images, labels in (("train", data.train_images, data.train_labels),
                                  ("test", data.test_images, data.test_labels)):
        logits = run.model.apply({"params": run.state.params, "batch_stats": run.state.batch_stats}, images)
        assert results[split]["accuracy"] == pytest.approx(np.mean(np.argmax(logits, -1) == labels))
    assert results["test"]["accuracy"] == pytest.approx(run.meta["history"][-1]["test_accuracy"])  # final


def test_flip_averaging_is_the_mean_of_the_logits_of_each_image_and_its_mirror(trained_run):
    workdir, data, _ = trained_run
    run = restore_run(workdir)
    variables = {"params": run.state.params, "batch_stats": run.state.batch_stats}
    plain = run.model.apply(variables, data.test_images)
    mirrored = run.model.apply(variables, data.test_images[:, :, ::-1])
    assert not np.allclose(plain, mirrored, atol=1e-3)  # else the test below could not tell them apart
    got = make_predict(run.mesh, 16, flip_average=True)(run.state, data.test_images)
    np.testing.assert_allclose(got, (plain + mirrored) / 2, atol=1e-5)
    record = evaluate_run(run, data)  # trained with flips: the averaged figure beside the plain one
    expected = np.mean(np.argmax(plain + mirrored, -1) == data.test_labels)
    assert record["test_flip_average"]["accuracy"] == pytest.approx(expected)
    no_flips = dataclasses.replace(run, config=run.config.replace(flip=False))
    assert "test_flip_average" not in evaluate_run(no_flips, data)


def test_the_final_checkpoint_is_the_default_and_no_best_is_chosen_on_the_test_set(trained_run):
    workdir, _, result = trained_run
    assert restore_run(workdir).step == result["history"][-1]["step"] == 8
    with pytest.raises(CheckpointError, match="no validation split"):
        restore_run(workdir, best=True)


def test_a_validation_run_has_a_best_validation_checkpoint_and_says_validation(tmp_path, capsys):
    from jaxnorm.data import split_train_test, synthetic_dataset
    data = split_train_test(synthetic_dataset(96, 8, image_shape=(16, 16, 3)), 64)  # 64 train / 32 validation
    config = Config(dataset="synthetic", width=8, transition_width=8, batch_size=16, epochs=3, dropout=0.0,
                    eval_batch_size=32, train_split=64, lr=0.5)
    result = train_and_evaluate(config, tmp_path, dataset=data, progress=False)
    assert "best validation" in capsys.readouterr().out.strip().splitlines()[-1]
    run = restore_run(tmp_path, best=True)
    assert run.step == max(result["history"], key=lambda h: h["test_accuracy"])["step"]
    record = write_run_report(run, data)
    assert record["evaluation_set"] == "validation" and record["test"]["count"] == 32
    assert "validation accuracy" in run_title(run, record["test"]["accuracy"])


def test_run_report_writes_its_files(trained_run):
    workdir, data, _ = trained_run
    record = write_run_report(restore_run(workdir), data, rows=2, cols=3)
    for name in ("evaluation.json", "misclassified.png", "curves.png"):
        assert (workdir / name).stat().st_size > 0
    saved = json.loads((workdir / "evaluation.json").read_text())
    assert saved["test"]["accuracy"] == record["test"]["accuracy"]
    assert len(saved["misclassified"]) <= 6
    for c in saved["misclassified"]:
        assert c["true"] != c["predicted"] and data.test_labels[c["index"]] == c["true"]


def test_a_run_report_is_reused_while_its_final_checkpoint_and_data_are_the_same(trained_run):
    from jaxnorm.evaluate import run_report

    workdir, data, _ = trained_run
    first = run_report(workdir, data)  # no evaluation.json yet: evaluated
    path = workdir / "evaluation.json"
    written = path.stat().st_mtime_ns
    assert run_report(workdir, data) == json.loads(path.read_text()) and path.stat().st_mtime_ns == written
    path.write_text(json.dumps({**first, "step": first["step"] - 1}))  # of an earlier checkpoint
    assert run_report(workdir, data)["step"] == first["step"]
    other = dataclasses.replace(data, source="other images")
    assert run_report(workdir, other)["data_source"] == "other images"


def test_restore_of_a_folder_without_checkpoints_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoints"):
        restore_run(tmp_path)
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(CheckpointError, match=r"no checkpoints \(ckpt/ is empty\)"):
        restore_run(tmp_path)
    # A half-written first save: the same message as every other reader of the folder (checkpoint.py's).
    (tmp_path / "ckpt" / "4.orbax-checkpoint-tmp-1763690000000000" / "state").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="holds only a half-written checkpoint"):
        restore_run(tmp_path)


@pytest.mark.parametrize("make, message", [("missing", "does not exist"), ("empty", "no checkpoints")])
def test_evaluate_script_on_a_bad_folder_is_one_line_and_non_zero(make, message, tmp_path):
    workdir = tmp_path / "run"
    if make == "empty":
        (workdir / "ckpt").mkdir(parents=True)
    result = run_script("evaluate.py", "--workdir", workdir)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr


def test_study_report_names_a_subset_as_not_cifar10(tmp_path):
    from jaxnorm.data import Dataset
    from jaxnorm.study import dataset_name, write_study
    subset = Dataset(np.zeros((5085, 2, 2, 3), np.uint8), np.zeros(5085, np.int32), np.zeros((1017, 2, 2, 3),
                     np.uint8), np.zeros(1017, np.int32), tuple("abcdefghij"), source="subset.tar.gz")
    assert dataset_name("cifar10", subset) == "cifar10-subset-5085"

    def record(seed, accs):
        history = [{"epoch": i + 1, "train_accuracy": a, "test_accuracy": a, "train_loss": 1.0,
                    "test_loss": 1.0, "seconds": 2.0} for i, a in enumerate(accs)]
        return {"config": Config(seed=seed).to_dict(), "num_params": 34872, "history": history,
                "train": {"accuracy": accs[-1]}}

    records = {"bn": [record(0, [0.4, 0.6, 0.5]), record(1, [0.3, 0.7, 0.6])],
               "gn": [record(0, [0.2, 0.3, 0.4])]}
    text = write_study(records, subset, tmp_path, dataset_key="cifar10").read_text()
    assert "5,085-image CIFAR-10 subset, not CIFAR-10" in text and "subset.tar.gz" in text
    assert "| BatchNorm (`bn`) | 34,872 | 55.00% ± 7.07% | 55.00% ± 7.07% | 3 |" in text  # final epoch only
    assert "best" not in text.lower() and "| final test |" in text
    assert "| GroupNorm (`gn`) | 34,872 | 40.00% |" in text and (tmp_path / "curves.png").is_file()
    assert Config().recipe() in text  # the recipe as trained, from the runs' config
    assert "flip-averaged" not in text  # no run measured it


def test_study_report_adds_flip_averaged_test_accuracy_when_every_run_has_it(tmp_path):
    from jaxnorm.data import Dataset
    from jaxnorm.study import write_study
    data = Dataset(np.zeros((50000, 2, 2, 3), np.uint8), np.zeros(50000, np.int32),
                   np.zeros((10, 2, 2, 3), np.uint8), np.zeros(10, np.int32), tuple("abcdefghij"),
                   source="cifar-10-jpeg.tar.gz", copy="JPEG")
    history = [{"epoch": 1, "train_accuracy": 0.5, "test_accuracy": 0.6, "train_loss": 1.0, "test_loss": 1.0,
                "seconds": 2.0}]
    config = Config(schedule="linear", warmup_epochs=1, nesterov=True, dropout=0.0, lr=0.1, crop=True,
                    relu_before_norm=True)
    records = {"ln": [{"config": config.replace(norm="ln", seed=s).to_dict(), "num_params": 34872,
                       "history": history, "train": {"accuracy": 0.5}, "test_flip_average": {"accuracy": a}}
                      for s, a in ((0, .7), (1, .8))]}
    text = write_study(records, data, tmp_path, dataset_key="cifar10").read_text()
    assert "Data: CIFAR-10 (JPEG copy) (50,000 training" in text
    assert "SGD Nesterov momentum 0.9, lr 0.1 (1-epoch linear warm-up, then linear decay to 0)" in text
    assert "weight decay 0.0005, dropout 0, flips, pad-4 crops" in text
    assert "| final test, flip-averaged |" in text and "| 75.00% ± 7.07% |" in text
    # The network variant: in the heading and in the network's description.
    assert text.startswith("# Normalisation study (ReLU before the norm)\n")
    assert "CNN (width 24/16) + ReLU before the norm; " in text


def test_study_of_validation_runs_says_validation_and_chooses_best_on_it(tmp_path):
    from jaxnorm.data import Dataset
    from jaxnorm.study import write_study
    data = Dataset(np.zeros((45000, 2, 2, 3), np.uint8), np.zeros(45000, np.int32),
                   np.zeros((10, 2, 2, 3), np.uint8), np.zeros(10, np.int32), tuple("abcdefghij"),
                   source="x [train images split]")
    history = [{"epoch": i + 1, "train_accuracy": 0.5, "test_accuracy": a, "train_loss": 1.0,
                "test_loss": 1.0, "seconds": 2.0} for i, a in enumerate((0.6, 0.8, 0.7))]
    config = Config(train_split=45000, l1=1e-5, flip=False)
    records = {"bn": [{"config": config.to_dict(), "num_params": 34872, "history": history,
                       "train": {"accuracy": 0.5}}]}
    text = write_study(records, data, tmp_path, dataset_key="cifar10").read_text()
    assert "| final train | final validation | best validation | epochs |" in text
    assert "| 50.00% | 70.00% | 80.00% | 3 |" in text and "test accuracy" not in text
    assert "# Normalisation study (L1 1e-05)" in text and "mean over" not in text  # one seed: no mean


def test_a_study_of_norms_with_their_own_recipes_gives_each_recipe(tmp_path, monkeypatch):
    import jaxnorm.study
    from jaxnorm.data import Dataset
    from jaxnorm.study import write_study
    titles = []
    monkeypatch.setattr(jaxnorm.study, "plot_curves", lambda *a, title, **k: titles.append(title))
    data = Dataset(np.zeros((60000, 2, 2, 1), np.uint8), np.zeros(60000, np.int32),
                   np.zeros((10, 2, 2, 1), np.uint8), np.zeros(10, np.int32), tuple("0123456789"), source="m")
    history = [{"epoch": 1, "train_accuracy": 0.5, "test_accuracy": 0.6, "train_loss": 1.0, "test_loss": 1.0,
                "seconds": 2.0}]
    configs = {"bn": Config.for_dataset("mnist"), "ln": Config.for_dataset("mnist", norm="ln", rotate=10.0)}
    records = {n: [{"config": c.to_dict(), "num_params": 10224, "history": history,
                    "train": {"accuracy": 0.5}}] for n, c in configs.items()}
    text = write_study(records, data, tmp_path, dataset_key="mnist").read_text()
    assert "each norm with its own recipe (below)" in text
    assert f"- BatchNorm (`bn`): {configs['bn'].recipe()}\n" in text
    assert f"- LayerNorm (`ln`): {configs['ln'].recipe()}\n" in text and "rotations up to 10 degrees" in text
    assert "as trained: bn: not augmented; ln: augmented)" in text
    assert titles[-1].endswith(" | 10,224 parameters")  # one parameter count: the curves' title gives it
    assert text.index("- LayerNorm") < text.index("| norm |")  # the key comes before the table
    # One recipe for all: a single line, no per-norm list.
    records["ln"][0]["config"] = Config.for_dataset("mnist").replace(norm="ln").to_dict()
    text = write_study(records, data, tmp_path, dataset_key="mnist").read_text()
    assert "own recipe" not in text and "- BatchNorm" not in text and configs["bn"].recipe() in text
    assert "GroupNorm in" not in text  # no GroupNorm run: no group count
    # A GroupNorm run's group count is part of the network's description.
    records["gn"] = [{**records["bn"][0], "config": Config.for_dataset("mnist", norm="gn").to_dict()}]
    text = write_study(records, data, tmp_path, dataset_key="mnist").read_text()
    assert "MNIST net, GroupNorm in 2 groups; " in text


def test_titles_name_the_variant():
    assert network_name(Config(l1=1e-5)) == "BatchNorm + L1 1e-05"
    assert network_name(Config(norm="gn", skip=True)) == "GroupNorm (8 groups) + skip connections"
    assert (network_name(Config(norm="gn", weight_standardization=True))
            == "GroupNorm (8 groups) + weight standardisation")
    assert network_name(Config(norm="ln", relu_before_norm=True)) == "LayerNorm + ReLU before the norm"
    assert network_name(Config(activation="gelu")) == "BatchNorm + GELU"
    assert (network_name(Config(norm="ln", relu_before_norm=True, activation="gelu"))
            == "LayerNorm + activation before the norm + GELU")


def test_each_variant_gets_its_own_run_folders():
    from jaxnorm.study import run_variant

    variants = [Config(), Config(skip=True), Config(weight_standardization=True), Config(l1=1e-5),
                Config(skip=True, weight_standardization=True), Config(relu_before_norm=True),
                Config(first_conv="whitened"), Config(first_conv="whitened-frozen"),
                Config(activation="gelu"), Config(relu_before_norm=True, activation="gelu")]
    suffixes = [run_variant(config) for config in variants]
    assert suffixes[0] == "" and len(set(suffixes)) == len(suffixes), suffixes
    assert suffixes[2] == "-ws" and suffixes[3] == "-l1_1e-05" and suffixes[5] == "-relu-first"
    assert suffixes[6] == "-whitened" and suffixes[7] == "-whitened-frozen"
    assert suffixes[8] == "-gelu" and suffixes[9] == "-relu-first-gelu"


def test_the_report_files_carry_only_the_variant_every_norm_shares():
    from jaxnorm.study import shared_variant

    assert shared_variant([Config(l1=1e-5), Config(norm="ln", l1=1e-5, first_conv="whitened")]) == "-l1_1e-05"
    assert shared_variant([Config(relu_before_norm=True), Config(norm="gn", relu_before_norm=True)]) == (
        "-relu-first")
    assert shared_variant([Config(), Config(norm="ln", first_conv="whitened")]) == ""


def test_a_norm_whose_own_defaults_add_a_variant_trains_in_its_own_run_folder(tmp_path, monkeypatch):
    import importlib.util

    from jaxnorm import config as config_module
    monkeypatch.setitem(config_module.NORM_DEFAULTS, ("synthetic", "ln"), {"first_conv": "whitened"})
    spec = importlib.util.spec_from_file_location("study_script", ROOT / "scripts" / "study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    runs, out = tmp_path / "runs", tmp_path / "out"
    study.main(["--dataset", "synthetic", "--epochs", "1", "--seeds", "0", "--norms", "bn", "ln",
                "--preset", "narrow", "--batch-size", "128", "--runs", str(runs), "--out", str(out),
                "--groups", "3", "--no-progress"])  # 3 groups: wrong for gn, which is not studied
    assert sorted(p.name for p in runs.iterdir()) == ["bn-s0", "ln-whitened-s0"]
    text = (out / "study.md").read_text()  # the report keeps the study's name; ln's recipe says why
    assert text.startswith("# Normalisation study\n") and "- LayerNorm (`ln`): " in text
    assert "whitened first conv" in text.split("- LayerNorm (`ln`): ")[1].split("\n")[0]
    assert (out / "misclassified-ln.png").is_file() and not (out / "study-whitened.md").exists()


def test_receptive_field_covers_the_mnist_net_and_matches_its_shapes():
    import jax.numpy as jnp

    model = build_model(Config.for_dataset("mnist"), (0.0,), (1.0,))
    table = receptive_field(model.spatial_layers(), 28)
    rows = {r["layer"]: r for r in table}
    names = ("pool1", "pool2", "conv8", "conv9", "avgpool")
    assert [rows[n]["output_size"] for n in names] == [14, 7, 5, 3, 1]
    assert rows["conv9"]["rf"] == 36 and rows["avgpool"]["rf"] == 44
    # The declared layers agree with the module: conv9's real output is 3x3.
    image = jnp.zeros((1, 28, 28, 1))
    _, state = model.apply(model.init(jax.random.PRNGKey(0), image), image, mutable=["intermediates"],
                           capture_intermediates=lambda mdl, _: mdl.name == "conv9")
    assert state["intermediates"]["conv9"]["__call__"][0].shape[1:3] == (3, 3)


def test_report_of_an_earlier_checkpoint_keeps_the_whole_history(trained_run, tmp_path):
    workdir, data, result = trained_run
    copy = tmp_path / "run"
    import shutil
    shutil.copytree(workdir, copy)
    run = restore_run(copy, step=4)  # epoch 1 of 2: its own saved history stops there
    assert run.epoch == 1 and [h["epoch"] for h in run.history] == [1, 2]
    record = write_run_report(run, data)
    saved = json.loads((copy / "evaluation.json").read_text())
    assert saved["epoch"] == record["epoch"] == 1
    assert [h["test_accuracy"] for h in saved["history"]] == [h["test_accuracy"] for h in result["history"]]


def test_per_class_table_header_sits_over_its_columns():
    metrics = classification_metrics(np.eye(3)[[0, 1, 1, 2]] * 5, np.array([0, 1, 2, 2]), 3)
    lines = format_metrics(metrics, ["airplane", "b", "c"]).splitlines()
    assert lines[0] == "test set:"
    header, row = lines[1], lines[2]
    # Right-aligned columns: each header word ends where its values end.
    assert header.index("accuracy") + len("accuracy") == row.index("100.00%") + len("100.00%")
    assert len(header) == len(row)  # "count" ends over the counts
    matrix_header, matrix_row = lines[7], lines[8]
    assert len(matrix_header) == len(matrix_row) and matrix_header.endswith("2")


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


LONG_TITLE = ("GroupNorm (8 groups) + skip connections + L1 1e-05\n34,872 parameters | validation accuracy "
              "61.00% (step 78000)")


@pytest.mark.parametrize("rows, cols", [(5, 2), (2, 3)])
def test_grid_title_fits_and_labels_clear_the_images_above(rows, cols, tmp_path):
    images = np.zeros((rows * cols, 32, 32, 3), np.uint8)
    chosen = [{"index": i, "true": 0, "predicted": 1, "probability": 0.5} for i in range(rows * cols)]
    title = LONG_TITLE
    fig = misclassified_grid(images, chosen, ["automobile", "airplane"], tmp_path / "g.png",
                             rows=rows, cols=cols, title=title)
    renderer = FigureCanvasAgg(fig).get_renderer()  # positions as laid out when saved
    width = fig.get_figwidth() * fig.dpi
    box = fig._suptitle.get_window_extent(renderer)
    assert box.x0 >= 0 and box.x1 <= width  # not cut on either side
    assert fig._suptitle.get_text() == title  # a run title's two lines fit without wrapping
    axes = np.asarray(fig.axes).reshape(rows, cols)
    for r in range(1, rows):
        for c in range(cols):
            label = axes[r, c].title.get_window_extent(renderer)
            above = [axes[r - 1, k].get_window_extent(renderer) for k in range(cols)]
            assert not any(_overlap(label, a) for a in above), (r, c)


def test_a_title_too_long_for_one_line_breaks_at_its_separators(tmp_path):
    images = np.zeros((10, 32, 32, 3), np.uint8)
    chosen = [{"index": i, "true": 0, "predicted": 1, "probability": 0.5} for i in range(10)]
    title = "GroupNorm (8 groups)\n34,872 parameters | validation accuracy 78.00% (weight average, step 7020)"
    fig = misclassified_grid(images, chosen, ["automobile", "airplane"], tmp_path / "g.png", title=title)
    assert fig._suptitle.get_text().splitlines() == [
        "GroupNorm (8 groups)", "34,872 parameters", "validation accuracy 78.00% (weight average, step 7020)"]


def test_curves_plot_accuracy_in_percent_and_tell_train_from_test(tmp_path):
    history = [{"train_loss": 1.0, "test_loss": 1.2, "train_accuracy": 0.40, "test_accuracy": 0.42}]
    bn, gn = Config(norm="bn"), Config(norm="gn")
    fig = plot_curves({"bn": (bn, [history])}, tmp_path / "c.png")
    ax_acc = fig.axes[1]
    lines = {line.get_label(): line for line in ax_acc.get_lines()}
    assert lines["bn train"].get_ydata()[0] == pytest.approx(40.0) and "%" in ax_acc.get_ylabel()
    # One epoch: one point each, so the markers themselves must differ.
    assert lines["bn train"].get_fillstyle() != lines["bn test"].get_fillstyle()
    # A run trained with label smoothing: its train loss is the smoothed one, and says so.
    smoothed = dataclasses.replace(gn, label_smoothing=0.1)
    fig = plot_curves({"bn": (bn, [history]), "gn": (smoothed, [history])}, tmp_path / "s.png")
    assert [line.get_label() for line in fig.axes[0].get_lines()] == \
        ["bn train", "bn test", "gn train, label-smoothed", "gn test"]
    assert "gn train" in [line.get_label() for line in fig.axes[1].get_lines()]  # accuracy: no smoothing
    # A run evaluated as a moving average of its weights: its evaluation curves say so.
    averaged = dataclasses.replace(gn, ema_decay=0.999)
    fig = plot_curves({"bn": (bn, [history]), "gn": (averaged, [history])}, tmp_path / "a.png")
    assert [line.get_label() for line in fig.axes[1].get_lines()] == \
        ["bn train", "bn test", "gn train", "gn test, weight average"]


def test_curves_colour_each_norm_the_same_whatever_the_order(tmp_path):
    history = [{"train_loss": 1.0, "test_loss": 1.2, "train_accuracy": 0.40, "test_accuracy": 0.42}]
    runs = {n: (Config(norm=n), [history]) for n in ("bn", "gn", "ln")}

    def colours(fig):
        return {line.get_label().split()[0]: line.get_color() for line in fig.axes[0].get_lines()}

    all_three = colours(plot_curves(runs, tmp_path / "a.png"))
    assert len(set(all_three.values())) == 3
    # Without GroupNorm, LayerNorm keeps its colour (by position it would take GroupNorm's).
    bn_ln = colours(plot_curves({n: runs[n] for n in ("bn", "ln")}, tmp_path / "b.png"))
    assert bn_ln["ln"] == all_three["ln"]
    # Two variants of one norm in one figure still get two colours.
    twins = {"bn": runs["bn"], "bn+skip": (Config(norm="bn", skip=True), [history])}
    assert len(set(colours(plot_curves(twins, tmp_path / "c.png")).values())) == 2


def test_curves_title_with_a_long_path_is_wrapped_not_cut(tmp_path):
    history = [{"train_loss": 1.0, "test_loss": 1.2, "train_accuracy": 0.40, "test_accuracy": 0.42}]
    title = "seed 0 | " + "/very/long/path/to/the/shared/data" * 6 + "/cifar-10-binary.tar.gz"
    fig = plot_curves({"bn": (Config(norm="bn"), [history])}, tmp_path / "c.png", title=title,
                      evaluation_set="validation")
    renderer = FigureCanvasAgg(fig).get_renderer()
    box = fig._suptitle.get_window_extent(renderer)
    assert box.x0 >= 0 and box.x1 <= fig.get_figwidth() * fig.dpi
    assert "bn validation" in [line.get_label() for line in fig.axes[1].get_lines()]


def test_curves_legend_of_a_long_network_name_stays_inside_the_figure(tmp_path):
    from jaxnorm.evaluate import network_name

    history = [{"train_loss": 2.0 / e, "test_loss": 1.5 / e, "train_accuracy": 0.8 - 0.4 / e,
                "test_accuracy": 0.78 - 0.3 / e} for e in range(1, 21)]
    config = Config(norm="gn", relu_before_norm=True, first_conv="whitened", label_smoothing=0.1)
    fig = plot_curves({network_name(config): (config, [history])}, tmp_path / "c.png",
                      evaluation_set="validation")
    renderer = FigureCanvasAgg(fig).get_renderer()
    for ax in fig.axes:
        box = ax.get_legend().get_window_extent(renderer)
        assert box.x0 >= 0 and box.x1 <= fig.get_figwidth() * fig.dpi, box
        texts = [t.get_text() for t in ax.get_legend().get_texts()]
        assert all(text.replace("\n", " ").startswith(network_name(config)) for text in texts), texts


def test_prediction_dispatches_its_batches_through_the_queue_limit(trained_run, monkeypatch):
    # All test batches queued at once deadlocked a study's evaluation on two CPU devices, as a whole
    # epoch did in training: predict's batches go through parallel.limit_in_flight (tested with
    # epoch_call_results in test_train_epoch.py).
    workdir, data, _ = trained_run
    run = restore_run(workdir)
    through, limit = [], parallel.limit_in_flight

    def recording(calls, **kwargs):
        for call in limit(calls, **kwargs):
            through.append(call)
            yield call

    monkeypatch.setattr(parallel, "limit_in_flight", recording)
    got = make_predict(run.mesh, 4)(run.state, data.test_images)
    assert len(through) == -(-len(data.test_images) // 4) > parallel.MAX_CALLS_IN_FLIGHT
    np.testing.assert_array_equal(got, np.concatenate(through)[:len(got)])


def test_the_produced_by_command_leaves_out_presentation_options():
    from jaxnorm.study import report_command

    argv = ["--seeds", "0", "1", "--no-progress", "--reevaluate", "--runs", "my runs"]
    expected = "python scripts/study.py --seeds 0 1 --runs 'my runs'"
    assert report_command("/x/scripts/study.py", argv) == expected
