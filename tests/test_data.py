"""Tests of the data layer: shards, synthetic shapes, folder conversion, ShardDataModule (incl. DDP on CPU)."""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import socket
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lit_wuerstchen.data import (
    PALETTE,
    POSITIONS,
    SHAPES,
    SIZES,
    ShardDataModule,
    ShardTrainDataset,
    ShardWriter,
    convert_folder,
    encode_png,
    expand_shards,
    generate_shapes_dataset,
    iter_shard,
    load_rgb,
    make_caption,
    parse_caption,
    render_sample,
)
from lit_wuerstchen.data.cli import main as cli_main

torch.set_num_threads(1)


# -- helpers -------------------------------------------------------------------------------------------------------
def _png(arr: np.ndarray) -> bytes:
    return encode_png(arr.astype(np.uint8))


def _noise(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _write_good_shards(d: Path, n_shards: int, per_shard: int, side: int = 16, prefix: str = "s") -> list[str]:
    """Shards of noise images with caption 'caption <key>' and json {"i": index}; returns all keys."""
    keys = []
    with ShardWriter(d / f"{prefix}-%06d.tar", per_shard) as w:
        for i in range(n_shards * per_shard):
            key = f"{prefix}_{i:05d}"
            w.write({"__key__": key, "png": _png(_noise(side, side, i)), "txt": f"caption {key}", "json": {"i": i}})
            keys.append(key)
    return keys


def _iterate(dm: ShardDataModule, loader) -> tuple[list[str], int]:
    keys, n = [], 0
    for batch in loader:
        batch = dm.on_before_batch_transfer(batch, 0)  # what Lightning does before moving the batch
        assert "data_errors" not in batch
        keys += batch["key"]
        n += 1
    return keys, n


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- synthetic shapes --------------------------------------------------------------------------------------------------
def test_palette_is_well_separated():
    assert len(PALETTE) >= 8 and len(SHAPES) == 3 and len(SIZES) == 3 and len(POSITIONS) == 9
    dists = [np.linalg.norm(np.subtract(a, b)) for a, b in itertools.combinations(PALETTE.values(), 2)]
    assert min(dists) > 100


@pytest.mark.parametrize("resolution", [16, 64])
def test_captions_follow_grammar_and_match_pixels(resolution):
    rng = np.random.default_rng(123)
    seen = set()
    for _ in range(300):
        img, attrs = render_sample(rng, resolution)
        assert img.shape == (resolution, resolution, 3) and img.dtype == np.uint8
        caption = make_caption(attrs)
        parsed = parse_caption(caption)
        assert parsed == {k: attrs[k] for k in ("size", "colour", "shape", "background", "position")}
        assert caption == (f"a {attrs['size']} {attrs['colour']} {attrs['shape']} on a {attrs['background']} "
                           f"background, {attrs['position']}")  # fmt: skip
        assert attrs["colour"] != attrs["background"]
        cx, cy = attrs["center_xy"]
        assert tuple(img[int(cy), int(cx)]) == PALETTE[attrs["colour"]]
        for y, x in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
            assert tuple(img[y, x]) == PALETTE[attrs["background"]]
        # the shape sits in the grid cell its position names
        row, col = divmod(POSITIONS.index(attrs["position"]), 3)
        assert int(cx * 3 // resolution) == col and int(cy * 3 // resolution) == row
        seen.add((attrs["shape"], attrs["size"], attrs["position"]))
    assert len(seen) > 40  # attributes actually vary


def test_parse_caption_rejects_other_text():
    assert parse_caption("a small red circle on a red background, top left") is None  # same colours
    assert parse_caption("a tiny red circle on a blue background, top left") is None
    assert parse_caption("a small red circle on a blue background") is None
    assert parse_caption("a small red circle on a blue background, center left") == {
        "size": "small", "colour": "red", "shape": "circle", "background": "blue", "position": "center left",
    }  # fmt: skip


def _tar_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.tar"))}


def test_shapes_dataset_is_deterministic(tmp_path):
    a = generate_shapes_dataset(tmp_path / "a", 40, 10, 32, seed=1, samples_per_shard=16, progress=False)
    generate_shapes_dataset(tmp_path / "b", 40, 10, 32, seed=1, samples_per_shard=16, progress=False)
    generate_shapes_dataset(tmp_path / "c", 40, 10, 32, seed=2, samples_per_shard=16, progress=False)
    generate_shapes_dataset(tmp_path / "d", 40, 25, 32, seed=1, samples_per_shard=16, progress=False)
    ta, tb, tc, td = (_tar_bytes(tmp_path / x) for x in "abcd")
    assert list(ta) == ["train-000000.tar", "train-000001.tar", "train-000002.tar", "val-000000.tar"]
    assert ta == tb
    assert all(ta[k] != tc[k] for k in ta)
    # train and val are independent streams: more val samples leave the train shards unchanged
    assert all(ta[k] == td[k] for k in ta if k.startswith("train"))
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 40, "val": 10} and manifest["args"]["seed"] == 1
    assert a["patterns"]["train"] == "train-{000000..000002}.tar"
    assert not list((tmp_path / "a").glob("*.tmp"))
    samples = list(iter_shard(str(tmp_path / "a" / "val-000000.tar")))
    assert len(samples) == 10 and sorted(samples[0]) == ["__key__", "__url__", "json", "png", "txt"]
    meta = json.loads(samples[0]["json"])
    assert make_caption(meta) == samples[0]["txt"].decode()
    assert np.asarray(load_rgb(samples[0]["png"])).shape == (32, 32, 3)


# -- shard writing / reading ------------------------------------------------------------------------------------------
def test_shard_writer_is_atomic_and_standard(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "x-%06d.tar", 2) as w:
            for i in range(3):
                w.write({"__key__": f"k{i}", "txt": "hello", "bin": b"\x00\x01"})
            raise RuntimeError("crash while writing shard 2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x-000000.tar"]  # no half shard, no .tmp
    with tarfile.open(tmp_path / "x-000000.tar") as tf:
        members = tf.getmembers()
        assert [m.name for m in members] == ["k0.bin", "k0.txt", "k1.bin", "k1.txt"]  # sorted within a sample
        assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" for m in members)
        assert tf.extractfile("k1.txt").read() == b"hello"
    long_key = "dir/" + "k" * 150
    with ShardWriter(tmp_path / "y-%06d.tar", 10) as w:
        w.write({"__key__": long_key, "txt": "long"})
        with pytest.raises(ValueError):
            w.write({"__key__": "a.b", "txt": "x"})  # a dot would split the key wrongly when reading
        with pytest.raises(ValueError):
            w.write({"__key__": long_key, "txt": "again"})
    (sample,) = iter_shard(str(tmp_path / "y-000000.tar"))
    assert sample["__key__"] == long_key and sample["txt"] == b"long"
    import webdataset as wds  # the files are ordinary webdataset shards

    got = list(wds.WebDataset(str(tmp_path / "x-000000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in got] == ["k0", "k1"]


def _all_modes() -> dict[str, tuple[bytes, tuple[int, int, int]]]:
    """name -> (encoded image, expected RGB of pixel (0, 0))."""
    out = {}

    def enc(img: Image.Image, fmt: str = "PNG") -> bytes:
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        return buf.getvalue()

    out["L"] = (enc(Image.new("L", (20, 10), 100)), (100, 100, 100))
    out["LA"] = (enc(Image.new("LA", (20, 10), (0, 0))), (255, 255, 255))  # transparent -> white
    rgba = Image.new("RGBA", (20, 10), (255, 0, 0, 128))
    out["RGBA"] = (enc(rgba), (255, 127, 127))
    pal = Image.new("P", (20, 10), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    out["P"] = (enc(pal), (10, 200, 30))
    pal_t = pal.copy()
    pal_t.info["transparency"] = 1
    out["P_transparent"] = (enc(pal_t), (255, 255, 255))
    out["I;16"] = (enc(Image.fromarray(np.full((10, 20), 65535, dtype=np.uint16))), (255, 255, 255))
    out["I;16_mid"] = (enc(Image.fromarray(np.full((10, 20), 257 * 40, dtype=np.uint16))), (40, 40, 40))
    out["I_tiff"] = (enc(Image.fromarray(np.full((10, 20), 257 * 80, dtype=np.int32)), "TIFF"), (80, 80, 80))
    out["CMYK"] = (enc(Image.new("CMYK", (20, 10), (0, 255, 255, 0)), "TIFF"), (255, 0, 0))
    out["1"] = (enc(Image.new("1", (20, 10), 1)), (255, 255, 255))
    out["F"] = (enc(Image.fromarray(np.full((10, 20), 0.5, dtype=np.float32)), "TIFF"), (128, 128, 128))
    return out


@pytest.mark.parametrize("mode", list(_all_modes()))
def test_load_rgb_any_mode(mode):
    data, expected = _all_modes()[mode]
    img = load_rgb(data)
    assert img.mode == "RGB" and img.size == (20, 10)
    assert np.abs(np.subtract(img.getpixel((0, 0)), expected)).max() <= 1


def test_load_rgb_rejects_garbage():
    for bad in (b"", b"not an image", _png(_noise(8, 8, 0))[:40]):
        with pytest.raises(ValueError, match="cannot decode image"):
            load_rgb(bad)


def test_brace_and_glob_expansion(tmp_path, monkeypatch):
    assert expand_shards("pipe:cat a-{08..10}.tar") == ["pipe:cat a-08.tar", "pipe:cat a-09.tar", "pipe:cat a-10.tar"]
    assert expand_shards("http://h/{x,y}-{0..1}.tar") == [f"http://h/{a}-{b}.tar" for a in "xy" for b in "01"]
    monkeypatch.setenv("WDS_BUCKET", "b")
    assert expand_shards("pipe:aws s3 cp s3://${BUCKET}/t-0.tar -") == ["pipe:aws s3 cp s3://b/t-0.tar -"]
    _write_good_shards(tmp_path, 3, 2)
    d = str(tmp_path)
    assert expand_shards([f"file://{d}/s-000000.tar", f"{d}/s-000001.tar"]) == [
        f"{d}/s-000000.tar",
        f"{d}/s-000001.tar",
    ]
    assert len(expand_shards(f"{d}/s-{{000000..000002}}.tar")) == 3
    assert expand_shards(f"{d}/s-*.tar") == sorted(expand_shards(f"{d}/s-{{000002,000000,000001}}.tar"))
    assert len(expand_shards(f"{d}/s-000000.tar::{d}/s-{{000001..000002}}.tar")) == 3
    with pytest.raises(FileNotFoundError, match=r"nope-\{0..3\}"):
        expand_shards(f"{d}/nope-{{0..3}}.tar")
    with pytest.raises(FileNotFoundError, match="matches no files"):
        expand_shards(f"{d}/nope-*.tar")
    with pytest.raises(FileNotFoundError, match="1 of 4"):
        expand_shards(f"{d}/s-{{000000..000003}}.tar")
    dm = ShardDataModule(train_shards=f"{d}/missing-{{0..9}}.tar", val_shards=f"{d}/s-*.tar", num_workers=0)
    with pytest.raises(FileNotFoundError, match="missing"):
        dm.setup("fit")


# -- datamodule -----------------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_roundtrip_and_resolution_handling(tmp_path):
    sizes = [(16, 16), (10, 12), (50, 40), (16, 64), (64, 16), (7, 30)]
    originals = {}
    with ShardWriter(tmp_path / "r-%06d.tar", 4) as w:
        for i, (h, wd) in enumerate(sizes):
            arr = _noise(h, wd, i)
            originals[f"img{i}"] = arr
            w.write({"__key__": f"img{i}", "png": _png(arr), "txt": f"caption é {i}", "json": {"h": h, "w": wd}})
        w.write({"__key__": "nocap", "png": _png(_noise(20, 20, 9))})
    spec = str(tmp_path / "r-{000000..000001}.tar")
    dm = ShardDataModule(train_shards=spec, val_shards=spec, resolution=16, batch_size=3, num_workers=0,
                         train_batches_per_epoch=4, shuffle_buffer=3, min_image_side=0)  # fmt: skip
    dm.setup("fit")
    seen = {}
    for batch in dm.val_dataloader():
        batch = dm.on_before_batch_transfer(batch, 0)
        assert batch["image"].dtype == torch.float32 and batch["image"].shape[1:] == (3, 16, 16)
        assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
        for img, cap, key, meta in zip(batch["image"], batch["caption"], batch["key"], batch["meta"]):
            seen[key] = (img, cap, meta)
    assert sorted(seen) == sorted([*originals, "nocap"])
    assert seen["nocap"][1] == "" and seen["nocap"][2] == {}
    for i, (h, wd) in enumerate(sizes):
        img, cap, meta = seen[f"img{i}"]
        assert cap == f"caption é {i}" and meta == {"h": h, "w": wd}
    # an image already at the resolution passes through bit-exactly
    exact = (seen["img0"][0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(exact, originals["img0"])
    # a 16x64 image is resized (shorter side 16 already) and centre-cropped: the middle columns survive
    mid = (seen["img3"][0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(mid, originals["img3"][:, 24:40])
    for batch in dm.train_dataloader():  # random crops: also exactly R x R
        assert batch["image"].shape[1:] == (3, 16, 16)
    # resize_to: shorter side to 24, then crop 16
    dm2 = ShardDataModule(train_shards=spec, val_shards=spec, resolution=16, resize_to=24, num_workers=0)
    assert next(iter(dm2.val_dataloader()))["image"].shape[1:] == (3, 16, 16)
    with pytest.raises(ValueError, match="resize_to"):
        ShardDataModule(resolution=32, resize_to=16)


def _write_bad_shards(d: Path) -> tuple[set[str], str]:
    """Four shards: A good; B corrupt image + no image; C no caption + too small; D truncated.

    Returns the keys that must come through (with require_caption and min_image_side=12) and the spec.
    """
    good: set[str] = set()

    def put(w: ShardWriter, key: str, **fields) -> None:
        w.write({"__key__": key, **fields})

    def ok(w: ShardWriter, key: str, i: int) -> None:
        put(w, key, png=_png(_noise(16, 16, i)), txt=f"c {key}")
        good.add(key)

    with ShardWriter(d / "A-%06d.tar", 100) as w:
        for i in range(5):
            ok(w, f"a{i}", i)
    with ShardWriter(d / "B-%06d.tar", 100) as w:
        ok(w, "b0", 10)
        put(w, "b_corrupt", png=b"\x89PNG garbage", txt="broken")
        ok(w, "b1", 11)
        put(w, "b_noimage", txt="only text", json={"x": 1})
        ok(w, "b2", 12)
    with ShardWriter(d / "C-%06d.tar", 100) as w:
        ok(w, "c0", 20)
        put(w, "c_nocap", png=_png(_noise(16, 16, 21)))
        put(w, "c_small", png=_png(_noise(8, 8, 22)), txt="too small")
        ok(w, "c1", 23)
    with ShardWriter(d / "D-%06d.tar", 100) as w:
        for i in range(6):
            put(w, f"d{i}", png=_png(_noise(16, 16, 30 + i)), txt=f"c d{i}")
    # cut D in the middle of sample d3's image data: d0..d2 survive, the rest is lost
    path = d / "D-000000.tar"
    with tarfile.open(path) as tf:
        m = tf.getmember("d3.png")
    path.write_bytes(path.read_bytes()[: m.offset_data + m.size // 2])
    good |= {"d0", "d1", "d2"}
    names = "::".join(str(d / f"{x}-000000.tar") for x in "ABCD")
    return good, names


EXPECTED_ERRORS = {
    "corrupt_samples": 4, "broken_shards": 1, "undecodable_images": 1, "missing_images": 1,
    "missing_captions": 1, "small_images": 1, "long_captions": 0, "bad_cache_entries": 0,
}  # fmt: skip


@pytest.mark.timeout(60)
def test_bad_data_is_skipped_and_counted(tmp_path, caplog):
    good, spec = _write_bad_shards(tmp_path)
    common = dict(train_shards=spec, val_shards=spec, resolution=16, batch_size=4, num_workers=2,
                  require_caption=True, min_image_side=12, shuffle_buffer=8)  # fmt: skip
    dm = ShardDataModule(train_batches_per_epoch=40, **common)
    dm.setup("fit")
    # validation: every good sample exactly once, every problem counted exactly once
    keys, _ = _iterate(dm, dm.val_dataloader())
    assert sorted(keys) == sorted(good)
    assert dm.error_counts("val") == EXPECTED_ERRORS
    assert dm.error_counts("train")["corrupt_samples"] == 0
    keys, _ = _iterate(dm, dm.val_dataloader())  # a second pass finds the same problems: counts stay
    assert dm.error_counts("val") == EXPECTED_ERRORS
    # training (resampled forever): every distinct problem counted once, the stream goes on
    loader = dm.train_dataloader()
    keys, n = _iterate(dm, loader)
    assert n == 40 and set(keys) == good
    assert dm.error_counts("train") == EXPECTED_ERRORS
    dm.teardown("fit")
    assert "data problems in train" in caplog.text


@pytest.mark.timeout(60)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_epoch_length_is_exact(tmp_path, num_workers):
    _write_good_shards(tmp_path, 4, 10)
    spec = str(tmp_path / "s-{000000..000003}.tar")
    dm = ShardDataModule(train_shards=spec, resolution=16, batch_size=5, num_workers=num_workers,
                         train_batches_per_epoch=7, shuffle_buffer=10, seed=3)  # fmt: skip
    loader = dm.train_dataloader()
    assert len(loader) == 7
    epochs = []
    for _ in range(2):  # the same loader (persistent workers), two epochs
        keys, n = _iterate(dm, loader)
        assert n == 7 and len(keys) == 35
        epochs.append(keys)
    assert epochs[0] != epochs[1]  # a new epoch draws a new stream
    assert dm.val_dataloader() == []  # no val shards: validation disabled


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("n_shards", "per_shard", "num_workers"), [(3, 7, 2), (1, 11, 2), (5, 3, 0)])
def test_validation_visits_every_sample_once(tmp_path, n_shards, per_shard, num_workers):
    keys = _write_good_shards(tmp_path, n_shards, per_shard)
    dm = ShardDataModule(train_shards=str(tmp_path / "s-*.tar"), val_shards=str(tmp_path / "s-*.tar"),
                         resolution=16, batch_size=4, num_workers=num_workers)  # fmt: skip
    got, n = _iterate(dm, dm.val_dataloader())
    assert sorted(got) == keys
    assert n >= -(-len(keys) // 4)  # partial last batches are kept


def test_fewer_train_shards_than_ranks_is_a_clear_error(tmp_path):
    _write_good_shards(tmp_path, 1, 3)
    dm = ShardDataModule(train_shards=str(tmp_path / "s-*.tar"), num_workers=0)
    with pytest.raises(ValueError, match="at least 2"):
        ShardTrainDataset(dm.train_urls(), dm._decoder(), 2, 5, 10, 0, rank=0, world=2)


def _ddp_worker(rank: int, world: int, port: int, data_dir: str, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        spec = os.path.join(data_dir, "s-*.tar")
        result = {}
        for split, workers in (("train", 0), ("val", 2)):
            dm = ShardDataModule(train_shards=spec, val_shards=spec, resolution=16, batch_size=4,
                                 num_workers=workers, train_batches_per_epoch=6, shuffle_buffer=5)  # fmt: skip
            dm.setup("fit")
            loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
            result[split] = _iterate(dm, loader)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_ddp_two_ranks(tmp_path):
    import torch.multiprocessing as mp

    keys = _write_good_shards(tmp_path, 4, 5)
    # fork rather than spawn: identical semantics for this test, without re-importing torch/lightning twice
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path), str(tmp_path)), nprocs=2,
                       start_method="fork")  # fmt: skip
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    (t0, n0), (t1, n1) = r0["train"], r1["train"]
    assert n0 == n1 == 6 and len(t0) == len(t1) == 24
    assert not set(t0) & set(t1)  # ranks own disjoint shards
    shard_of = {k: int(k.split("_")[1]) // 5 for k in keys}
    assert {shard_of[k] for k in t0} <= {0, 2} and {shard_of[k] for k in t1} <= {1, 3}
    v0, v1 = r0["val"][0], r1["val"][0]
    assert sorted(v0 + v1) == keys  # every val sample exactly once over ranks x workers


# -- synthetic set inside the datamodule -----------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_prepare_data_generates_once_and_regenerates_on_change(tmp_path, caplog):
    caplog.set_level("INFO")
    kw = dict(synthetic_dir=str(tmp_path / "shapes"), synthetic_num_train=40, synthetic_num_val=8, resolution=16,
              resize_to=24, batch_size=4, num_workers=0, train_batches_per_epoch=2, shuffle_buffer=4)  # fmt: skip
    dm = ShardDataModule(**kw)
    dm.prepare_data()
    manifest = tmp_path / "shapes" / "24px_n40_v8_s0" / "manifest.json"  # the set's folder names its parameters
    assert dm.synthetic_set == str(manifest.parent)
    assert json.loads(manifest.read_text())["args"]["resolution"] == 24
    stamp = manifest.stat().st_mtime_ns
    ShardDataModule(**kw).prepare_data()
    assert manifest.stat().st_mtime_ns == stamp and "reusing" in caplog.text
    dm = ShardDataModule(**{**kw, "synthetic_seed": 5})
    dm.prepare_data()  # other settings: their own folder, the first set untouched
    other = tmp_path / "shapes" / "24px_n40_v8_s5" / "manifest.json"
    assert json.loads(other.read_text())["args"]["seed"] == 5 and manifest.stat().st_mtime_ns == stamp
    dm.setup("fit")
    batch = dm.on_before_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert batch["image"].shape == (4, 3, 16, 16) and all(parse_caption(c) for c in batch["caption"])
    val_keys, _ = _iterate(dm, dm.val_dataloader())
    assert len(val_keys) == 8
    manifest.unlink()  # an interrupted run: no manifest -> regenerate
    ShardDataModule(**kw).prepare_data()
    assert manifest.exists()


@pytest.mark.timeout(60)
def test_lightning_calls_the_datamodule_hook(tmp_path):
    import lightning as L

    _write_good_shards(tmp_path, 2, 6)
    spec = str(tmp_path / "s-*.tar")

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 1)
            self.batch_keys: list[set[str]] = []

        def training_step(self, batch, batch_idx):
            self.batch_keys.append(set(batch))
            return self.layer(batch["image"].mean((2, 3))).mean()

        def validation_step(self, batch, batch_idx):
            self.batch_keys.append(set(batch))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = ShardDataModule(train_shards=spec, val_shards=spec, resolution=16, batch_size=4, num_workers=0,
                         train_batches_per_epoch=3, shuffle_buffer=4)  # fmt: skip
    model = Probe()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(model, datamodule=dm)
    assert trainer.num_training_batches == 3
    assert model.batch_keys and all(k == {"image", "caption", "key", "meta"} for k in model.batch_keys)
    assert set(dm._error_state) == {"train/0/0", "val/0/0"}


# -- folder conversion ------------------------------------------------------------------------------------------------
def _make_folder(root: Path) -> dict[str, tuple[int, int, int]]:
    """Images of many modes in nested folders; returns relative path -> expected RGB of pixel (0, 0)."""
    (root / "sub" / "deeper").mkdir(parents=True)
    files = {
        "gray.png": Image.new("L", (20, 12), 90),
        "sub/rgba.png": Image.new("RGBA", (12, 20), (0, 0, 255, 0)),
        "sub/deeper/palette.gif": Image.new("P", (16, 16), 0),
        "wide16.png": Image.fromarray(np.full((8, 30), 257 * 200, dtype=np.uint16)),
        "cmyk.jpg": Image.new("CMYK", (16, 16), (0, 0, 0, 0)),
        "rgb.jpg": Image.new("RGB", (16, 16), (10, 200, 10)),
        "photo.webp": Image.new("RGB", (16, 16), (200, 10, 10)),
    }
    expected = {"gray.png": (90,) * 3, "sub/rgba.png": (255,) * 3, "sub/deeper/palette.gif": (0, 0, 0),
                "wide16.png": (200,) * 3, "cmyk.jpg": (255,) * 3, "rgb.jpg": (10, 200, 10),
                "photo.webp": (200, 10, 10), "rgb_named.png": (10, 200, 10)}  # fmt: skip
    for rel, img in files.items():
        img.save(root / rel)
    files["rgb.jpg"].save(root / "rgb_named.png", format="JPEG")  # a JPEG behind a .png name
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    (root / "nocaption.png").write_bytes(_png(_noise(8, 8, 1)))
    (root / "notes.md").write_text("ignored")
    return expected


def _check_converted(out: Path, report: dict, expected: dict[str, tuple[int, int, int]]) -> None:
    assert report["num_images_found"] == len(expected) + 2
    assert report["num_written"] == len(expected)
    assert [u["path"] for u in report["unreadable"]] == ["broken.png"]
    assert "cannot decode" in report["unreadable"][0]["reason"]
    assert report["missing_caption"] == ["nocaption.png"]
    assert json.loads((out / "conversion_report.json").read_text())["num_written"] == len(expected)
    samples = [s for p in sorted(out.glob("train-*.tar")) for s in iter_shard(str(p))]
    got = {json.loads(s["json"])["source"]: s for s in samples}
    assert sorted(got) == sorted(expected)
    kept = {"gray.png": "png", "rgb.jpg": "jpg", "rgb_named.png": "jpg", "photo.webp": "webp"}
    for rel, rgb in expected.items():
        s = got[rel]
        assert s["txt"].decode() == f"caption of {rel}"
        if rel in kept:  # clean RGB/grey JPEG, PNG, WebP: the file's own bytes, under its real format
            assert {k for k in s if not k.startswith("__")} == {kept[rel], "txt", "json"}
            assert s[kept[rel]] == (out.parent / "src" / rel).read_bytes()
            img = load_rgb(s[kept[rel]])
        else:
            img = Image.open(io.BytesIO(s["png"]))
            assert img.format == "PNG" and img.mode == "RGB"
        assert np.abs(np.subtract(img.getpixel((0, 0)), rgb)).max() <= 2, rel
    assert report["num_kept_original"] == len(kept)
    assert report["reencoded"] == {"alpha": 1, "cmyk": 1, "high_bit_depth": 1, "palette": 1}


@pytest.mark.parametrize("source", ["sidecar", "jsonl", "csv"])
def test_convert_folder(tmp_path, source):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    expected = _make_folder(src)
    rels = [*expected, "broken.png"]
    if source == "sidecar":
        for rel in rels:
            (src / rel).with_suffix(".txt").write_text(f"caption of {rel}\n")
    elif source == "jsonl":
        keys = itertools.cycle(["file", "image", "path"])
        lines = [json.dumps({next(keys): rel, "caption": f"caption of {rel}"}) for rel in rels]
        lines += ["{not json", json.dumps({"file": "ghost.png", "text": "x"})]
        (src / "captions.jsonl").write_text("\n".join(lines))
    else:
        with open(src / "captions.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "text"])
            writer.writerows([rel, f"caption of {rel}"] for rel in rels)
    report = convert_folder(src, out, samples_per_shard=4, progress=False, min_image_side=4)  # the test images: 8 px
    _check_converted(out, report, expected)
    assert report["caption_sources"][source] == len(expected)
    assert len(report["shards"]) == 2 and report["pattern"].endswith("train-{000000..000001}.tar")
    if source == "jsonl":
        assert len(report["caption_table_problems"]) == 1 and report["captions_without_image"] == ["ghost.png"]


# -- command line ------------------------------------------------------------------------------------------------------
def test_cli(tmp_path, capsys):
    assert cli_main(["shapes", "--out", str(tmp_path / "s"), "--num_train", "20", "--num_val", "4",
                     "--resolution", "16", "--seed", "0", "--samples_per_shard", "8",
                     "--no_progress"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "train-{000000..000002}.tar" in out and "val-000000.tar" in out
    assert cli_main(["folder", "--src", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli_main(["shapes", "--out", "x", "--num_train", "-3", "--num_val", "1", "--resolution", "16", "--seed", "0"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli_main(["folder", "--help"], prog="lw data")
    assert e.value.code == 0 and "captions.jsonl" in capsys.readouterr().out


def test_reader_understands_other_tar_writers(tmp_path):
    """Shards written by other tools (PAX, GNU, ustar-with-prefix headers; directories) read the same."""
    names = ["a/" + "x" * 120 + "/k1.txt", "a/" + "x" * 120 + "/k1.png", "ü/k2.txt", "dir/", "k3.txt"]
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT):
        path = tmp_path / f"f{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tf:
            for name in names:
                info = tarfile.TarInfo(name)
                if name.endswith("/"):
                    info.type = tarfile.DIRTYPE
                    tf.addfile(info)
                    continue
                info.size, info.mtime = len(name.encode()), 1.5
                tf.addfile(info, io.BytesIO(name.encode()))
        got = {s["__key__"]: {k: v for k, v in s.items() if not k.startswith("__")} for s in iter_shard(str(path))}
        assert list(got) == ["a/" + "x" * 120 + "/k1", "ü/k2", "k3"], fmt
        assert got["ü/k2"] == {"txt": "ü/k2.txt".encode()}
        assert set(got["a/" + "x" * 120 + "/k1"]) == {"png", "txt"}


def test_reader_reports_corrupt_headers(tmp_path):
    _write_good_shards(tmp_path, 1, 4)
    path = tmp_path / "s-000000.tar"
    data = bytearray(path.read_bytes())
    with tarfile.open(path) as tf:
        third = tf.getmember("s_00002.json").offset  # first member of the third sample
    data[third : third + 512] = b"x" * 512
    path.write_bytes(bytes(data))
    got = []
    from lit_wuerstchen.data import ShardReadError

    with pytest.raises(ShardReadError, match="invalid header"):
        for sample in iter_shard(str(path)):
            got.append(sample["__key__"])
    # the sample in progress when the bad header appears (s_00001) may be incomplete, so it is dropped
    assert got == ["s_00000"]


def test_val_resolution_validates_on_whole_images_while_training_on_crops(tmp_path):
    from lit_wuerstchen.data import ShardDataModule, generate_shapes_dataset

    generate_shapes_dataset(
        tmp_path, num_train=64, num_val=16, resolution=32, seed=1, samples_per_shard=16, progress=False
    )
    dm = ShardDataModule(
        train_shards=f"{tmp_path}/train-*.tar",
        val_shards=f"{tmp_path}/val-*.tar",
        resolution=16,
        resize_to=32,
        val_resolution=32,
        batch_size=4,
        num_workers=0,
        train_batches_per_epoch=2,
        shuffle_buffer=8,
    )
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["image"].shape == (4, 3, 16, 16)
    assert next(iter(dm.val_dataloader()))["image"].shape == (4, 3, 32, 32)
    with pytest.raises(ValueError, match="val_resolution"):
        ShardDataModule(resolution=16, resize_to=32, val_resolution=64)
