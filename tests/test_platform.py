"""What runs where: the platform read before JAX starts, the layers it selects, and a process left alone
on a GPU or TPU host. Accelerator hosts are simulated through the environment and the plugin lookup."""

import importlib.machinery
import importlib.util

import pytest

from jaxnorm import devices
from jaxnorm.config import ConfigError

CPU_TUNED = "cpu-tuned (custom conv gradient, reshape max-pool, GroupNorm from sums)"


@pytest.fixture
def host(monkeypatch):
    """A host with nothing set and no plugin installed; a test adds the environment or plugins it needs."""
    for var in ("JAX_PLATFORMS", "JAX_PLATFORM_NAME", "PJRT_NAMES_AND_LIBRARY_PATHS", "JAXNORM_LAYERS"):
        monkeypatch.delenv(var, raising=False)
    installed_plugins = devices._installed_plugins  # cached: the lookup runs afresh in each test
    installed_plugins.cache_clear()
    yield monkeypatch
    installed_plugins.cache_clear()


@pytest.mark.parametrize("env,expected", [
    ({"JAX_PLATFORMS": "cpu"}, None),
    ({"JAX_PLATFORMS": "cuda"}, "JAX_PLATFORMS=cuda"),
    ({"JAX_PLATFORMS": "tpu,cpu"}, "JAX_PLATFORMS=tpu,cpu"),
    ({"JAX_PLATFORMS": "cpu,cuda"}, None),  # JAX's default backend is the first
    ({"JAX_PLATFORM_NAME": "gpu"}, "JAX_PLATFORM_NAME=gpu"),
    ({"JAX_PLATFORM_NAME": "cpu", "JAX_PLATFORMS": "cuda,cpu"}, None),  # the name picks the default
    ({}, None),
])
def test_the_platform_is_read_from_jaxs_environment(host, env, expected):
    host.setattr(devices, "_installed_plugins", lambda: ())
    for var, value in env.items():
        host.setenv(var, value)
    assert devices.accelerator() == expected
    assert devices.layer_choice() == ("flax" if expected else "cpu")


def test_an_installed_accelerator_plugin_means_an_accelerator_host(host, tmp_path):
    # The CUDA plugin as pip installs it: a module in the `jax_plugins` namespace package.
    (tmp_path / "jax_plugins" / "xla_cuda12").mkdir(parents=True)
    (tmp_path / "jax_plugins" / "xla_cuda12" / "__init__.py").write_text("")
    host.syspath_prepend(str(tmp_path))
    assert devices.accelerator() == "jax_plugins.xla_cuda12"
    host.setenv("JAX_PLATFORMS", "cpu")  # the user's choice wins over what is installed
    assert devices.accelerator() is None


def test_libtpu_means_an_accelerator_host(host):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):  # libtpu installed (Colab's and Kaggle's TPU runtimes)
        return importlib.machinery.ModuleSpec(name, None) if name == "libtpu" else real_find_spec(name, *args)
    host.setattr(importlib.util, "find_spec", find_spec)
    assert devices.accelerator() == "libtpu" and devices.layer_choice() == "flax"


def test_jaxnorm_layers_forces_either_choice_and_a_typo_is_an_error(host):
    host.setenv("JAX_PLATFORMS", "tpu")
    host.setenv("JAXNORM_LAYERS", "cpu")
    assert devices.layer_choice() == "cpu"
    host.delenv("JAX_PLATFORMS")
    host.setenv("JAXNORM_LAYERS", "flax")
    assert devices.layer_choice() == "flax"
    host.setenv("JAXNORM_LAYERS", "gpu")
    with pytest.raises(ConfigError, match="JAXNORM_LAYERS must be one of cpu, flax, not 'gpu'"):
        devices.setup_cpu_devices()  # checked at a script's start, on any host


def test_the_layer_choices_are_the_layer_sets():
    # devices.py names the choices without importing jax (it runs before JAX starts); layers.py holds them.
    from jaxnorm.layers import LAYER_SETS
    assert set(devices.LAYER_CHOICES) == set(LAYER_SETS)


class FakeLibc:
    """glibc as ctypes loads it, recording mallopt calls."""

    calls = []

    def __init__(self, name):
        pass

    def mallopt(self, option, value):
        self.calls.append((option, value))
        return 1


@pytest.mark.parametrize("env", [{"JAX_PLATFORMS": "cuda"}, {"JAX_PLATFORM_NAME": "tpu"}, {}])
def test_an_accelerator_host_gets_no_malloc_setting_and_no_xla_flags(host, env):
    for var, value in env.items():
        host.setenv(var, value)
    if not env:  # a plugin installed, no variable set (Colab's TPU runtime, a pip-installed CUDA jax)
        host.setattr(devices, "_installed_plugins", lambda: ("jax_plugins.xla_cuda12",))
    host.setattr(devices.ctypes, "CDLL", FakeLibc)
    host.setattr(FakeLibc, "calls", [])
    host.setenv("XLA_FLAGS", "--xla_dump_to=/nowhere")
    host.delenv("JAXNORM_REUSE_MEMORY", raising=False)
    assert devices.setup_cpu_devices() is None
    assert FakeLibc.calls == [] and devices.os.environ["XLA_FLAGS"] == "--xla_dump_to=/nowhere"


@pytest.mark.skipif(not devices.sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_a_cpu_host_still_gets_the_malloc_setting(host):
    host.setenv("JAX_PLATFORMS", "cpu")
    host.setattr(devices.ctypes, "CDLL", FakeLibc)
    host.setattr(FakeLibc, "calls", [])
    host.delenv("JAXNORM_REUSE_MEMORY", raising=False)
    devices.setup_cpu_devices()  # JAX already runs in this process: the device count stays as it is
    assert len(FakeLibc.calls) == 3


def test_a_run_trained_with_the_cpu_layers_evaluates_with_flaxs(host, tiny_data, tiny_config, tmp_path,
                                                                 capsys):
    from jaxnorm.evaluate import evaluate_run, network_name, restore_run
    from jaxnorm.train import train_and_evaluate

    host.setenv("JAXNORM_LAYERS", "cpu")
    config = tiny_config.replace(norm="gn", epochs=1)
    history = train_and_evaluate(config, tmp_path / "run", dataset=tiny_data, progress=False)["history"]
    out = capsys.readouterr().out
    assert f"| layers: {CPU_TUNED}" in out  # the run's first lines say which
    assert f"\n{network_name(config)} | " in out and network_name(config).startswith("GroupNorm (")
    assert f"\nrecipe: {config.recipe()}\n" in out  # and how it trains
    host.setenv("JAXNORM_LAYERS", "flax")
    run = restore_run(tmp_path / "run")  # the final checkpoint
    assert run.model.layer_set == "flax"
    test = evaluate_run(run, tiny_data)["test"]
    assert test["accuracy"] == pytest.approx(history[-1]["test_accuracy"], abs=1e-6)
    assert test["loss"] == pytest.approx(history[-1]["test_loss"], rel=1e-4)
