"""The streaming PyTree writer produces what Orbax 0.11.23 writes and restores with Orbax itself."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts

from agpt_jax import checkpoint


def _tree(rng):
    return {"layers": {"attn": {"q": rng.standard_normal((3, 8, 2, 4)).astype(np.float32)}},
            "embed": {"embedding": rng.standard_normal((16, 8)).astype(np.float32)},
            "count": np.int32(11)}


def _write_streaming(item_dir, tree):
    w = checkpoint.PyTreeItemWriter(item_dir, max_inflight_bytes=64)
    q = tree["layers"]["attn"]["q"]
    w.create(("layers", "attn", "q"), q.shape, stacked=True)
    w.create(("embed", "embedding"), tree["embed"]["embedding"].shape)
    w.create(("count",), (), np.int32)
    for i in range(q.shape[0]):
        w.write(("layers", "attn", "q"), q[i], i)
    w.write(("embed", "embedding"), tree["embed"]["embedding"])
    w.write(("count",), tree["count"])
    w.finalize()


def _zarr_meta(item_dir):
    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{item_dir}"}).result()
    out = {}
    for key in kv.list().result():
        if key.endswith(b".zarray"):
            meta = json.loads(kv.read(key).result().value)
            meta.pop("chunks")
            out[key.decode()] = meta
    return out


def test_streaming_writer_matches_orbax_format(tmp_path):
    tree = _tree(np.random.default_rng(0))
    ours, theirs = str(tmp_path / "ours"), str(tmp_path / "theirs")
    _write_streaming(ours, tree)
    ocp.PyTreeCheckpointer().save(theirs, tree)
    # Same tree metadata and the same zarr array metadata (chunking aside), same file layout.
    meta_ours = json.load(open(os.path.join(ours, "_METADATA")))
    meta_theirs = json.load(open(os.path.join(theirs, "_METADATA")))
    assert meta_ours == meta_theirs
    assert _zarr_meta(ours) == _zarr_meta(theirs)
    for name in ("manifest.ocdbt", "ocdbt.process_0", "d"):
        assert os.path.exists(os.path.join(ours, name)) == os.path.exists(
            os.path.join(theirs, name))
    # Orbax's own restore reads ours.
    restored = ocp.PyTreeCheckpointer().restore(ours)
    np.testing.assert_array_equal(restored["layers"]["attn"]["q"], tree["layers"]["attn"]["q"])
    np.testing.assert_array_equal(restored["embed"]["embedding"], tree["embed"]["embedding"])
    assert int(restored["count"]) == 11
    # Our slice reader reads Orbax's.
    reader = checkpoint.PyTreeItemReader(theirs)
    np.testing.assert_array_equal(reader.read(("layers", "attn", "q"), 2),
                                  tree["layers"]["attn"]["q"][2])


def test_step_directory_restores_with_composite_handler(tmp_path):
    tree = _tree(np.random.default_rng(1))
    d = str(tmp_path / "ckpt")
    _write_streaming(os.path.join(d, checkpoint.ITEM_PARAMS), tree)
    checkpoint.write_metadata_item(d, {"model": {}, "iteration": 3})
    checkpoint.write_step_metadata(d, [checkpoint.ITEM_PARAMS, checkpoint.ITEM_METADATA], time.time_ns())
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        out = ckptr.restore(d, args=ocp.args.Composite(
            params=ocp.args.PyTreeRestore(), metadata=ocp.args.JsonRestore()))
    np.testing.assert_array_equal(out["params"]["embed"]["embedding"], tree["embed"]["embedding"])
    assert out["metadata"]["iteration"] == 3 and out["metadata"]["format"] == checkpoint.FORMAT
    assert checkpoint.resolve_checkpoint_dir(d) == d


def test_resolve_errors(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no such checkpoint directory"):
        checkpoint.resolve_checkpoint_dir(str(tmp_path / "missing"))
    half = tmp_path / "half"
    (half / "params").mkdir(parents=True)
    with pytest.raises(checkpoint.CheckpointError, match="never finished"):
        checkpoint.resolve_checkpoint_dir(str(half))
    run = tmp_path / "run" / "checkpoints" / "4.orbax-checkpoint-tmp-9"
    run.mkdir(parents=True)
    with pytest.raises(checkpoint.CheckpointError, match="only unfinished saves"):
        checkpoint.resolve_checkpoint_dir(str(tmp_path / "run"))


def _save_step(d, params, adam):
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(d, args=ocp.args.Composite(params=ocp.args.PyTreeSave(params),
                                              adam=ocp.args.PyTreeSave(adam)))


def test_restore_arrays_a_few_leaves_at_a_time_equals_the_saved_tree(tmp_path):
    import jax

    rng = np.random.default_rng(2)
    params = {"embed": {"embedding": rng.standard_normal((64, 16)).astype(np.float32)},
              "layers": {"q": rng.standard_normal((4, 16, 8)).astype(np.float32),
                         "norm": rng.standard_normal((4, 16)).astype(np.float32)},
              "final_norm": rng.standard_normal((16,)).astype(np.float32)}
    adam = {"mu": jax.tree.map(lambda x: x * 0.5, params), "nu": jax.tree.map(np.square, params),
            "count": np.int32(7)}
    d = str(tmp_path / "step")
    _save_step(d, params, adam)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("fsdp",))

    def target(x):
        spec = jax.sharding.PartitionSpec("fsdp") if x.ndim and x.shape[0] % 2 == 0 else (
            jax.sharding.PartitionSpec())
        return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                    sharding=jax.sharding.NamedSharding(mesh, spec))

    placed = []
    out = checkpoint.restore_arrays(
        d, {"params": jax.tree.map(target, params), "adam": jax.tree.map(target, adam)},
        place=lambda a: placed.append(a.shape) or a * 1)
    assert len(placed) == len(jax.tree.leaves(params)) * 3 + 1  # params, mu, nu, count
    # Largest first: the last groups, read when nearly the whole state is held, are the smallest.
    sizes = [int(np.prod(shape)) for shape in placed]
    assert sizes == sorted(sizes, reverse=True), placed
    for want, got in zip(jax.tree.leaves((params, adam)),
                         jax.tree.leaves((out["params"], out["adam"]))):
        np.testing.assert_array_equal(np.asarray(got), want)
    assert out["params"]["layers"]["q"].sharding.spec == jax.sharding.PartitionSpec("fsdp")
    assert jax.tree.structure(out["adam"]) == jax.tree.structure(adam)

    # A target whose leaves are not the stored ones is refused by name (a partial restore alone
    # would read the common leaves and say nothing).
    fewer = {k: v for k, v in params.items() if k != "final_norm"}
    fewer["extra"] = params["final_norm"]
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"missing: extra; not in the model: final_norm"):
        checkpoint.restore_arrays(d, {"params": jax.tree.map(target, fewer)})


def test_train_item_of_an_earlier_version_still_reads():
    # Earlier versions stored the base PRNG key too (never read back): it is accepted and
    # dropped; a field no version wrote is refused.
    fields = {"iteration": 4, "schedule_count": 4, "consumed_samples": 64,
              "data_start_iteration": 0, "consumed_tokens_per_corpus": {"web": 8192}}
    p = checkpoint.TrainProgress.from_json({**fields, "rng": [0, 42]})
    assert p == checkpoint.TrainProgress(**fields)
    with pytest.raises(checkpoint.CheckpointError, match=r"unknown fields \['seed'\]"):
        checkpoint.TrainProgress.from_json({**fields, "seed": 1})
