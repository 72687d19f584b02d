"""AdamW on the CPU: torch's fused kernel (``optimizer.fused: true``) against the default the stages get there.

Three AdamW builds over the same parameters, each measured in the same run (rounds interleaved, so load from other
jobs falls on all of them alike) and reported as a ratio against the default:

* ``default``: ``OptimizerConfig().build`` on the CPU, i.e. torch's default (a per-tensor loop: torch turns its
  foreach path on by default only on GPUs), what the stages train with on a CPU;
* ``foreach``: ``torch.optim.AdamW(foreach=True)`` (multi-tensor kernels), for reference;
* ``fused``: ``OptimizerConfig(fused=True).build`` (``torch.optim.AdamW(fused=True)``).

Measured: (1) ``optimizer.step()`` alone over the parameters of the medium prior of benchmarks/gpu_throughput.py
(the released prior's width 1536, heads 24, text 1280, 2 of its 32 blocks) with fixed random gradients; (2) a whole
training step of that prior (``Diffusion.loss`` forward + backward at batch 2 on 24x24 latents and 77 text tokens,
AdamW step, ``zero_grad``), as gpu_throughput.py's ``--preset medium`` C case; (3) bit-identity: a small prior trained
``--identity-steps`` steps from the same weights on the same batches with each build, the weights compared bit for
bit with the default's (and the largest difference).

Usage: python benchmarks/optimizer_step.py [--steps 20] [--train-steps 4] [--rounds 3] [--json PATH]
Results: docs/benchmarks.md "AdamW: fused vs default (benchmarks/optimizer_step.py)".
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import torch
from gpu_throughput import tune_malloc  # benchmarks/ (scripts run from there)
from machine import describe

from lit_wuerstchen.diffusion import Diffusion, DiffusionConfig
from lit_wuerstchen.models import Prior, PriorConfig
from lit_wuerstchen.stages.base import OptimizerConfig

KINDS = ("default", "foreach", "fused")
MEDIUM = PriorConfig(width=1536, depth=2, heads=24, text_channels=1280, dropout=0.1)
SMALL = PriorConfig(width=128, depth=2, heads=2, text_channels=64, dropout=0.0)


def build(kind: str, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW as the stages build it (lr 1e-4, weight decay 0.01), of one kind."""
    if kind == "foreach":
        return torch.optim.AdamW(parameters, lr=1e-4, weight_decay=0.01, foreach=True)
    config = OptimizerConfig(fused=True if kind == "fused" else None)
    optimizer, _ = config.build(parameters)
    return optimizer


def resolved(optimizer: torch.optim.Optimizer) -> str:
    d = optimizer.defaults
    return "fused" if d.get("fused") else "foreach" if d.get("foreach") else "for-loop (torch's default here)"


def time_optimizer_steps(steps: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per ``optimizer.step()`` over the medium prior's parameters, per kind: ``rounds`` rounds of
    ``steps`` steps (after one untimed), interleaved across the kinds; the median step of each round."""
    torch.manual_seed(0)
    network = Prior(MEDIUM)
    states = {}
    for kind in KINDS:  # each kind its own copy of the weights and its own AdamW state
        parameters = [torch.nn.Parameter(p.detach().clone()) for p in network.parameters()]
        for p in parameters:
            p.grad = torch.randn_like(p) * 1e-3
        optimizer = build(kind, parameters)
        optimizer.step()  # the state (exp_avg, exp_avg_sq) is allocated on the first step: untimed
        states[kind] = optimizer
    del network
    out: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for _ in range(rounds):
        for kind, optimizer in states.items():
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                optimizer.step()
                times.append(time.perf_counter() - start)
            out[kind].append(statistics.median(times))
    return out


def seeded_prior(config: PriorConfig, kind: str) -> tuple[Prior, torch.optim.Optimizer]:
    """The prior of ``config`` from the same initial weights for every kind, with that kind's AdamW."""
    torch.manual_seed(0)
    network = Prior(config).train()
    return network, build(kind, list(network.parameters()))


def time_training_steps(steps: int, rounds: int, batch: int) -> dict[str, list[float]]:
    """Seconds per whole training step of the medium prior, per kind (rounds interleaved; the median step each)."""
    diffusion = Diffusion(DiffusionConfig(t_sampler="official", target="eps", loss_weight="p2_official"))
    setups = {}
    for kind in KINDS:
        network, optimizer = seeded_prior(MEDIUM, kind)
        x0 = torch.randn(batch, MEDIUM.latent_channels, 24, 24)
        text = torch.randn(batch, 77, MEDIUM.text_channels)
        setups[kind] = (network, optimizer, x0, text)

    def step(kind: str) -> None:
        network, optimizer, x0, text = setups[kind]
        loss = diffusion.loss(lambda x_t, t: network(x_t, t, text), x0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for kind in KINDS:
        step(kind)  # warm-up (the optimizer state is allocated)
    out: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for _ in range(rounds):
        for kind in KINDS:
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                step(kind)
                times.append(time.perf_counter() - start)
            out[kind].append(statistics.median(times))
    return out


def identity(steps: int) -> dict[str, dict]:
    """The small prior trained ``steps`` steps from the same weights on the same batches (and the same noise and t),
    per kind: whether its weights are bit-identical to the default's, and the largest difference."""
    diffusion = Diffusion(DiffusionConfig(t_sampler="official", target="eps", loss_weight="p2_official"))
    weights = {}
    for kind in KINDS:
        network, optimizer = seeded_prior(SMALL, kind)
        for _ in range(steps):  # the same random stream for every kind: same batches, t and noise
            x0, text = torch.randn(2, SMALL.latent_channels, 8, 8), torch.randn(2, 77, SMALL.text_channels)
            diffusion.loss(lambda x_t, t, net=network, c=text: net(x_t, t, c), x0).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        weights[kind] = [p.detach().clone() for p in network.parameters()]
    out = {}
    for kind in KINDS[1:]:
        pairs = list(zip(weights["default"], weights[kind]))
        out[kind] = {
            "bit_identical": all(torch.equal(a, b) for a, b in pairs),
            "max_abs_difference": max(float((a - b).abs().max()) for a, b in pairs),
            "tensors_differing": sum(not torch.equal(a, b) for a, b in pairs),
            "tensors": len(pairs),
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per round and kind")
    parser.add_argument("--train-steps", type=int, default=4, help="training steps per round and kind (0: skip)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the best round counts)")
    parser.add_argument("--batch", type=int, default=2, help="training-step batch (gpu_throughput medium: 2)")
    parser.add_argument("--identity-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--no-malloc-tuning", action="store_true", help="as benchmarks/gpu_throughput.py")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    malloc_tuned = not args.no_malloc_tuning and tune_malloc()  # as gpu_throughput.py on a CPU
    if args.threads:
        torch.set_num_threads(args.threads)
    resolved_kinds = {kind: resolved(build(kind, [torch.nn.Parameter(torch.zeros(1))])) for kind in KINDS}
    parameters = sum(p.numel() for p in Prior(MEDIUM).parameters())
    print(f"[optimizer_step] AdamW over the medium prior ({parameters / 1e6:.1f}M parameters, fp32, CPU): "
          f"{', '.join(f'{k} = {v}' for k, v in resolved_kinds.items())}", flush=True)  # fmt: skip
    results = {
        "meta": {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": describe(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "parameters": parameters,
            "resolved": resolved_kinds,
            "malloc_tuned": malloc_tuned,
            "argv": argv,
        },
        "optimizer_step_s": time_optimizer_steps(args.steps, args.rounds),
    }
    if args.train_steps:
        print("[optimizer_step] timing whole training steps", flush=True)
        results["training_step_s"] = time_training_steps(args.train_steps, args.rounds, args.batch)
    results["identity"] = identity(args.identity_steps)
    results["meta"]["load_average"] = os.getloadavg()  # over the last minutes of the run

    print("\n| measurement | default | foreach | fused | foreach / default | fused / default |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, key in (("AdamW step (ms)", "optimizer_step_s"), ("training step (ms)", "training_step_s")):
        if key not in results:
            continue
        best = {kind: min(times) for kind, times in results[key].items()}  # load only slows: the best round
        print(
            f"| {name} | {1000 * best['default']:,.1f} | {1000 * best['foreach']:,.1f} | {1000 * best['fused']:,.1f} "
            f"| {best['foreach'] / best['default']:.2f} | {best['fused'] / best['default']:.2f} |"
        )
    for kind, r in results["identity"].items():
        print(
            f"{kind} vs default after {args.identity_steps} training steps of a small prior: "
            f"{'bit-identical' if r['bit_identical'] else 'NOT bit-identical'} ({r['tensors_differing']} of "
            f"{r['tensors']} tensors differ, max |difference| {r['max_abs_difference']:.3g})"
        )
    m = results["meta"]
    load = ", ".join(f"{x:.2f}" for x in m["load_average"])
    print(f"{m['date']} | {m['machine']} | {m['threads']} threads | torch {m['torch']} | load average {load} "
          f"| glibc malloc tuned: {m['malloc_tuned']}")  # fmt: skip
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"results written to {args.json}")
    return results


if __name__ == "__main__":
    main()
