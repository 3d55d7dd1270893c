"""A teacher larger than one GPU: its layers spread over this process's GPUs (`--device-map auto`).

Stage one runs the teacher forward only, so a model that does not fit on one GPU can be split by
layers (accelerate's device map: each GPU holds a run of layers, the hidden states move from
one to the next). This module decides which GPUs a process takes and where each layer goes, and
refuses a placement that would spill layers to the CPU or the disk (accelerate would run them
there, 10-100x slower, without saying so). Loading and the forward stay transformers' own; the
only thing amid adds is the float32 LM head's room on the GPU that holds the head.
"""

from __future__ import annotations

import importlib
import warnings

import torch

from amid.errors import first_line
from amid.models import ModelError, model_source

__all__ = ["process_gpus", "spread_device_map", "need_accelerate", "GPU_MEMORY_SHARE"]

# Of each GPU's free memory, the share the teacher's weights may take; the rest is for the
# activations of a forward batch (--max-tokens tokens) and the top-k.
GPU_MEMORY_SHARE = 0.85


def process_gpus(count: int, local_rank: int = 0, local_world: int = 1) -> list[int]:
    """The GPUs (indices) one process spreads its teacher over: all `count` of them alone, or
    under torchrun the local rank's equal, contiguous share of the node's GPUs."""
    if count == 0:
        return []
    share = count // local_world
    if share == 0:
        raise ValueError(f"--device-map auto: {local_world} processes on this node share {count} GPU(s); start at "
                         f"most {count} (torchrun --nproc-per-node), each then spreads its teacher over its share")
    return list(range(local_rank * share, (local_rank + 1) * share))


def need_accelerate() -> None:
    """ModelError unless accelerate imports (it plans and runs the spread model)."""
    try:
        importlib.import_module("accelerate.utils")  # accelerate itself, and what it needs
    except ImportError as exc:
        installed = (getattr(exc, "name", None) or "").split(".")[0] != "accelerate"  # its own import failed
        raise ModelError("--device-map auto needs accelerate: " + (
            f"it is installed but does not import ({first_line(exc)})" if installed
            else "pip install accelerate (or amid[device-map])")) from None


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def spread_device_map(name: str, what: str, trust_remote_code: bool, dtype: torch.dtype, gpus: list[int],
                      budget: dict[int | str, int] | None = None, processes: int = 1) -> dict[str, int | str]:
    """A device map (module name -> GPU index) placing the model `name`'s layers over `gpus`,
    computed by accelerate from the model's config (no weights read) and each GPU's free memory
    times GPU_MEMORY_SHARE (`budget` overrides that: bytes per device). The layers are balanced
    over the GPUs as transformers' "auto" does (packed in order where balancing would spill), a
    tied LM head stays with its embedding, and room for the head's float32 copy (TargetLogits)
    is set aside on the GPU that holds it. Without GPUs everything goes to the CPU. ModelError
    where the GPUs cannot hold the model (`processes`: how many share this node's GPUs, for
    the advice)."""
    need_accelerate()
    from accelerate import infer_auto_device_map, init_empty_weights
    from accelerate.utils import get_balanced_memory
    from transformers import AutoConfig, AutoModelForCausalLM

    source = model_source(name, what, "model")
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        with init_empty_weights():
            empty = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
        empty.tie_weights()  # left untied on the meta device: a tied head must be planned with its embedding
    except Exception as exc:  # the damage load_model would name, met one step earlier
        raise ModelError(f"{what} {name}: cannot be loaded as a causal language model ({first_line(exc)})") from None
    if budget is None:
        budget = {g: int(torch.cuda.mem_get_info(g)[0] * GPU_MEMORY_SHARE) for g in gpus} if gpus else {"cpu": 1 << 62}
    no_split = getattr(empty, "_no_split_modules", None) or []
    head = empty.get_output_embeddings()
    head_name = next((n for n, m in empty.named_modules() if m is head), None)
    head_fp32 = head.weight.numel() * 4 if head is not None and dtype != torch.float32 else 0

    def place(limits: dict[int | str, int]) -> tuple[dict[str, int | str], list[str]]:
        with warnings.catch_warnings():  # accelerate's advice on offloaded buffers: a spill is refused below
            warnings.simplefilter("ignore")
            device_map = infer_auto_device_map(empty, max_memory=limits, no_split_module_classes=no_split, dtype=dtype)
        return device_map, sorted({str(d) for d in device_map.values() if d not in limits})

    def plan(reserve_on: int | str) -> tuple[dict[str, int | str], list[str]]:
        limits = {**budget, reserve_on: max(budget[reserve_on] - head_fp32, 0)}
        if len(limits) > 1:
            balanced = get_balanced_memory(empty, max_memory=dict(limits), no_split_module_classes=no_split, dtype=dtype)
            device_map, spilled = place({d: m for d, m in balanced.items() if d in limits})
            if not spilled:
                return device_map, spilled
        return place(limits)  # in order, each GPU filled before the next

    reserve_on = list(budget)[-1]  # where an untied head goes: after the last layer
    device_map, spilled = plan(reserve_on)
    held = next((d for m, d in device_map.items() if head_name and (m in ("", head_name) or head_name.startswith(m + "."))),
                None)
    if not spilled and held in budget and held != reserve_on:  # a tied head: with the embedding
        device_map, spilled = plan(held)
    if spilled:
        total = sum(p.numel() * p.element_size() for p in empty.parameters())
        advice = ("start fewer processes a node (torchrun --nproc-per-node), so that each spreads it over more GPUs"
                  if processes > 1 else "use more GPUs, or GPUs with more free memory")
        raise ModelError(
            f"{what} {name}: its weights ({_size(total)} in {str(dtype).replace('torch.', '')}) do not fit in "
            f"{len(gpus)} GPU(s) ({_size(sum(budget.values()) - head_fp32)} for weights: {GPU_MEMORY_SHARE:.0%} of the "
            f"free memory{', less the LM head in float32' if head_fp32 else ''}); accelerate would run part of it on the "
            f"{' and '.join(spilled)}. {advice[0].upper() + advice[1:]}"
            f"{', or pass --dtype bf16' if dtype == torch.float32 else ''}")
    return device_map
