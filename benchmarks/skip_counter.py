"""Cost of the trainer's device-side count of non-finite steps (mixbct_jax/nonfinite.py, SkipCounter.update).

    python benchmarks/skip_counter.py

It runs once per step without a host sync; this measures its dispatch time, the only cost the loop sees.
"""

import time

import jax
import jax.numpy as jnp

from mixbct_jax import nonfinite


def main(n: int = 2000) -> None:
    counter = nonfinite.SkipCounter(0, 20, "/tmp", None)
    finite = jnp.float32(1.0)
    counter.update(finite)  # compile
    jax.block_until_ready(counter.counts)
    start = time.perf_counter()
    for _ in range(n):
        counter.update(finite)
    jax.block_until_ready(counter.counts)
    print(f"skip counter: {(time.perf_counter() - start) / n * 1e6:.1f} us per step ({jax.devices()[0].platform})")


if __name__ == "__main__":
    main()
