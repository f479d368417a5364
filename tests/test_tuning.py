import json

import pytest

from jaxnorm.config import Config, ConfigError
from jaxnorm.data import split_train_test, synthetic_dataset
from jaxnorm.evaluate import restore_run, write_run_report
from jaxnorm.train import train_and_evaluate
from jaxnorm.tuning import recipe_changes, run_row, write_tuning_table


def test_recipe_changes_names_only_what_differs_from_the_datasets_defaults():
    assert recipe_changes(Config()) == "defaults"
    assert recipe_changes(Config.for_dataset("mnist")) == "defaults"  # MNIST's own defaults, not CIFAR-10's
    assert recipe_changes(Config(norm="gn", seed=3, train_split=45000, eval_batch_size=500)) == "defaults"
    assert recipe_changes(Config(label_smoothing=0.1, nesterov=False, crop=True)) == \
        "--crop --no-nesterov --label-smoothing 0.1"
    assert recipe_changes(Config.for_dataset("mnist", lr=0.1)) == "--lr 0.1"  # 0.05 is MNIST's default


def _validation_run(workdir, data, **changes):
    config = Config(dataset="synthetic", width=8, transition_width=8, groups=4, batch_size=16, epochs=2,
                    eval_batch_size=32, **changes)
    train_and_evaluate(config, workdir, dataset=data, progress=False)
    return write_run_report(restore_run(workdir), data)


def test_validation_runs_make_one_row_each_and_a_test_set_run_is_refused(tmp_path):
    data = split_train_test(synthetic_dataset(96, 8, image_shape=(16, 16, 3)), 64)  # 64 train / 32 validation
    plain = _validation_run(tmp_path / "plain", data, train_split=64)
    smooth = _validation_run(tmp_path / "smooth", data, train_split=64, label_smoothing=0.1)

    rows = [run_row(tmp_path / "plain"), run_row(tmp_path / "smooth")]
    assert rows[0]["final_validation"] == plain["test"]["accuracy"]
    assert rows[1]["final_validation"] == smooth["test"]["accuracy"]
    assert rows[0]["validation_images"] == 32 and rows[0]["train_split"] == 64
    best = max(plain["history"], key=lambda e: e["test_accuracy"])
    assert (rows[0]["best_validation"], rows[0]["best_epoch"]) == (best["test_accuracy"], best["epoch"])
    assert "--label-smoothing 0.1" in rows[1]["recipe"] and "label-smoothing" not in rows[0]["recipe"]

    table = write_tuning_table(rows, "python scripts/tuning.py ...")
    assert "64 / 32" in table and table.count("\n| plain |") == 1 and table.count("\n| smooth |") == 1

    # Measured on the test set: not a tuning run.
    evaluation = tmp_path / "plain" / "evaluation.json"
    record = json.loads(evaluation.read_text())
    record["config"]["train_split"] = None
    evaluation.write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="validation runs only"):
        run_row(tmp_path / "plain")
