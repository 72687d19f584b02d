"""Shards behind URLs: ``pipe:`` commands and http(s) (a server on 127.0.0.1) stream into the DataModule and a fit."""

from __future__ import annotations

import functools
import http.server
import shutil
import threading

import pytest
from helpers import tiny_stage_a, trainer

from lit_wuerstchen.data import ShardDataModule, ShardReadError, iter_shard

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset reads http(s) through curl")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


@pytest.fixture()
def http_root(shapes_dir):
    """``http://127.0.0.1:<port>`` serving the test shapes set."""
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(shapes_dir))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _keys(dm: ShardDataModule, loader) -> list[str]:
    keys = []
    for batch in loader:
        keys += dm.on_before_batch_transfer(batch, 0)["key"]
    return keys


def _datamodule(train: str, val: str, **kwargs) -> ShardDataModule:
    args = dict(resolution=32, batch_size=8, num_workers=2, train_batches_per_epoch=6, shuffle_buffer=32)
    return ShardDataModule(train_shards=train, val_shards=val, **{**args, **kwargs})


@pytest.mark.timeout(120)
def test_http_and_pipe_urls_give_the_same_stream_as_local_files(shapes_dir, http_root):
    local = _datamodule(f"{shapes_dir}/train-{{000000..000003}}.tar", f"{shapes_dir}/val-000000.tar")
    remote = _datamodule(
        f"{http_root}/train-{{000000..000003}}.tar", f"pipe:cat {shapes_dir}/val-000000.tar", num_workers=2
    )
    for dm in (local, remote):
        dm.setup("fit")
    assert _keys(remote, remote.train_dataloader()) == _keys(local, local.train_dataloader())
    assert sorted(_keys(remote, remote.val_dataloader())) == sorted(_keys(local, local.val_dataloader()))
    assert remote.error_counts("train")["broken_shards"] == remote.error_counts("val")["broken_shards"] == 0


@pytest.mark.timeout(180)
def test_a_toy_fit_streams_from_http_and_pipe(shapes_dir, http_root):
    dm = _datamodule(f"{http_root}/train-{{000000..000003}}.tar", f"pipe:cat {shapes_dir}/val-000000.tar")
    model = tiny_stage_a()
    fit = trainer(max_steps=6, limit_val_batches=2, val_check_interval=6)
    fit.fit(model, datamodule=dm)
    assert fit.global_step == 6
    assert "val/psnr" in fit.callback_metrics


@pytest.mark.timeout(120)
def test_failing_urls_are_skipped_and_counted(shapes_dir, http_root, caplog, tmp_path):
    good = f"{shapes_dir}/train-000000.tar"
    bad = [f"{http_root}/missing-000000.tar", "pipe:exit 3", f"pipe:head -c 20000 {good}", "nosuchscheme://x/y.tar"]
    cut = tmp_path / "cut.tar"  # what `head -c 20000` gives, read from a local file
    cut.write_bytes(open(good, "rb").read(20000))
    complete_before_cut = []
    with pytest.raises(ShardReadError, match="truncated"):
        for sample in iter_shard(str(cut)):
            complete_before_cut.append(sample["__key__"])
    assert complete_before_cut  # the test needs a cut after at least one sample
    dm = _datamodule("::".join([good, *bad]), "::".join([good, *bad]), num_workers=0)
    dm.setup("fit")
    val_keys = _keys(dm, dm.val_dataloader())
    assert len(val_keys) == 128 + len(complete_before_cut)  # every good sample, and the cut shard's whole ones
    assert dm.error_counts("val")["broken_shards"] == len(bad)
    train_keys = _keys(dm, dm.train_dataloader())
    assert len(train_keys) == 6 * 8
    assert dm.error_counts("train")["broken_shards"] >= 1
    for url in bad:
        assert url in caplog.text
    assert "curl exited with status 22 (the server answered with an HTTP error" in caplog.text
    assert "the pipe: command exited with status 3" in caplog.text
