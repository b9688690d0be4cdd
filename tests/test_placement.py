"""The default path costs nothing hidden: weights live on the device, checks run once per params object, one host
read per eager call, and the README's training step transfers nothing from the host after its first call."""
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import lpips_jax
from lpips_jax import checks
from lpips_jax.errors import InputError

README = Path(__file__).parents[1] / "README.md"


def readme_block(marker: str) -> str:
  """The README's python code block that contains `marker`."""
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  (block,) = [b for b in blocks if marker in b]
  return block


def test_the_readme_training_step_transfers_nothing_from_the_host_on_its_second_step():
  scope = {}
  with jax.numpy_dtype_promotion("standard"):  # a user's default (optax's Adam mixes a float and an int count)
    exec(compile(readme_block("def train_step"), "README.md", "exec"), scope)  # loads vgg, runs step 1
    assert isinstance(scope["lpips_params"]["vgg"]["features_0"]["kernel"], jax.Array)
    with jax.transfer_guard_host_to_device("disallow"):
      params, opt_state, loss = scope["train_step"](scope["params"], scope["opt_state"], scope["lpips_params"],
                                                    scope["z"], scope["target"])
      loss = float(loss)  # a device-to-host read: allowed
  assert np.isfinite(loss) and loss != float(scope["loss"])  # a real second step, from the first step's params


def test_load_places_the_weights_on_the_default_device_a_device_or_a_sharding_and_numpy_on_request():
  default = lpips_jax.load("alex")
  leaves = jax.tree.leaves(default)
  assert all(isinstance(x, jax.Array) and x.devices() == {jax.devices()[0]} for x in leaves)
  on_last = lpips_jax.load("alex", device=jax.devices()[-1])
  assert all(x.devices() == {jax.devices()[-1]} for x in jax.tree.leaves(on_last))
  mesh = jax.make_mesh((len(jax.devices()),), ("data",))
  replicated = lpips_jax.load("alex", device=NamedSharding(mesh, PartitionSpec()))
  assert all(x.sharding.is_fully_replicated and len(x.devices()) == len(jax.devices())
             for x in jax.tree.leaves(replicated))
  host = lpips_jax.load("alex", device="numpy")
  assert all(type(x) is np.ndarray for x in jax.tree.leaves(host))
  for tree in (on_last, replicated, host):
    jax.tree.map(np.testing.assert_array_equal, tree, default)
  with pytest.raises(InputError, match=r"device must be None \(the default device\), a jax.Device, a "
                                       r"jax.sharding.Sharding or \"numpy\"; got str 'gpu'"):
    lpips_jax.load("alex", device="gpu")


@pytest.fixture
def value_checks(monkeypatch):
  """Counts of the params' value checks (`check_arrays`) and of the value stats read back to the host
  (`read_back`)."""
  counts = {"params": 0, "reads": 0}

  def counted(key, fn):
    def wrapper(*args, **kwargs):
      counts[key] += 1
      return fn(*args, **kwargs)
    return wrapper

  monkeypatch.setattr(checks, "check_arrays", counted("params", checks.check_arrays))
  monkeypatch.setattr(checks, "read_back", counted("reads", checks.read_back))
  return counts


def images(n=2, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.uniform(-1, 1, (n, 48, 48, 3)), jnp.float32) for _ in range(2))


def test_params_are_checked_once_per_params_object_and_an_edited_or_new_pytree_again(value_checks):
  params = lpips_jax.load("alex")
  a, b = images()
  value_checks.update(params=0, reads=0)  # not counting load's own check of the files
  for _ in range(3):  # load's own params: checked when loaded
    lpips_jax.distance(params, a, b)
  assert value_checks == {"params": 0, "reads": 3}  # one read per call, for both images
  fresh = jax.tree.map(jnp.array, params)  # new arrays: checked on first use only
  for _ in range(3):
    lpips_jax.distance(fresh, a, b)
  assert value_checks["params"] == 1
  lpips_jax.distance({**fresh}, a, b)  # a new dict of the same arrays is the same params
  assert value_checks["params"] == 1
  edited = {**fresh, "lin0": {"kernel": fresh["lin0"]["kernel"].at[0, 0, 0, 0].set(jnp.nan)}}
  with pytest.raises(InputError, match="params lin0/kernel has 1 NaN value"):
    lpips_jax.distance(edited, a, b)
  host = jax.tree.map(np.array, params)  # numpy arrays can change in place: checked at every call
  lpips_jax.distance(host, a, b)
  host["lin0"]["kernel"][0, 0, 0, 0] = np.inf
  with pytest.raises(InputError, match="params lin0/kernel has 1 infinite value"):
    lpips_jax.distance(host, a, b)


def test_an_eager_call_reads_one_reduction_back_and_a_jitted_one_none(value_checks):
  params = lpips_jax.load("alex")
  a, b = images()
  value_checks.update(params=0, reads=0)
  lpips_jax.distance(params, a, b)
  lpips_jax.features(params, a)
  lpips_jax.score_pairs(params, a, b)
  assert value_checks["reads"] == 3
  jax.jit(lpips_jax.distance)(params, a, b)  # traced: shapes and dtypes only
  assert value_checks["reads"] == 3
  with pytest.raises(InputError, match=r"b has values in \[2, 2\]"):  # the fused check still names the image
    lpips_jax.distance(params, a, jnp.full_like(b, 2.0))


def test_checked_params_do_not_keep_their_arrays_alive():
  import gc
  import weakref

  params = jax.tree.map(jnp.array, lpips_jax.load("alex"))
  lpips_jax.distance(params, *images())
  ref = weakref.ref(params["lin0"]["kernel"])
  del params
  gc.collect()
  assert ref() is None
