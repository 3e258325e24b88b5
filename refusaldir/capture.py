"""Batched, hook-based activation capture with streaming float64 accumulation.

Activations are read at positions counted from the end of each (left-padded) prompt, so
memory does not grow with the number of prompts: means are running float64 sums, and
projections keep one scalar per prompt, position and layer.

Example:
    >>> means = mean_activations(model, ["Hi there"], layers=[3], positions=[-1])  # doctest: +SKIP
    >>> means.shape  # (pos, layer, d_model)  # doctest: +SKIP
    torch.Size([1, 1, 896])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from refusaldir.batching import AUTO, BatchSize, BatchSizer
from refusaldir.data import check_prompts
from refusaldir.errors import ConfigError, PromptFileError
from refusaldir.hooks import RESID_POINTS, StopForward, check_layers, hook_name, hooks, stop_forward
from refusaldir.progress import progress_bar

if TYPE_CHECKING:
    from refusaldir.models import ChatModel


def _check_positions(model: ChatModel, positions: Sequence[int]) -> list[int]:
    pos = [int(p) for p in positions]
    if not pos or any(p >= 0 for p in pos):
        raise ConfigError(
            f"positions {pos} must be negative offsets from the end of the prompt "
            f"(e.g. {model.template.positions}); -1 is the last prompt token"
        )
    return pos


def iter_activations(
    model: ChatModel,
    instructions: Sequence[str],
    *,
    layers: Sequence[int] | str | None = None,
    positions: Sequence[int] | None = None,
    hook_point: str = "resid_pre",
    batch_size: BatchSize = AUTO,
    progress: bool = True,
    description: str = "capture",
) -> Iterator[tuple[int, Float[Tensor, "batch pos layer d_model"]]]:
    """Yield ``(start_index, activations)`` per batch at the given layers and positions.

    Only layers up to the deepest requested one are computed. Activations keep the model's
    dtype; callers reduce them (means, projections) before the next batch arrives.
    """
    texts = check_prompts(instructions, "instructions", single=True)
    sizer = BatchSizer(batch_size, model, kind="capture")
    if hook_point not in RESID_POINTS:
        raise ConfigError(
            f"hook_point {hook_point!r} is not a residual stream point; use one of {RESID_POINTS}"
        )
    layer_list = check_layers(model, layers)
    pos = _check_positions(model, positions if positions is not None else model.template.positions)
    model.template.check_lengths(texts, what=description if description != "capture" else "prompts")
    pos_index = torch.tensor(pos, device=model.device)
    template = model.template
    last = layer_list[-1]
    stop_early = last < model.n_layers - 1 or hook_point != "resid_post"
    buf: dict[int, Tensor] = {}

    def make_hook(layer: int) -> Callable[..., None]:
        def fn(act: Tensor, hook: object) -> None:
            buf[layer] = act[:, pos_index.to(act.device), :].detach()
            if layer == last and stop_early:
                raise StopForward

        return fn

    fwd = [(hook_name(hook_point, layer), make_hook(layer)) for layer in layer_list]
    decoder = model.hf.get_decoder() if hasattr(model.hf, "get_decoder") else model.hf.model

    def forward(chunk: list[str]) -> Tensor:
        enc = {k: v.to(model.device) for k, v in template.encode(chunk).items()}
        buf.clear()
        with stop_forward():
            decoder(**enc, use_cache=False)
        return torch.stack([buf[layer] for layer in layer_list], dim=2)

    bar = progress_bar(progress)
    with bar, hooks(model, fwd), torch.inference_mode():
        task = bar.add_task(description, total=len(texts))
        for start, chunk, acts in sizer.map(texts, forward):
            yield start, acts
            bar.advance(task, len(chunk))


def mean_activations(
    model: ChatModel,
    instructions: Sequence[str],
    *,
    layers: Sequence[int] | str | None = None,
    positions: Sequence[int] | None = None,
    hook_point: str = "resid_pre",
    batch_size: BatchSize = AUTO,
    progress: bool = True,
    description: str = "mean activations",
) -> Float[Tensor, "pos layer d_model"]:
    """Mean residual activation over prompts, accumulated in float64 batch by batch."""
    texts = check_prompts(instructions, "instructions", single=True)
    total: Tensor | None = None
    for _, acts in iter_activations(
        model, texts, layers=layers, positions=positions, hook_point=hook_point,
        batch_size=batch_size, progress=progress, description=description,
    ):
        s = acts.to(torch.float64).sum(dim=0)
        total = s if total is None else total + s
    if total is None:
        raise PromptFileError("no prompts to capture; pass at least one instruction")
    return total / len(texts)


def project(
    model: ChatModel,
    instructions: Sequence[str],
    directions: Float[Tensor, "pos layer d_model"],
    *,
    layers: Sequence[int] | str | None = None,
    positions: Sequence[int] | None = None,
    hook_point: str = "resid_pre",
    batch_size: BatchSize = AUTO,
    progress: bool = True,
    description: str = "projections",
) -> Float[Tensor, "batch pos layer"]:
    """Scalar projection of each prompt's activation onto ``directions`` (normalised here)."""
    texts = check_prompts(instructions, "instructions", single=True)
    if not isinstance(directions, Tensor) or directions.ndim != 3:
        shape = tuple(directions.shape) if isinstance(directions, Tensor) else type(directions).__name__
        raise ConfigError(
            f"directions has shape {shape}; expected a (pos, layer, d_model) tensor, e.g. "
            "ds.refusal[i : i + 1] for one position"
        )
    if directions.shape[-1] != model.d_model:
        raise ConfigError(
            f"directions have d_model={directions.shape[-1]} but {model.spec} has "
            f"d_model={model.d_model}; use directions extracted from this model"
        )
    if not bool(torch.isfinite(directions).all()):
        raise ConfigError("directions contain NaN or inf values; re-extract them")
    n_pos = len(positions) if positions is not None else len(model.template.positions)
    n_layers = len(check_layers(model, layers))
    if tuple(directions.shape[:2]) != (n_pos, n_layers):
        raise ConfigError(
            f"directions has shape {tuple(directions.shape)} but {n_pos} position(s) and "
            f"{n_layers} layer(s) were asked for; pass one direction per (position, layer)"
        )
    unit = directions.to(torch.float64)
    unit = unit / unit.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    out = torch.empty(len(texts), unit.shape[0], unit.shape[1], dtype=torch.float64)
    unit = unit.to(model.device)  # once, not per batch
    for start, acts in iter_activations(
        model, texts, layers=layers, positions=positions, hook_point=hook_point,
        batch_size=batch_size, progress=progress, description=description,
    ):
        proj = torch.einsum("bpld,pld->bpl", acts.to(torch.float64), unit)
        out[start : start + acts.shape[0]] = proj.cpu()
    return out

