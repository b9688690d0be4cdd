"""The installed layout: one top-level package, and every job reachable without shadowing a user's modules."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
JOBS = {"convert": "usage: lpips-jax convert", "train": "usage: lpips-jax train", "eval": "usage: lpips-jax eval"}


def test_the_wheel_holds_one_top_level_package(tmp_path):
  # Built from a copy: setuptools leaves a build/ folder in the source tree.
  source = tmp_path / "source"
  shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv*", "build", "*.egg-info", ".ci-weights"))
  build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path),
                          str(source)], capture_output=True, text=True)
  assert build.returncode == 0, build.stderr
  (wheel,) = tmp_path.glob("*.whl")
  names = zipfile.ZipFile(wheel).namelist()
  top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
  assert top == {"lpips_jax"}
  # convert/ and train/ of the repository are inside the namespace, with their data files where load() looks.
  for module in ("lpips_jax/convert/convert.py", "lpips_jax/train/train.py", "lpips_jax/command/pairs.py",
                 "lpips_jax/train/checkpoints.py", "lpips_jax/weights/manifest.json",
                 "lpips_jax/weights/alex.safetensors", "lpips_jax/images/ex_ref.png"):
    assert module in names


def test_user_modules_named_train_and_convert_neither_shadow_nor_are_shadowed(tmp_path):
  for name in ("train", "convert"):
    (tmp_path / f"{name}.py").write_text(f"WHOSE = 'the user\\'s {name}'\n")
  script = Path(sys.executable).parent / "lpips-jax"
  for job, usage in JOBS.items():
    for command in ([str(script), job, "--help"], [sys.executable, "-m", "lpips_jax", job, "--help"]):
      result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
      assert result.returncode == 0 and result.stdout.startswith(usage), (command, result.stdout, result.stderr)
  theirs = subprocess.run([sys.executable, "-c", "import train, convert; print(train.WHOSE, convert.WHOSE)"],
                          cwd=tmp_path, capture_output=True, text=True)
  assert theirs.stdout.strip() == "the user's train the user's convert", theirs.stderr


def test_the_package_exports_its_names_lazily_and_no_module_shares_a_public_name():
  # `import lpips_jax` does not import JAX; the function `lpips_jax.pairwise` lives in the module
  # lpips_jax.all_pairs, so importing the submodules (as the command does) rebinds nothing.
  code = ("import sys, lpips_jax; assert 'jax' not in sys.modules; import lpips_jax.command; "
          "from lpips_jax.all_pairs import pairwise; assert lpips_jax.pairwise is pairwise, lpips_jax.pairwise; "
          "from lpips_jax import pairwise as p; assert p is pairwise; print(sorted(lpips_jax.__all__))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
  assert out.returncode == 0, out.stderr
  assert "'distance'" in out.stdout and "'pairwise'" in out.stdout


def test_every_python_m_form_runs_from_the_repository_root_too():
  # There Python imports the source folder lpips_jax/, beside (not holding) convert/ and train/.
  for job, usage in JOBS.items():
    module = {"convert": "lpips_jax.convert", "train": "lpips_jax.train", "eval": "lpips_jax.train.eval_main"}[job]
    for command in ([sys.executable, "-m", "lpips_jax", job, "--help"], [sys.executable, "-m", module, "--help"]):
      result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
      assert result.returncode == 0 and result.stdout.startswith(usage), (command, result.stdout, result.stderr)
