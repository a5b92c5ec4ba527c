"""data.input_pipeline: layout, epochs, pairing, multi-host sharding, eval padding, workers,
checkpoints.

Every source image is a constant colour that encodes its index (augmentation keeps constant images
constant on valid pixels), so the batches tell which source examples they hold.
"""

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mgd_jax.data import input_pipeline, sources
from mgd_jax.runtime import parallel

CROP = 16


def make_source(n: int, offset: int, labeled: bool, seed: int) -> sources.ArraySource:
    rs = np.random.RandomState(seed)
    sizes = [(rs.randint(12, 40), rs.randint(12, 40)) for _ in range(n)]
    images = [np.full((h, w, 3), offset + i, np.uint8) for i, (h, w) in enumerate(sizes)]
    labels = [np.full((h, w), i, np.uint8) for i, (h, w) in enumerate(sizes)] if labeled else None
    return sources.ArraySource(images, labels, keys=[f"k{offset + i}" for i in range(n)])


LABELED = make_source(8, 1, True, 0)  # ids 1..8
UNLABELED = make_source(6, 101, False, 1)  # ids 101..106


def ids(part: dict) -> list[int]:
    """Source id of every example of a batch part (the colour of its first valid pixel)."""
    return [int(img[v][0, 0]) for img, v in zip(part["image"], part["valid"], strict=True)]


def take(ds, n: int) -> list:
    it = iter(ds)
    out = [next(it) for _ in range(n)]
    if hasattr(it, "close"):
        it.close()
    return out


def assert_trees_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(x, y)


def train(**kwargs):
    args = dict(batch_size=2, crop_size=CROP, seed=7)
    args.update(kwargs)
    return input_pipeline.train_dataset(LABELED, UNLABELED, **args)


def test_batch_layout():
    b = take(train(), 1)[0]
    assert set(b) == {"labeled", "unlabeled_0", "unlabeled_1", "mask"}
    assert (
        b["labeled"]["image"].shape == (2, CROP, CROP, 3)
        and b["labeled"]["image"].dtype == np.uint8
    )
    assert (
        b["labeled"]["valid"].shape == (2, CROP, CROP) and b["labeled"]["valid"].dtype == np.bool_
    )
    assert (
        b["labeled"]["label"].shape == (2, CROP, CROP) and b["labeled"]["label"].dtype == np.uint8
    )
    assert set(b["unlabeled_0"]) == set(b["unlabeled_1"]) == {"image", "valid"}
    assert b["mask"].shape == (2, CROP, CROP) and b["mask"].dtype == np.uint8
    assert set(np.unique(b["mask"])) <= {0, 1} and not np.array_equal(b["mask"][0], b["mask"][1])
    # labels follow their images; padding is 255
    lab = b["labeled"]
    for img, v, lbl in zip(lab["image"], lab["valid"], lab["label"], strict=True):
        assert (lbl[v] == img[v][:, 0].astype(np.int32) - 1).all() and (lbl[~v] == 255).all()

    labeled_only = input_pipeline.train_dataset(LABELED, batch_size=3, crop_size=(16, 24), seed=0)
    only = take(labeled_only, 1)[0]
    assert set(only) == {"labeled"} and only["labeled"]["image"].shape == (3, 16, 24, 3)


def test_epochs_are_reshuffled_permutations():
    batches = take(train(), 8)  # labeled: 8 examples = 4 steps of 2 per epoch
    seq = [i for b in batches for i in ids(b["labeled"])]
    assert sorted(seq[:8]) == sorted(seq[8:]) == list(range(1, 9))
    assert seq[:8] != seq[8:]
    # the unlabeled streams advance independently of the labeled one (6 per epoch)
    u0 = [i for b in batches for i in ids(b["unlabeled_0"])]
    assert sorted(u0[:6]) == sorted(u0[6:12]) == list(range(101, 107))


def test_pairing():
    official = take(train(pairing="official", batch_size=3), 4)  # 6 unlabeled = 2 steps per epoch
    u0 = [i for b in official for i in ids(b["unlabeled_0"])]
    u1 = [i for b in official for i in ids(b["unlabeled_1"])]
    assert u0 == u1  # same image in both slots ...
    assert any(
        not np.array_equal(b["unlabeled_0"]["valid"], b["unlabeled_1"]["valid"]) for b in official
    )  # ... augmented independently
    assert u0[:6] == u0[6:12]  # and the unlabeled order repeats every epoch

    indep = take(train(batch_size=3), 4)
    v0 = [i for b in indep for i in ids(b["unlabeled_0"])]
    v1 = [i for b in indep for i in ids(b["unlabeled_1"])]
    assert v0 != v1 and v0[:6] != v0[6:12]
    with pytest.raises(ValueError, match="pairing"):
        train(pairing="paired")


def test_two_hosts_split_the_global_batch():
    single = take(train(batch_size=4), 4)
    hosts = [take(train(batch_size=2, process_index=p, process_count=2), 4) for p in range(2)]
    for step in range(4):
        joined = jax.tree.map(lambda a, b: np.concatenate([a, b]), hosts[0][step], hosts[1][step])
        assert_trees_equal(joined, single[step])
    # within an epoch (2 global steps for 8 labeled) the hosts are disjoint and cover the split
    seen = [[i for b in h[:2] for i in ids(b["labeled"])] for h in hosts]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(1, 9))
    with pytest.raises(ValueError, match="process_index"):
        train(process_index=2, process_count=2)


def test_state_restore_in_memory():
    ref = take(train(), 7)
    it = iter(train())
    for _ in range(3):
        next(it)
    state = it.get_state()
    it2 = iter(train())
    it2.set_state(state)
    for step in range(3, 7):
        assert_trees_equal(next(it2), ref[step])


def test_orbax_checkpoint_roundtrip(tmp_path):
    ref = take(train(), 6)
    it = iter(train())
    for _ in range(2):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data_iter",)) as mngr:
        mngr.save(2, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
        next(it)  # the saved position must not move with the live iterator
    fresh = iter(train())
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data_iter",)) as mngr:
        assert mngr.latest_step() == 2
        mngr.restore(
            2, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh))
        )
    for step in range(2, 6):
        assert_trees_equal(next(fresh), ref[step])


def test_workers_match_in_process_and_resume():
    # Spawns 2 + 2 worker processes: the one slow test of this file (~5 s).
    ref = take(train(), 6)
    it = iter(train(num_workers=2))
    try:
        for step in range(3):
            assert_trees_equal(next(it), ref[step])
        state = it.get_state()
    finally:
        it.close()
    it = iter(train(num_workers=2))
    try:
        it.set_state(state)
        for step in range(3, 6):
            assert_trees_equal(next(it), ref[step])
    finally:
        it.close()


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_counts_every_pixel_once(process_count):
    src = make_source(7, 1, True, 3)  # 7 examples, batch 3 (x hosts): never divides
    per_host = [
        list(
            input_pipeline.eval_dataset(
                src,
                batch_size=3,
                pad_to=40,
                process_index=p,
                process_count=process_count,
                with_index=True,
            )
        )
        for p in range(process_count)
    ]
    steps = input_pipeline.eval_steps(7, 3, process_count)
    assert all(len(h) == steps for h in per_host)
    seen = []
    for host in per_host:
        for b in host:
            assert b["image"].shape == (3, 40, 40, 3) and b["label"].dtype == np.int32
            assert set(b) == {"image", "valid", "label", "index"}
            for img, v, lbl, i in zip(b["image"], b["valid"], b["label"], b["index"], strict=True):
                assert (lbl[~v] == 255).all() and (img[~v] == 0).all()
                if i < 0:  # filler: fully invalid
                    assert not v.any()
                    continue
                seen.append(int(i))
                ex = src[int(i)]
                assert v.sum() == ex["label"].size
                np.testing.assert_array_equal(img[v], ex["image"].reshape(-1, 3))
                np.testing.assert_array_equal(lbl[v], ex["label"].reshape(-1))
    assert sorted(seen) == list(range(7))
    total_valid = sum(int(b["valid"].sum()) for host in per_host for b in host)
    assert total_valid == sum(src[i]["label"].size for i in range(7))
    # without with_index the contract's three keys
    b = next(iter(input_pipeline.eval_dataset(src, batch_size=2, pad_to=(40, 48))))
    assert set(b) == {"image", "valid", "label"} and b["image"].shape == (2, 40, 48, 3)


def test_eval_rejects_images_larger_than_pad():
    with pytest.raises(ValueError, match="k1"):
        next(iter(input_pipeline.eval_dataset(make_source(2, 1, True, 4), batch_size=2, pad_to=8)))


def test_labeled_source_without_labels_names_the_key():
    with pytest.raises(ValueError, match=r"labeled example .k10\d. has no .label."):
        take(input_pipeline.train_dataset(UNLABELED, batch_size=1, crop_size=CROP, seed=0), 1)


def test_bench_measure_smoke():
    from mgd_jax.data import bench

    src = bench.FakeJpegSource(count=4, size=(30, 40))
    ex = src[1]
    assert ex["image"].shape == (30, 40, 3) and ex["label"].shape == (30, 40)
    r = bench.measure(src, src, num_workers=0, batch_size=2, crop_size=32, seconds=0.2)
    assert r["examples_per_s"] > 0 and r["steps_per_s"] > 0


def test_device_prefetch_saves_the_position_of_the_next_batch_it_yields():
    """With batches in flight, the saved position is the next batch the step consumes: a restored
    iterator yields exactly the batches the uninterrupted one yields next."""
    ds = input_pipeline.train_dataset(LABELED, LABELED, batch_size=2, crop_size=CROP, seed=0)
    mesh = parallel.make_mesh(jax.devices()[:1])
    straight = parallel.DevicePrefetch(iter(ds), mesh, size=3)
    for _ in range(2):
        next(straight)
    state = straight.get_state()
    expected = [jax.device_get(next(straight)) for _ in range(4)]
    resumed = parallel.DevicePrefetch(iter(ds), mesh, size=3)
    next(resumed)  # its own batches in flight are dropped by set_state
    resumed.set_state(state)
    got = [jax.device_get(next(resumed)) for _ in range(4)]
    plain = take(ds, 6)[2:]
    for a, b, c in zip(expected, got, plain, strict=True):
        for x, y, z in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(c),
                           strict=True):
            np.testing.assert_array_equal(x, y)
            np.testing.assert_array_equal(x, z)
    straight.close()
    resumed.close()
