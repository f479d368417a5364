"""One of two emulated hosts (processes on 127.0.0.1) training the same run; used by test_fault_injection.py.

    python tests/multihost_worker.py PORT PROCESS_ID WORKDIR

Prints `interrupted at step S` (exit 128 + signal) or `finished at step S`.
"""

import os
import sys

os.environ.setdefault("JAXNORM_CPU_DEVICES", "1")

import jax  # noqa: E402

import jaxnorm  # noqa: E402

jaxnorm.setup_cpu_devices()  # one CPU device per process (JAXNORM_CPU_DEVICES=1), before the backend starts
from jaxnorm.config import Config  # noqa: E402
from jaxnorm.data import synthetic_dataset  # noqa: E402

port, process_id, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)

from jaxnorm.train import TrainingInterrupted, train_and_evaluate  # noqa: E402

config = Config(dataset="synthetic", width=8, transition_width=8, groups=4, batch_size=16, epochs=3,
                lr=0.05, dropout=0.0, eval_batch_size=32)
try:
    result = train_and_evaluate(config, workdir, dataset=synthetic_dataset(512, 64, image_shape=(16, 16, 3)),
                                progress=False)
    print(f"finished at step {int(result['state'].step)}", flush=True)
except TrainingInterrupted as e:
    print(f"interrupted at step {e.step}", flush=True)
    sys.exit(128 + e.signum)
