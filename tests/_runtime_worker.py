"""One process of the 2-process runtime test (started by tests/test_runtime.py).

Usage: python tests/_runtime_worker.py explicit PORT PROCESS_ID
       python tests/_runtime_worker.py env        (rank, size and coordinator from launcher variables)

Joins the job through agpt_jax.runtime.initialize, sums one row per device across every device of
both processes, gathers each process's index, runs the --check checks, and prints one JSON line.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from agpt_jax import compat, runtime


def main(argv: list[str]) -> None:
    mode = argv[1]
    if mode == "explicit":
        cfg = runtime.DistributedConfig(
            coordinator_address=f"127.0.0.1:{argv[2]}", num_processes=2,
            process_id=int(argv[3]), initialization_timeout_s=60)
        rt = runtime.initialize("cpu", cfg)
    else:
        rt = runtime.initialize("cpu")
    assert runtime.initialize("cpu") is rt  # idempotent

    # Every global row r holds r + 1; rows are split over data=2 (one per process) x fsdp=2.
    mesh = runtime.make_mesh(runtime.MeshConfig(data=2, fsdp=2, tensor=1))
    n = mesh.devices.size
    rows = np.repeat(np.arange(1, n + 1, dtype=np.float32)[:, None], 3, axis=1)
    spec = PartitionSpec(("data", "fsdp"))
    x = jax.make_array_from_callback(rows.shape, NamedSharding(mesh, spec), lambda i: rows[i])
    psum = jax.jit(compat.shard_map(lambda b: jax.lax.psum(b, ("data", "fsdp")), mesh=mesh,
                                    in_specs=spec, out_specs=spec))
    reduced = psum(x)
    gathered = multihost_utils.process_allgather(np.int32(rt.process_index))
    checks = runtime.run_checks(rt)
    print(json.dumps({
        "runtime": dataclasses.asdict(rt),
        "mesh_processes": [[d.process_index for d in row.flat] for row in mesh.devices],
        "psum": sorted({float(v) for s in reduced.addressable_shards
                        for v in np.asarray(s.data).flat}),
        "local_rows": sorted(int(s.index[0].start) for s in x.addressable_shards),
        "gathered": np.asarray(gathered).tolist(),
        "checks": [dataclasses.asdict(c) for c in checks],
    }), flush=True)


if __name__ == "__main__":
    main(sys.argv)
