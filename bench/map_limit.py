"""Reproduce XLA's crash at the kernel's memory-map limit, in seconds (Linux).

Every executable XLA's CPU backend compiles keeps memory mappings of its own (its JIT-compiled code and data: 3
for a tiny function, about a hundred for an LPIPS gradient), freed only when JAX drops the executable
(`jax.clear_caches()`, or the jitted function going away). A process that compiles enough of them, such as the
whole test suite in one process (65,139 mappings after 475 tests), reaches `vm.max_map_count` (65,530 by default):
LLVM then fails to map memory, XLA logs "LLVM compilation error: Cannot allocate memory" and the process dies of
SIGSEGV. This script takes the mappings up to HEADROOM below the limit with one-page anonymous maps, then compiles
distinct small functions and prints the count until XLA dies (exit status 139, after about HEADROOM / 3 of them).
Nothing of lpips-jax is needed: it is XLA's behaviour. The test suite clears JAX's caches after each file.

Run:  python bench/map_limit.py [HEADROOM]        (default 60)
"""
import mmap
import sys

import jax
import jax.numpy as jnp


def mappings() -> int:
  with open("/proc/self/maps") as f:
    return sum(1 for _ in f)


def main():
  headroom = int(sys.argv[1]) if len(sys.argv) > 1 else 60
  with open("/proc/sys/vm/max_map_count") as f:
    limit = int(f.read())
  jax.jit(lambda x: x + 1)(jnp.ones(3)).block_until_ready()  # XLA's own libraries mapped first
  held = [mmap.mmap(-1, mmap.PAGESIZE) for _ in range(limit - mappings() - headroom)]  # shared maps never merge
  print(f"vm.max_map_count {limit}; this process holds {mappings()} mappings ({len(held)} filler pages)", flush=True)
  for i in range(1, limit):
    jax.jit(lambda x, i=i: jnp.sin(x) * i + jnp.cos(x).sum())(jnp.ones((i, 3))).block_until_ready()
    print(f"{i} executables compiled: {mappings()} mappings", flush=True)


if __name__ == "__main__":
  main()
