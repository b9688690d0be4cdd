"""Shared test setup: 8 fake CPU devices, a compilation cache, strict JAX promotion, the official `lpips` package,
example images."""
import copy
import functools
import importlib.util
import os
import sys
import types
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The suite runs as two processes on two cores (.ci/run): torch's OpenMP threads, one per core in each, spin against
# the other process's work (the parity tests took 13% longer). One thread each; JAX's own pool is not OpenMP's.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# JAX's persistent compilation cache, shared by this process and the commands the tests run in subprocesses (they
# inherit the environment): each executable the suite needs is compiled once per machine, not once per process.
# Keyed by the computation, the JAX version and the XLA flags, so a stale entry is never used.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).parents[1] / ".jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

import lpips_jax  # noqa: E402

IMAGES = Path(lpips_jax.__file__).parent / "images"


def import_official_lpips():
  """The official lpips==0.1.4, importable offline on a CPU-only torch (docs/offline.md §1).

  The registry's torchvision is a CUDA build whose compiled ops fail to load; its pure-Python model code works, so
  its package `__init__` is bypassed by registering the package object directly.
  """
  import torch  # noqa: F401

  if "torchvision" not in sys.modules:
    spec = importlib.util.find_spec("torchvision")
    package = types.ModuleType("torchvision")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["torchvision"] = package
  import lpips
  import torchvision.models  # noqa: F401

  return lpips


def import_stlpips():
  """The reference ST-LPIPS, `stlpips_pytorch==0.0.2`, installed with --no-deps as the official package is. Its
  modules import IPython's `embed` and torchsummary's `summary` without using them; where those packages are absent
  they are stand-ins during the import only (flax's treescope looks for the real IPython later)."""
  import_official_lpips()  # torchvision, as above
  absent = [(name, attr) for name, attr in (("IPython", "embed"), ("torchsummary", "summary"))
            if name not in sys.modules and importlib.util.find_spec(name) is None]
  for name, attr in absent:
    sys.modules[name] = types.ModuleType(name)
    setattr(sys.modules[name], attr, lambda *args, **kwargs: None)
  try:
    from stlpips_pytorch import stlpips
  finally:
    for name, _ in absent:
      del sys.modules[name]
  return stlpips


# The files whose tests run longest (a training run, 8 pairs of 3000x3000 images, E-LPIPS over 300 samples, command
# subprocesses), collected first: pytest-xdist hands tests out in collection order, so the two workers then end on
# short tests instead of one idling while the other finishes a minute-long one (~60 s of the suite's end, before).
LONGEST_FIRST = ("test_train.py", "test_cli_memory.py", "test_elpips.py", "test_device_bench.py", "test_cli.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's own order kept


@pytest.fixture(autouse=True, scope="module")
def _fresh_executables():
  """Drop JAX's compiled executables after each test file (the persistent cache above makes them cheap to get
  back). Each XLA CPU executable holds memory mappings of its own; a process that keeps the whole suite's (about
  65,000 after 480 tests) reaches the kernel's vm.max_map_count, and XLA then dies with SIGSEGV ("LLVM compilation
  error: Cannot allocate memory"): bench/map_limit.py reproduces it in seconds."""
  yield
  jax.clear_caches()


@pytest.fixture(scope="session")
def stlpips():
  """The reference ST-LPIPS module `stlpips_pytorch.stlpips` (`import_stlpips`)."""
  return import_stlpips()


@pytest.fixture(scope="session")
def elpips_params():
  """E-LPIPS params as `lpips_jax.load("vgg_ensemble")` has them, with the seeded heads of the reference's goldens
  (`lpips_jax.elpips.seeded_heads`) in place of the published ones, which this machine may not have."""
  from lpips_jax import elpips
  from lpips_jax.layout import scaling

  heads = {f"lin{k}": {"kernel": h.reshape(1, 1, -1, 1)} for k, h in enumerate(elpips.seeded_heads())}
  return jax.device_put({"vgg_ensemble": lpips_jax.load("vgg", device="numpy")["vgg"], **scaling("0.1"), **heads})


@pytest.fixture(scope="session")
def official():
  return import_official_lpips()


def official_model(net: str, version: str = "0.1", lpips: bool = True, *, seed: int = 0):
  """An official `lpips.LPIPS` in eval mode with a random (torchvision-initialised) trunk and the packaged heads: a
  copy of one built once per process, which the caller may change."""
  return copy.deepcopy(_official_model(net, version, lpips, seed))


@functools.cache
def _official_model(net: str, version: str, lpips: bool, seed: int):
  # Building one takes ~1 s (torchvision initialises VGG16's 120M-weight classifier too); a copy, ~0.02 s.
  import torch

  torch.manual_seed(seed)
  return import_official_lpips().LPIPS(net=net, version=version, lpips=lpips, pnet_rand=True,
                                       verbose=False).eval()


def load_image(name: str) -> np.ndarray:
  """An example image as float32 [1, H, W, 3] in [-1, 1], as the official test scripts (x / 127.5 - 1)."""
  from PIL import Image

  return (np.asarray(Image.open(IMAGES / f"{name}.png").convert("RGB"), np.float32) / 127.5 - 1)[None]


@pytest.fixture(scope="session")
def examples():
  return {name: load_image(name) for name in ("ex_ref", "ex_p0", "ex_p1")}


@pytest.fixture(scope="session")
def make_official():
  """`make_official(net, version='0.1', lpips=True, seed=0)` -> official `lpips.LPIPS` (see `official_model`)."""
  return official_model
