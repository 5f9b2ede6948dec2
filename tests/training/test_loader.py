"""PatchDataset: recipes, pairing, split, chunk reads, workers (real zarr stores on disk)."""

import numpy as np
import pytest
import torch
import zarr
from zarr.storage import LocalStore

from emdiffuse import io
from emdiffuse.errors import InputError
from emdiffuse.training.augment import DEFAULT_JITTER, NONE
from emdiffuse.training.loader import PatchDataset, make_loader

IDENT = {"low": 0.0, "high": 2.0}  # x = raw - 1: keeps coordinate codes exact in float32


def coord_volume(shape):
    """value = z*10000 + y*100 + x, scaled so it stays inside the normalisation range."""
    z, y, x = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    return (z * 10000 + y * 100 + x).astype(np.float32)


def decode(x):
    """Model-space value -> coordinate code (inverse of the IDENT normalisation)."""
    return np.rint((np.asarray(x, np.float64) + 1.0) * SCALE).astype(np.int64)


SCALE = 1e6  # raw / SCALE lies in [0, 2)


class CountingStore(LocalStore):
    """A LocalStore that counts chunk reads (keys under c/), not metadata reads."""

    chunk_gets = 0

    async def get(self, key, prototype, byte_range=None):
        if "/c/" in f"/{key}" or key.startswith("c/"):
            type(self).chunk_gets += 1
        return await super().get(key, prototype, byte_range)


def write(path, data, chunks, store_cls=LocalStore):
    arr = zarr.create_array(
        store=store_cls(str(path)), shape=data.shape, dtype=data.dtype, chunks=chunks
    )
    arr[...] = data
    return zarr.open_array(store=store_cls(str(path), read_only=True), mode="r")


def dataset(recipe, sources, patch, **kw):
    kw.setdefault("normalization", IDENT)
    kw.setdefault("augment", NONE)
    kw.setdefault("min_std", 0.0)
    kw.setdefault("max_flat", 1.0)
    return PatchDataset(recipe, sources, patch, **kw)


@pytest.fixture
def coords(tmp_path):
    vol = coord_volume((12, 48, 48)) / SCALE
    return write(tmp_path / "coords.zarr", vol, (4, 16, 16)), vol


def test_denoise_pairs_same_region(tmp_path, coords):
    arr, vol = coords
    noisy = write(tmp_path / "noisy.zarr", vol + 0.5, (4, 16, 16))
    ds = dataset("denoise", [noisy, arr], 16)
    for key in range(5):
        s = ds.sample(key)
        assert s["cond"].shape == (1, 16, 16) and s["target"].shape == (1, 16, 16)
        np.testing.assert_allclose(s["cond"] - s["target"], 2 * 0.5 / 2.0, atol=1e-6)
        z, y, x = s["origin"].tolist()
        code = decode(s["target"][0])
        assert code[0, 0] == z * 10000 + y * 100 + x
        assert code[3, 5] == z * 10000 + (y + 3) * 100 + x + 5


@pytest.mark.parametrize("k", [2, 4])
def test_isotropic_target_between_cond_slices(coords, k):
    arr, _ = coords
    ds = dataset("isotropic", [arr], 16, factor=k)
    assert (ds.in_channels, ds.out_channels) == (2, k - 1)
    for key in range(6):
        s = ds.sample(key)
        cond, target = decode(s["cond"]), decode(s["target"])
        assert cond.shape == (2, 16, 16) and target.shape == (k - 1, 16, 16)
        # same yx in every channel; z of cond = z0, z0+k; targets z0+1 .. z0+k-1
        assert np.all(cond[1] - cond[0] == k * 10000)
        for j in range(k - 1):
            assert np.all(target[j] - cond[0] == (j + 1) * 10000)


@pytest.mark.parametrize("axis", ["y", "x"])
def test_anisotropic_rows_between_in_plane(coords, axis):
    arr, _ = coords
    k = 3
    ds = dataset("anisotropic", [arr], (8, 16), factor=k, axis=axis)
    for key in range(6):
        s = ds.sample(key)
        cond, target = decode(s["cond"]), decode(s["target"])
        assert cond.shape == (2, 8, 16) and target.shape == (k - 1, 8, 16)
        step = 100 if axis == "y" else 1  # the in-plane axis standing in for z
        other = 1 if axis == "y" else 100  # the in-plane axis along w
        assert np.all(cond[1] - cond[0] == k * step)
        for j in range(k - 1):
            assert np.all(target[j] - cond[0] == (j + 1) * step)
        # h runs along z (across xy planes), w along the other in-plane axis
        assert np.all(np.diff(cond[0], axis=0) == 10000)
        assert np.all(np.diff(cond[0], axis=1) == other)


def test_an_anisotropic_dataset_of_both_axes_reads_one_axis_when_asked(coords):
    """The calibration reads each lateral axis on its own: ``axis="y"`` / ``"x"`` overrides
    a dataset that draws either, in ``sample`` and ``batch``; other recipes refuse it."""
    arr, _ = coords
    k = 3
    ds = dataset("anisotropic", [arr], (8, 16), factor=k, axis="both")
    drawn = {int(decode(ds.sample(key)["cond"])[1, 0, 0] - decode(ds.sample(key)["cond"])[0, 0, 0])
             for key in range(12)}  # fmt: skip
    assert drawn == {k * 100, k}  # left to itself it draws both axes
    for axis, step in (("y", 100), ("x", 1)):
        batch = ds.batch(range(6), split="val", axis=axis)
        cond = decode(batch["cond"])
        assert cond.shape == (6, 2, 8, 16) and np.all(cond[:, 1] - cond[:, 0] == k * step)
        single = decode(ds.sample(2, "val", axis=axis)["cond"])
        np.testing.assert_array_equal(single, cond[2])  # batch = its samples
    with pytest.raises(InputError, match="only an anisotropic dataset"):
        dataset("isotropic", [arr], 16, factor=k).sample(0, axis="y")
    with pytest.raises(InputError, match="only an anisotropic dataset"):
        ds.sample(0, axis="z")


@pytest.mark.parametrize("k", [2, 3])
def test_isotropic_z_context_reads_slices_k_apart_beyond_the_pair(coords, k):
    """With a z context of 1 the condition is four slices k apart, in z order, and the
    target the k - 1 slices between the middle two (the bounding pair)."""
    arr, _ = coords
    ds = dataset("isotropic", [arr], 16, factor=k, z_context=1)
    assert (ds.in_channels, ds.out_channels) == (4, k - 1)
    for key in range(6):
        s = ds.sample(key)
        cond, target = decode(s["cond"]), decode(s["target"])
        assert cond.shape == (4, 16, 16) and target.shape == (k - 1, 16, 16)
        z0 = s["origin"].tolist()[0]
        assert [int(c[0, 0]) // 10000 for c in cond] == [z0, z0 + k, z0 + 2 * k, z0 + 3 * k]
        for j in range(k - 1):
            assert np.all(target[j] - cond[1] == (j + 1) * 10000)
        assert ds.footprint_of(s)[0] == slice(z0, z0 + 3 * k + 1)


@pytest.mark.parametrize("axis", ["y", "x"])
def test_anisotropic_z_context_reads_rows_beyond_the_pair(coords, axis):
    arr, _ = coords
    k = 2
    ds = dataset("anisotropic", [arr], (8, 8), factor=k, axis=axis, z_context=1)
    step = 100 if axis == "y" else 1
    for key in range(4):
        s = ds.sample(key)
        cond, target = decode(s["cond"]), decode(s["target"])
        assert cond.shape == (4, 8, 8) and target.shape == (1, 8, 8)
        assert np.all(np.diff(cond, axis=0) == k * step)
        assert np.all(target[0] - cond[1] == step)


@pytest.mark.parametrize("c", [1, 2])
def test_denoise_z_context_reads_the_noisy_neighbours_of_the_clean_slice(tmp_path, coords, c):
    """A denoiser with z context c: the condition is the noisy slices z - c .. z + c in z
    order, the target the clean slice z (same y and x)."""
    arr, vol = coords
    noisy = write(tmp_path / "noisy.zarr", vol + 0.5, (4, 16, 16))  # code + 500000
    ds = dataset("denoise", [noisy, arr], 8, z_context=c)
    assert (ds.in_channels, ds.out_channels) == (1 + 2 * c, 1)
    for key in range(6):
        s = ds.sample(key)
        cond, target = decode(s["cond"]) - 500000, decode(s["target"])
        assert cond.shape == (1 + 2 * c, 8, 8) and target.shape == (1, 8, 8)
        z0 = s["origin"].tolist()[0]
        assert [int(v[0, 0]) // 10000 for v in cond] == list(range(z0, z0 + 1 + 2 * c))
        np.testing.assert_array_equal(target[0], cond[c])
        assert ds.footprint_of(s)[0] == slice(z0, z0 + 1 + 2 * c)


def test_z_context_refused_where_it_means_nothing(tmp_path, coords):
    arr, vol = coords
    low = write(tmp_path / "low.zarr", np.ascontiguousarray(vol[:, ::2, ::2]), (4, 8, 8))
    with pytest.raises(InputError, match="z_context 1 is for denoising and isotropic"):
        dataset("super-resolve", [low, arr], 16, factor=2, z_context=1)
    thin = write(tmp_path / "thin.zarr", vol[:4], (4, 16, 16))
    with pytest.raises(InputError, match="does not fit.*--z-context"):  # 4 slices < 1 + 2 * 2
        dataset("denoise", [thin, thin], 16, z_context=2)
    with pytest.raises(InputError, match="index-embedding"):
        dataset("isotropic", [arr], 16, factor=2, z_context=1, index_embedding=True)
    with pytest.raises(InputError, match="does not fit"):  # 12 slices < 3 * 4 + 1
        dataset("isotropic", [arr], 16, factor=4, z_context=1)


def test_super_resolve_pair_and_synthesised(tmp_path, coords):
    arr, vol = coords
    low = write(tmp_path / "low.zarr", np.ascontiguousarray(vol[:, ::2, ::2]), (4, 8, 8))
    ds = dataset("super-resolve", [low, arr], 16, factor=2)
    for key in range(4):
        s = ds.sample(key)
        assert s["cond"].shape == (1, 8, 8) and s["target"].shape == (1, 16, 16)
        np.testing.assert_array_equal(decode(s["cond"][0]), decode(s["target"][0, ::2, ::2]))
    ds1 = dataset("super-resolve", [arr], 16, factor=2, region=24)
    s = ds1.sample(0)
    assert s["cond"].shape == (1, 8, 8) and s["target"].shape == (1, 16, 16)


def test_train_and_val_never_overlap(coords):
    arr, _ = coords
    ds = dataset("isotropic", [arr], 8, factor=2, region=16, val_fraction=0.25, seed=3)
    assert ds.regions["val"] and ds.regions["train"]
    seen = {}
    for split in ("train", "val"):
        mask = np.zeros(arr.shape, bool)
        for key in range(40):
            mask[ds.footprint_of(ds.sample(key, split))] = True
        seen[split] = mask
    assert seen["train"].any() and seen["val"].any()
    assert not np.any(seen["train"] & seen["val"])
    # the split is a fixed function of the seed
    again = dataset("isotropic", [arr], 8, factor=2, region=16, val_fraction=0.25, seed=3)
    assert again.regions == ds.regions


def test_reads_touch_only_needed_chunks(tmp_path):
    vol = coord_volume((8, 64, 64)) / SCALE
    write(tmp_path / "v.zarr", vol, (4, 16, 16))
    arr = zarr.open_array(store=CountingStore(str(tmp_path / "v.zarr"), read_only=True), mode="r")
    ds = dataset("denoise", [arr, arr], 16, val_fraction=0.0, region=64)
    CountingStore.chunk_gets = 0
    reader = ds._open_readers()[1]
    before = CountingStore.chunk_gets
    reader.read((1, 8, 8), (1, 16, 16))  # straddles 2x2 chunks in yx, 1 in z
    assert CountingStore.chunk_gets - before == 4
    reader.read((1, 8, 8), (1, 16, 16))  # cached
    assert CountingStore.chunk_gets - before == 4
    reader.read((0, 16, 32), (1, 16, 16))  # aligned: exactly one chunk
    assert CountingStore.chunk_gets - before == 5
    # a whole sample reads at most the chunks its footprint touches
    CountingStore.chunk_gets = 0
    ds2 = dataset("isotropic", [arr], 16, factor=2, val_fraction=0.0, region=64)
    ds2.sample(0)
    assert 1 <= CountingStore.chunk_gets <= 2 * 2 * 2  # z: 3 slices over <=2 chunks; yx <=2x2
    assert ds2.reads == CountingStore.chunk_gets


def test_foreground_filter_skips_empty_padding(tmp_path):
    vol = np.zeros((2, 64, 64), np.float32)
    rng = np.random.default_rng(0)
    vol[:, :, 32:] = rng.random((2, 64, 32))  # left half is empty resin (constant)
    arr = write(tmp_path / "pad.zarr", vol, (1, 16, 16))
    ds = PatchDataset(
        "denoise", [arr, arr], 16, val_fraction=0.0, region=64,
        normalization={"low": 0.0, "high": 1.0}, augment=NONE,
    )  # fmt: skip
    for key in range(10):
        s = ds.sample(key)
        assert float(s["target"].std()) > 0.1
        assert s["origin"][2] >= 32 - 8  # at least half the patch on tissue


def test_stream_is_same_with_workers_and_ranks(coords):
    arr, _ = coords
    ds0 = dataset("isotropic", [arr], 8, factor=2, batch_size=2, seed=5)
    it = iter(make_loader(ds0, workers=0))
    single = [next(it) for _ in range(3)]
    ds2 = dataset("isotropic", [arr], 8, factor=2, batch_size=2, seed=5)
    it2 = iter(make_loader(ds2, workers=2))
    multi = [next(it2) for _ in range(3)]
    for a, b in zip(single, multi, strict=True):
        assert a["key"].tolist() == b["key"].tolist()
        torch.testing.assert_close(a["cond"], b["cond"])
        torch.testing.assert_close(a["target"], b["target"])
    # two ranks with batch 1 together see the single-rank batch of 2
    r = [dataset("isotropic", [arr], 8, factor=2, batch_size=1, rank=i, world_size=2, seed=5)
         for i in range(2)]  # fmt: skip
    keys = [next(iter(ds))["key"] for ds in r]
    assert keys == single[0]["key"].tolist()
    # resuming at step 2 continues the stream exactly
    ds_resume = dataset("isotropic", [arr], 8, factor=2, batch_size=2, seed=5, start_step=2)
    b = next(iter(make_loader(ds_resume)))
    torch.testing.assert_close(b["cond"], single[2]["cond"])


def test_percentiles_from_sample_and_augment_consistent(coords):
    arr, vol = coords
    ds = PatchDataset("isotropic", [arr], 16, factor=2, seed=1)
    low, high = ds.normalization["low"], ds.normalization["high"]
    assert vol.min() <= low < high <= vol.max()
    s = ds.sample(0)
    bound = 1.0 + 2 * DEFAULT_JITTER  # gain 1 + j on [-1, 1] plus an offset of j
    assert float(s["cond"].min()) >= -bound and float(s["cond"].max()) <= bound


def test_bad_inputs_raise(coords, tmp_path):
    arr, vol = coords
    other = write(tmp_path / "o.zarr", vol[:, :32], (4, 16, 16))
    with pytest.raises(InputError, match="one grid"):
        dataset("denoise", [other, arr], 16)
    with pytest.raises(InputError, match="two sources"):
        dataset("denoise", [arr], 16)
    with pytest.raises(InputError, match="does not fit"):
        dataset("isotropic", [arr], 16, factor=12)
    with pytest.raises(InputError, match="unknown recipe"):
        dataset("deblur", [arr], 16)


def test_ome_zarr_path_reads_the_zarr_array_directly(tmp_path):
    import dask.array as da

    vol = coord_volume((6, 32, 32)) / SCALE
    path = str(tmp_path / "v.ome.zarr")
    io.write_image(da.from_array(vol, chunks=(2, 16, 16)), path, voxel_size=(40.0, 8.0, 8.0))
    ds = dataset("isotropic", [path], 8, factor=2, val_fraction=0.0)
    assert ds.voxel_size == (40.0, 8.0, 8.0)
    reader = ds._open_readers()[0]
    assert isinstance(reader.array, zarr.Array)  # not a dask graph per patch
    s = ds.sample(0)
    z, y, x = s["origin"].tolist()
    assert decode(s["cond"][0, 0, 0]) == z * 10000 + y * 100 + x
    # pickles as paths (DataLoader workers reopen lazily)
    import pickle

    clone = pickle.loads(pickle.dumps(ds))
    assert clone._readers is None
    torch.testing.assert_close(clone.sample(0)["cond"], s["cond"])
