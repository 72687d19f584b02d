"""The ablation sweep: grid expansion, the commands it runs (dry run), resumption/skipping, and the report."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lit_wuerstchen import sweep
from lit_wuerstchen.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]


def write_grid(tmp_path: Path, second_axis: bool = False, **overrides) -> Path:
    grid = {
        "name": "test",
        "save_dir": str(tmp_path / "outputs"),
        "stages": ["b", "c"],
        "base": {
            "b": ["experiments/stage_b.yaml", "experiments/toy/stage_b.yaml"],
            "c": ["experiments/stage_c.yaml", "experiments/toy/stage_c.yaml"],
        },
        "logger": {"b": "abl_b", "c": "abl_c"},
        "axes": [
            {
                "name": "ratio",
                "prefix": "f",
                "values": [8, 16, 42.67],
                "stages": {"b": {"key": "model.init_args.compression"}},
            }
        ],
        "extra_args": {"b": ["--trainer.max_steps=10"], "c": []},
    }
    if second_axis:
        grid["axes"].append(
            {
                "name": "width",
                "prefix": "w",
                "values": [64, 128],
                "stages": {"c": {"key": "model.init_args.network.width"}},
            }
        )
    grid.update(overrides)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def test_expansion_names_and_shared_stage_b(tmp_path):
    grid = sweep.load_grid(write_grid(tmp_path, second_axis=True))
    points = sweep.expand(grid)
    assert [p.name for p in points] == ["f8_w64", "f8_w128", "f16_w64", "f16_w128", "f42p67_w64", "f42p67_w128"]
    # Stage B runs are named by the ratio only and shared by the two widths; Stage C by both axes
    assert [r.name for r in points[0].runs] == ["f8", "f8_w64"]
    assert points[0].runs[0] is points[1].runs[0]
    runs = sweep.ordered_runs(points)
    assert [(r.stage, r.name) for r in runs] == [
        ("b", "f8"),
        ("c", "f8_w64"),
        ("c", "f8_w128"),
        ("b", "f16"),
        ("c", "f16_w64"),
        ("c", "f16_w128"),
        ("b", "f42p67"),
        ("c", "f42p67_w64"),
        ("c", "f42p67_w128"),
    ]
    assert "--model.init_args.network.width=128" in runs[2].args
    assert "--model.init_args.compression=42.67" in runs[6].args
    assert [p.name for p in sweep.select(points, "f16")] == ["f16_w64", "f16_w128"]
    assert [p.name for p in sweep.select(points, "f8_w128,f42p67_w64")] == ["f8_w128", "f42p67_w64"]
    with pytest.raises(sweep.SweepError, match="matches no point"):
        sweep.select(points, "f99")


def _last_config(run) -> str:
    return [run.args[i + 1] for i, a in enumerate(run.args) if a == "-c"][-1]


def test_repository_grids_expand_to_existing_configs(in_tmp_cwd):
    for name, points in (
        ("grid_toy.yaml", ["f8", "f16", "f32"]),
        ("grid.yaml", ["f16", "f24", "f32", "f42p67", "f64"]),
    ):
        grid = sweep.load_grid(REPO / "experiments/ablations/compression" / name)
        expanded = sweep.expand(grid)
        assert [p.name for p in expanded] == points
        runs = sweep.ordered_runs(expanded)
        sweep._check_configs(runs)  # every -c file exists
        for b, c in zip(runs[::2], runs[1::2]):
            # the per-ratio Stage C config points at the same Stage B checkpoint the sweep passes
            c_config = yaml.safe_load(Path(_last_config(c)).read_text())
            assert c_config["model"]["init_args"]["stage_b_checkpoint"] == str(b.checkpoint)
            b_config = yaml.safe_load(Path(_last_config(b)).read_text())
            assert b_config["trainer"]["logger"]["init_args"] == {"name": b.logger_name, "version": b.name}


def test_dry_run_commands_resume_and_skip(in_tmp_cwd, capsys):
    grid_path = write_grid(in_tmp_cwd)
    out = in_tmp_cwd / "outputs"
    assert cli_main(["sweep", "run", "--grid", str(grid_path), "--dry_run"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("python")]
    assert len(lines) == 6
    b8, c8 = lines[0], lines[1]
    assert b8.startswith("python -m lit_wuerstchen fit -c experiments/stage_b.yaml -c experiments/toy/stage_b.yaml")
    assert "--model.init_args.compression=8 " in b8 and "--trainer.logger.init_args.version=f8" in b8
    assert f"--trainer.logger.init_args.save_dir={out}" in b8 and b8.endswith("--trainer.max_steps=10")
    assert c8.startswith("python -m lit_wuerstchen fit -c experiments/stage_c.yaml")
    assert f"--model.init_args.stage_b_checkpoint={out}/abl_b/f8/checkpoints/last.ckpt" in c8
    assert "--ckpt_path" not in " ".join(lines)

    # f8: Stage B finished; Stage C has a checkpoint but no marker (interrupted) -> resumed
    (out / "abl_b/f8/checkpoints").mkdir(parents=True)
    (out / "abl_b/f8/checkpoints/last.ckpt").write_bytes(b"x")
    (out / "abl_b/f8/DONE").write_text("")
    (out / "abl_c/f8/checkpoints").mkdir(parents=True)
    (out / "abl_c/f8/checkpoints/last.ckpt").write_bytes(b"x")
    assert cli_main(["sweep", "run", "--grid", str(grid_path), "--dry_run", "--only", "f8"]) == 0
    text = capsys.readouterr().out
    commands = [line for line in text.splitlines() if "lit_wuerstchen fit" in line]
    assert commands[0].startswith("# python") and "finished, skipped" in text  # Stage B skipped
    assert commands[1].startswith("python") and commands[1].endswith(
        f"--ckpt_path {out}/abl_c/f8/checkpoints/last.ckpt"
    )


def test_local_run_order_markers_and_failure(tmp_path, monkeypatch, capsys):
    grid = sweep.load_grid(write_grid(tmp_path))
    runs = sweep.ordered_runs(sweep.expand(grid))[:4]  # f8 b, c; f16 b, c
    calls = []

    def fake_run(cmd):
        calls.append(cmd)
        version = next(a.split("=", 1)[1] for a in cmd if a.startswith("--trainer.logger.init_args.version="))
        name = next(a.split("=", 1)[1] for a in cmd if a.startswith("--trainer.logger.init_args.name="))
        code = 3 if (name, version) == ("abl_c", "f16") else 0
        ckpt = Path(grid.save_dir) / name / version / "checkpoints" / "last.ckpt"
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        ckpt.write_bytes(b"x")
        if code == 0:  # a fit that reached its end writes its marker itself
            (ckpt.parent.parent / "DONE").write_text("finished\n")
        return type("Done", (), {"returncode": code})()

    monkeypatch.setattr(sweep.runner.subprocess, "run", fake_run)
    with pytest.raises(sweep.SweepError, match=r"Stage C f16 .* failed with exit code 3"):
        sweep.execute_runs(runs)
    assert len(calls) == 4 and calls[0][0] == sys.executable
    assert [r.state() for r in runs] == ["done", "done", "done", "resume"]
    calls.clear()
    # a fit that exits 0 without its marker (stopped early) is not taken for finished
    monkeypatch.setattr(
        sweep.runner.subprocess, "run", lambda cmd: (calls.append(cmd), type("D", (), {"returncode": 0})())[1]
    )
    with pytest.raises(sweep.SweepError, match="did not write .*DONE: it did not reach its end"):
        sweep.execute_runs(runs)
    assert len(calls) == 1 and calls[0][-2:] == ["--ckpt_path", str(runs[3].checkpoint)]
    assert runs[3].state() == "resume"
    calls.clear()

    def finishing_run(cmd):
        calls.append(cmd)
        runs[3].marker.write_text("finished\n")
        return type("D", (), {"returncode": 0})()

    monkeypatch.setattr(sweep.runner.subprocess, "run", finishing_run)
    sweep.execute_runs(runs)  # rerun: three skipped, the failed one resumed
    assert len(calls) == 1 and calls[0][-2:] == ["--ckpt_path", str(runs[3].checkpoint)]
    assert runs[3].state() == "done"


def test_stage_c_needs_stage_b_checkpoint(tmp_path, monkeypatch):
    grid = sweep.load_grid(write_grid(tmp_path))
    runs = sweep.ordered_runs(sweep.expand(grid))[:2]

    def finished_without_checkpoint(cmd):
        runs[0].folder.mkdir(parents=True, exist_ok=True)
        runs[0].marker.write_text("finished\n")
        return type("D", (), {"returncode": 0})()

    monkeypatch.setattr(sweep.runner.subprocess, "run", finished_without_checkpoint)
    with pytest.raises(sweep.SweepError, match="needs .*last.ckpt, which the Stage B run did not write"):
        sweep.execute_runs(runs)


@pytest.mark.parametrize(
    "content, message",
    [
        ("- just\n- a list\n", "must be a YAML mapping"),
        ("base: {b: [x.yaml]}\nstages: [b]\n", "'axes' must be a non-empty list"),
        ("base: {b: [x.yaml]}\nstages: [b]\naxes: [{name: ratio, values: []}]\n", "non-empty list 'values'"),
        ("base: {b: [x.yaml]}\nstages: [c]\naxes: []\n", "c without b"),
        ("base: {b: [x.yaml]}\nstages: [b]\nbogus: 1\naxes: []\n", r"unknown key\(s\) \['bogus'\]"),
        (
            "base: {b: [x.yaml]}\nstages: [b]\naxes: [{name: r, values: [1], stages: {c: {key: k}}}]\n",
            "not in 'stages'",
        ),
        ("base: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_grid_is_a_clear_error(tmp_path, capsys, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(sweep.SweepError, match=message):
        sweep.load_grid(path)
    assert cli_main(["sweep", "run", "--grid", str(path), "--dry_run"]) == 2
    assert "error: grid file" in capsys.readouterr().err
    assert cli_main(["sweep", "report", "--grid", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _events(folder: Path, scalars: dict[str, list[tuple[int, float]]], wall0: float, seconds_per_step: float):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    for tag, values in scalars.items():
        for step, value in values:
            writer.add_scalar(tag, value, step, walltime=wall0 + step * seconds_per_step)
    writer.close()


def _fake_run(folder: Path, config: dict, state_dict: dict, scalars: dict, wall0=1000.0, seconds_per_step=0.5):
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    torch.save({"state_dict": state_dict, "global_step": 100}, folder / "checkpoints" / "last.ckpt")
    _events(folder, scalars, wall0, seconds_per_step)
    (folder / "DONE").write_text("")


def test_report_on_synthetic_runs(tmp_path, capsys):
    grid_path = write_grid(tmp_path)
    out_root = tmp_path / "outputs"
    # nothing finished yet: an error, and nothing written
    assert cli_main(["sweep", "report", "--grid", str(grid_path), "--out", str(tmp_path / "report")]) == 2
    assert "nothing reported" in capsys.readouterr().err and not (tmp_path / "report").exists()
    b_state = {
        "stage_a.w": torch.zeros(1000),
        "decoder.w": torch.zeros(300),
        "compressor.w": torch.zeros(50),
        "compressor.bn.running_mean": torch.zeros(7),
        "compressor.bn.num_batches_tracked": torch.tensor(0),
    }
    c_state = {"prior.w": torch.zeros(2000), "latent_mean": torch.zeros(16)}
    train = [(s, 1.0 / (s + 1)) for s in range(0, 101, 10)]
    # f8: complete (B with rFID and peak memory; C with alignment, CLIP score, no FID)
    _fake_run(
        out_root / "abl_b/f8",
        {"model": {"init_args": {"compression": 8.0}}, "data": {"init_args": {"resolution": 64}}},
        b_state,
        {
            "train/loss": train,
            "val/psnr": [(50, 20.0), (100, 25.5)],
            "val/ssim": [(100, 0.75)],
            "val/psnr_stage_a": [(100, 30.0)],
            "eval/fid": [(100, 12.5)],
            "perf/peak_memory_gb": [(10, 1.5), (20, 2.25)],
        },
        seconds_per_step=0.5,
    )
    align = {f"val/align_{a}": [(100, 0.5 + i / 10)] for i, a in enumerate(sweep.ALIGN)}
    _fake_run(
        out_root / "abl_c/f8",
        {"data": {"init_args": {"resolution": 64}}},
        c_state,
        {"train/loss": train, "eval/clip_score": [(100, 0.3125)], **align},
        seconds_per_step=0.25,
    )
    # f16: Stage B only, no SSIM logged, resumed once (two event files; the pause between them is not counted)
    b16 = out_root / "abl_b/f16"
    _fake_run(
        b16,
        {"model": {"init_args": {"compression": 16.0}}, "data": {"init_args": {"resolution": 64}}},
        b_state,
        {"train/loss": train[:6], "val/psnr": [(50, 22.0)]},
        seconds_per_step=1.0,
    )
    _events(b16, {"train/loss": train[5:]}, wall0=100000.0, seconds_per_step=1.0)
    # f42p67: nothing ran

    assert cli_main(["sweep", "report", "--grid", str(grid_path), "--out", str(tmp_path / "report")]) == 0
    report = tmp_path / "report"
    before = (report / "ablations.md").read_text()
    assert cli_main(["sweep", "report", "--grid", str(grid_path), "--out", str(report)]) == 2  # never overwritten
    assert "--overwrite" in capsys.readouterr().err and (report / "ablations.md").read_text() == before
    assert cli_main(["sweep", "report", "--grid", str(grid_path), "--out", str(report), "--overwrite"]) == 0
    rows = {r["point"]: r for r in csv.DictReader(open(report / "ablations.csv"))}
    assert list(rows) == ["f8", "f16", "f42p67"]
    f8, f16, f42 = rows["f8"], rows["f16"], rows["f42p67"]
    assert float(f8["ratio"]) == 8 and f8["latent"] == "8x8" and f16["latent"] == "4x4"
    assert float(f8["b_psnr"]) == 25.5 and float(f8["b_ssim"]) == 0.75 and float(f8["b_rfid"]) == 12.5
    assert float(f8["b_psnr_stage_a"]) == 30.0 and float(f8["b_peak_memory_gb"]) == 2.25
    assert float(f8["c_align_all"]) == pytest.approx(1.0) and float(f8["c_align_background"]) == 0.5
    assert float(f8["c_clip_score"]) == 0.3125 and f8["c_fid"] == ""
    assert float(f8["b_steps_per_s"]) == pytest.approx(2.0) and float(f8["c_steps_per_s"]) == pytest.approx(4.0)
    assert int(f8["b_params"]) == 350 and int(f8["c_params"]) == 2000 and int(f8["b_steps"]) == 100
    assert float(f16["b_steps_per_s"]) == pytest.approx(1.0)  # 50 + 50 steps in 50 + 50 s
    assert float(f16["b_psnr"]) == 22.0 and f16["b_ssim"] == "" and f16["c_clip_score"] == ""
    assert float(f42["ratio"]) == 42.67 and f42["latent"] == "" and f42["b_psnr"] == ""  # from the grid

    md = (report / "ablations.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| f")]
    assert table[0].startswith("| f8 | 8 | 8x8 | 25.50 | 0.7500 | 30.00 | 12.50 |")
    assert "| 0.3125 | — |" in table[0]  # CLIP score, FID missing
    assert table[1].startswith("| f16 | 16 | 4x4 | 22.00 | — |")
    assert table[2].startswith("| f42p67 | 42.67 | — | — |")
    pytest.importorskip("matplotlib")
    for metric in ("b_psnr", "b_ssim", "c_align_all", "c_clip_score", "b_steps_per_s"):
        png = report / f"ablation_{metric}.png"
        assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    assert not (report / "ablation_c_fid.png").exists()  # nothing to plot, no empty plot


def test_slurm_launcher(tmp_path, monkeypatch, capsys):
    grid = sweep.load_grid(
        write_grid(
            tmp_path, second_axis=True, slurm={"nodes": 2, "tasks_per_node": 4, "folder": str(tmp_path / "logs")}
        )
    )
    points = sweep.expand(grid)
    monkeypatch.setitem(sys.modules, "submitit", None)  # not installed
    with pytest.raises(sweep.SweepError, match="needs submitit"):
        sweep.submit_slurm(grid, points)

    submitted = []

    class FakeExecutor:
        def __init__(self, folder):
            self.folder = folder

        def update_parameters(self, **params):
            self.params = params

        def submit(self, fn, runs, cwd):
            submitted.append((dict(self.params), runs))
            return type("Job", (), {"job_id": str(len(submitted))})()

    monkeypatch.setitem(sys.modules, "submitit", type(sys)("submitit"))
    sys.modules["submitit"].AutoExecutor = FakeExecutor
    sweep.submit_slurm(grid, points)
    # one job per Stage B run, which then trains the Stage C runs depending on it, in order
    assert [[(r.stage, r.name) for r in runs] for _, runs in submitted] == [
        [("b", f), ("c", f"{f}_w64"), ("c", f"{f}_w128")] for f in ("f8", "f16", "f42p67")
    ]
    assert submitted[0][0]["nodes"] == 2 and "folder" not in submitted[0][0]
    assert submitted[0][1][0].args[-2:] == ["--trainer.num_nodes=2", "--trainer.devices=4"]
