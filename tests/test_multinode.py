"""Two nodes of one process each, simulated on this machine: ``fit`` through the command line on each "node" with
Lightning's own launcher (``num_nodes=2``, ``MASTER_ADDR``/``MASTER_PORT``/``NODE_RANK``: Lightning's recipe for a
general-purpose cluster), DDP over gloo on 127.0.0.1.

Each node runs in its own working folder (its local disk: relative paths such as ``outputs/`` land there), and reaches
the data and the checkpoint it resumes from by absolute paths (shared storage). So anything node 1 writes shows up in
its folder, which must stay empty: only global rank 0 writes the run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO

from lit_wuerstchen.checkpoints import read_checkpoint

NODES = 2
RUN = Path("outputs") / "toy_stage_a"
TOY_A = ["-c", str(REPO / "experiments/stage_a.yaml"), "-c", str(REPO / "experiments/toy/stage_a.yaml"),
         "--model.init_args.vqgan.channels=[16,32]", "--model.init_args.vqgan.decoder_blocks=[1,1]",
         "--trainer.accelerator=cpu", "--trainer.strategy=ddp", "--trainer.devices=1", f"--trainer.num_nodes={NODES}",
         "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         "--checkpoint.every_n_train_steps=2", "--checkpoint.monitor=null", "--checkpoint.save_top_k=-1",
         "--data.init_args.resize_to=null", "--data.init_args.val_resolution=null", "--data.init_args.resolution=32",
         "--data.init_args.batch_size=8", "--data.init_args.num_workers=0",
         "--data.init_args.shuffle_buffer=64"]  # fmt: skip
# A cluster's or an outer launcher's variables would override the ones given here (Lightning reads SLURM_* first).
FOREIGN = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR",
           "MASTER_PORT")  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no output)"


def _fit_on_two_nodes(nodes: list[Path], logs: Path, records: Path, *args: str, timeout: float = 240) -> None:
    """Start ``fit`` on every node at once and require exit 0 from each. A node that fails gets its peers killed at
    once (they would wait for it in a collective until the timeout), as does every node still running at the
    timeout; the test then fails with every node's exit code and log."""
    port = _free_port()
    base = {k: v for k, v in os.environ.items() if k not in FOREIGN and not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    path = os.pathsep.join(filter(None, [str(REPO / "tests"), base.get("PYTHONPATH")]))  # helpers.RankRecord
    callback = json.dumps([{"class_path": "helpers.RankRecord", "init_args": {"out": str(records)}}])
    env = {**base, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "LIT_WUERSTCHEN_OFFLINE": "1", "PYTHONPATH": path}  # fmt: skip
    command = [sys.executable, "-m", "lit_wuerstchen", "fit", *TOY_A, f"--trainer.callbacks={callback}", *args]
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    try:
        for node, cwd in enumerate(nodes):
            with open(logs / f"node{node}.log", "w") as log:
                node_env = {**env, "NODE_RANK": str(node)}
                procs.append(subprocess.Popen(command, cwd=cwd, env=node_env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            codes = [proc.poll() for proc in procs]
            if None not in codes or any(code not in (None, 0) for code in codes):
                break
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    codes = [proc.returncode for proc in procs]
    if codes != [0] * NODES:
        report = "\n".join(f"--- node {n} (exit {c}) ---\n{_tail(logs / f'node{n}.log')}" for n, c in enumerate(codes))
        pytest.fail(
            f"exit codes of the nodes {codes}, not all 0 (-9: killed, after a peer failed or {timeout:.0f} s passed)"
            f"\n{report}"
        )


def _records(records: Path) -> list[dict]:
    found = sorted(p.name for p in records.iterdir()) if records.is_dir() else []
    assert found == [f"rank{r}.json" for r in range(NODES)], f"expected one record per global rank, found {found}"
    return [json.loads((records / f"rank{r}.json").read_text()) for r in range(NODES)]


def _check_sharding(records: list[dict], shards: list[str], owner: dict[str, str], steps: list[int]) -> None:
    """Global rank r owns shards r::world, reads only those, and trained exactly ``steps``."""
    for rank, record in enumerate(records):
        seen = (record["global_rank"], record["node_rank"], record["world_size"])
        assert seen == (rank, rank, NODES), f"rank{rank}.json: (global rank, node rank, world size) = {seen}"
        assert record["shards"] == shards[rank::NODES], f"global rank {rank} owns {record['shards']}"
        assert sorted(map(int, record["keys"])) == steps, f"global rank {rank} trained steps {sorted(record['keys'])}"
        read = {owner[key] for keys in record["keys"].values() for key in keys}
        assert read <= set(record["shards"]), f"global rank {rank} read {sorted(read - set(record['shards']))}"
    assert set(records[0]["shards"]).isdisjoint(records[1]["shards"]), "the ranks share training shards"
    assert sorted(records[0]["shards"] + records[1]["shards"]) == shards, "some training shard belongs to no rank"


def _checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir()) if (run / "checkpoints").is_dir() else []


@pytest.mark.timeout(600)
def test_two_nodes_shard_the_data_by_global_rank_write_once_and_resume(shapes_dir, tmp_path):
    shards = [str(shapes_dir / f"train-{i:06d}.tar") for i in range(4)]
    owner = {}  # sample key -> the shard that holds it
    for shard in shards:
        with tarfile.open(shard) as tar:
            owner.update({name.split(".", 1)[0]: shard for name in tar.getnames()})
    data = [f"--data.init_args.train_shards={shapes_dir}/train-{{000000..000003}}.tar",
            f"--data.init_args.val_shards={shapes_dir}/val-000000.tar"]  # fmt: skip
    nodes = [tmp_path / f"node{n}" for n in range(NODES)]
    for node in nodes:
        node.mkdir()
    run = nodes[0] / RUN / "mn"

    # 6 steps, a checkpoint every 2: one file per checkpoint, all written by global rank 0 on node 0
    _fit_on_two_nodes(nodes, tmp_path / "logs1", tmp_path / "records1", *data,
                      "--trainer.max_steps=6", "--trainer.logger.init_args.version=mn")  # fmt: skip
    straight = _records(tmp_path / "records1")
    _check_sharding(straight, shards, owner, list(range(6)))
    expected = ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "epoch=0-step=6.ckpt", "last.ckpt"]
    assert _checkpoints(run) == expected, f"checkpoints written (once each, no -v1 copies): {_checkpoints(run)}"
    assert sorted(p.name for p in (nodes[0] / RUN).iterdir()) == ["mn"], "more than one run folder"
    assert (run / "DONE").read_text().startswith("finished at step 6")
    assert not list(nodes[1].rglob("*")), f"node 1 wrote files of its own: {list(nodes[1].rglob('*'))}"
    middle = read_checkpoint(run / "checkpoints" / "epoch=0-step=4.ckpt")
    assert middle["global_step"] == 4 and read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 6

    # Resumed from step 4 (path on shared storage) into its own run folder: both nodes continue from step 4 with the
    # batches, noise and so weights of the straight run (each global rank restores its own data stream and RNG).
    resume = str((run / "checkpoints" / "epoch=0-step=4.ckpt").resolve())
    _fit_on_two_nodes(nodes, tmp_path / "logs2", tmp_path / "records2", *data, f"--ckpt_path={resume}",
                      "--trainer.max_steps=6", "--trainer.logger.init_args.version=resumed")  # fmt: skip
    resumed = _records(tmp_path / "records2")
    _check_sharding(resumed, shards, owner, [4, 5])
    for rank in range(NODES):
        for step in ("4", "5"):
            assert resumed[rank]["keys"][step] == straight[rank]["keys"][step], f"rank {rank}, step {step}: other data"
    again = nodes[0] / RUN / "resumed"
    assert _checkpoints(again) == ["epoch=0-step=6.ckpt", "last.ckpt"], f"resumed run wrote {_checkpoints(again)}"
    assert (again / "DONE").read_text().startswith("finished at step 6")
    assert not list(nodes[1].rglob("*")), f"node 1 wrote files of its own: {list(nodes[1].rglob('*'))}"
    ours, theirs = (read_checkpoint(r / "checkpoints" / "last.ckpt") for r in (again, run))
    assert ours["global_step"] == 6
    for key, value in theirs["state_dict"].items():
        assert torch.equal(ours["state_dict"][key], value), f"{key}: the resumed run's weights differ at step 6"
