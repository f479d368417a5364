"""Run by test_multidevice.py in a subprocess whose device count is fixed by XLA_FLAGS.

    python tests/multidevice_worker.py OUT_DIR [RESTORE_RUN_DIR]

Writes OUT_DIR/step.npz (parameters and batch statistics after one training step, per norm) and a
short BatchNorm training run in OUT_DIR/run-bn. With RESTORE_RUN_DIR, also restores that run's
latest checkpoint here and writes its test logits to OUT_DIR/restored_logits.npy: once the worker that
writes it has finished (its step.npz exists), so that the two workers can run at the same time.
"""

import sys
import time
from pathlib import Path

import jax
import numpy as np

from jaxnorm import parallel
from jaxnorm.checkpoint import RunCheckpoints, abstract_like
from jaxnorm.config import Config
from jaxnorm.data import synthetic_dataset
from jaxnorm.evaluate import make_predict
from jaxnorm.models import build_model
from jaxnorm.state import create_train_state
from jaxnorm.train import compiled_train_step, train_and_evaluate

NORMS = ("bn", "gn", "ln")
DATA = synthetic_dataset(64, 32, image_shape=(16, 16, 3))


def config(norm):
    # One epoch (4 steps) of the reference implementations' gentler recipe. BatchNorm over 2 images per
    # device is chaotic: a second epoch, or lr 0.1 with Nesterov, amplifies float32 reduction-order
    # differences between device counts to ~2e-3 in the loss, beyond the comparison's tolerance.
    return Config(norm=norm, dataset="synthetic", width=8, transition_width=8, groups=4, batch_size=16,
                  epochs=1, eval_batch_size=32, lr=0.05, schedule="step", warmup_epochs=0.0, nesterov=False,
                  dropout=0.05)


def one_step(norm):
    cfg = config(norm)
    mesh = parallel.make_mesh(cfg.batch_size)
    model = build_model(cfg, *DATA.channel_stats())
    state = jax.device_put(create_train_state(model, cfg, DATA.image_shape, 4), parallel.replicated(mesh))
    images, labels = (parallel.put_replicated(a, mesh) for a in (DATA.train_images, DATA.train_labels))
    state, _ = compiled_train_step(cfg, mesh)(state, images, labels, np.arange(16, dtype=np.int32)[None], 0)
    leaves = jax.tree_util.tree_leaves_with_path({"params": state.params, "batch_stats": state.batch_stats})
    return {f"{norm}{jax.tree_util.keystr(k)}": np.asarray(v) for k, v in leaves}


def main(out_dir, restore_dir=None):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {"device_count": np.array(jax.device_count())}
    for norm in NORMS:
        arrays.update(one_step(norm))
    # The whole loop (sharded data and evaluation, metrics, checkpoints) for BatchNorm only: the one norm
    # whose result depends on how the batch is split (its statistics span the devices); GroupNorm and
    # LayerNorm are per image, and their step is compared above.
    train_and_evaluate(config("bn"), out / "run-bn", dataset=DATA, progress=False)
    np.savez(out / "step.npz", **arrays)
    if restore_dir:
        deadline = time.monotonic() + 900
        while not (Path(restore_dir).parent / "step.npz").exists():  # the other worker is still training
            if time.monotonic() > deadline:
                sys.exit(f"{restore_dir}: its worker did not finish")
            time.sleep(0.5)
        cfg = config("bn")
        mesh = parallel.make_mesh(cfg.batch_size)
        template = create_train_state(build_model(cfg, *DATA.channel_stats()), cfg, DATA.image_shape, 4)
        checkpoints = RunCheckpoints(restore_dir, read_only=True)
        state, _ = checkpoints.restore(checkpoints.latest_step(),
                                       abstract_like(template, parallel.replicated(mesh)))
        np.save(out / "restored_logits.npy", make_predict(mesh, 32)(state, DATA.test_images))


if __name__ == "__main__":
    main(*sys.argv[1:])
