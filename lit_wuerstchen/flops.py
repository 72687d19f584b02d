"""FLOPs of a training step, counted once with ``torch.utils.flop_counter`` (for ``perf/`` MFU and the benchmarks).

:func:`measure_training_flops` is Lightning's ``measure_flops`` (a meta-device model: no memory, no compute) with
:func:`flop_counter` in place of the stock ``FlopCounterMode``: torch (2.14) counts the weight gradient of a grouped
convolution ``groups`` times over (+23% phantom FLOPs on the released prior, whose ResBlocks have depthwise convs;
+16% on the decoder), and has no formula for the CPU flash-attention kernel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _conv_backward_flop(
    grad_out_shape,
    x_shape,
    w_shape,
    _bias,
    _stride,
    _padding,
    _dilation,
    transposed,
    _output_padding,
    groups,
    output_mask,
    out_shape,
    **kwargs,
) -> int:
    """torch's ``convolution_backward`` formula with the weight gradient of a grouped convolution divided by
    ``groups``: torch (2.14) counts it ``groups`` times over, which for the depthwise 3x3 convs of every ResBlock
    (groups = width) would add 23% of phantom FLOPs to the released prior's step."""
    from torch.utils.flop_counter import conv_flop_count

    def t(shape):
        return [shape[1], shape[0], *shape[2:]]

    flops = 0
    if output_mask[0]:  # grad_input as a transposed conv of grad_out with the weight
        flops += conv_flop_count(grad_out_shape, w_shape, out_shape[0], not transposed)
    if output_mask[1]:  # grad_weight as a conv of the input with grad_out, per group
        a, b = (grad_out_shape, x_shape) if transposed else (x_shape, grad_out_shape)
        flops += conv_flop_count(t(a), t(b), t(out_shape[1]), transposed=False) // groups
    return flops


def _sdpa_cpu_flop(query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward_flop(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    """Model FLOPs: twice the forward (the recomputed scores are not counted, as on the meta device's math path)."""
    from torch.utils.flop_counter import sdpa_flop_count

    return 2 * sdpa_flop_count(query, key, value)


def flop_counter():
    """``FlopCounterMode`` with the grouped-convolution fix, and the CPU flash attention counted (torch has no formula
    for it; on the meta device attention runs as matmuls and is counted as such)."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    mapping = {
        aten.convolution_backward: _conv_backward_flop,
        aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flop,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flop,
    }
    return FlopCounterMode(display=False, custom_mapping=mapping)


def measure_training_flops(
    forward_fn: Callable[[], torch.Tensor], loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> int:
    """FLOPs of ``forward_fn()`` and, with ``loss_fn``, the backward of ``loss_fn(output)`` (model FLOPs: what
    activation checkpointing recomputes is not counted); best run on a meta-device model (no memory, no compute)."""
    with flop_counter() as counter:
        if loss_fn is None:
            forward_fn()
        else:
            loss_fn(forward_fn()).backward()
    return counter.get_total_flops()


H100_SXM_BF16 = 989.5e12
"""Dense bf16 FLOP/s of an H100 SXM (NVIDIA's datasheet: 1,979 TFLOP/s with sparsity); the H200 has the same cores."""


def device_peak_flops(
    device: torch.device, dtype: torch.dtype, override_tflops: float | None = None
) -> tuple[float | None, str]:
    """Peak FLOP/s of one device for MFU, and where the number comes from: ``override_tflops``, else Lightning's
    table (``get_available_flops``), except for the H200, which the table lists at its with-sparsity rate (2.0e15)
    and finds only by some names: counted as an H100 SXM, dense. None for CPUs and unknown devices."""
    if override_tflops:
        return override_tflops * 1e12, "the configured peak"
    if device.type != "cuda":
        return None, f"no peak known for {device.type}"
    name = torch.cuda.get_device_name(device)
    if "h200" in name.lower() and dtype == torch.bfloat16:
        return H100_SXM_BF16, f"{name}: as an H100 SXM, dense bf16 (Lightning's 2.0e15 for the H200 is with sparsity)"
    from lightning.fabric.utilities.throughput import get_available_flops

    flops = get_available_flops(device, dtype)
    return (float(flops), f"{name}: Lightning's table") if flops else (None, f"{name}: unknown peak")
