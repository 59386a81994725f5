"""Block swap: `model.block_swap=N` keeps the frozen weights of a transformer's last N blocks in (pinned) CPU memory
and brings each block's weights to the compute device just before it runs, forward and backward, then lets them go.

The parameters stay the same `Parameter` objects (optimizers, adapters and autograd's saved references are untouched);
only their `.data` changes between the CPU copy's device twin and a zero-size placeholder. Trainable parameters
(an adapter's, or anything not frozen) never move. On CUDA the next swapped block is copied on a side stream while the
current one computes (forward: the next block; backward: the previous one); on the CPU the "copy" is the CPU tensor
itself, so the same code runs and is tested here. Works with gradient checkpointing: a block re-run during backward
finds its weights resident, because its backward pre-hook brought them in and they go only when the block before it
starts its backward (or the backward pass ends).
Training-time only: sampling, evaluation and export after training load the model without it (train/build.py).
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterator

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from models.fingerprint import remember_source

log = logging.getLogger(__name__)
# diffusers passes a block's inputs as keywords, which module backward hooks do not see; the pre-hook used here only
# needs the outputs' gradients, so torch's note about that is not for the user
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect to "
                        "module outputs since no inputs require gradients")

BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "joint_transformer_blocks", "layers", "blocks")


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The denoiser's repeated blocks in execution order (each family's block lists, in the order its forward runs)."""
    blocks: list[torch.nn.Module] = []
    for name in BLOCK_LISTS:
        found = getattr(model, name, None)
        if isinstance(found, torch.nn.ModuleList):
            blocks += list(found)
    return blocks


def _slots(p: torch.nn.Parameter) -> list[tuple[torch.Tensor, str]]:
    """Where a parameter's bytes live: its `.data`, or, for a quantized tensor subclass (torchao's int8/fp8 weights),
    each of its inner tensors (setting `.data` on those would leave the inner ones, and their memory, in place)."""
    if is_traceable_wrapper_subclass(p):
        return [(p, name) for name in p.__tensor_flatten__()[0]]
    return [(p, "data")]


class _SwappedBlock:
    """One block's frozen tensors: the CPU copies and the hooks that bring them in and let them go."""

    def __init__(self, block: torch.nn.Module, index: int, swap: "BlockSwap"):
        self.block, self.index, self.swap = block, index, swap
        self.params = [p for p in block.parameters() if not p.requires_grad]
        self.slots = [slot for p in self.params for slot in _slots(p)]
        self.cpu = []
        pin = torch.cuda.is_available()
        for p in self.params:
            if not hasattr(p, "fingerprint_source"):  # a quantized weight already remembers its source
                remember_source(p, p.data)
        for owner, name in self.slots:
            copy = getattr(owner, name).detach().to("cpu")
            self.cpu.append(copy.pin_memory() if pin else copy)
        self.resident = True
        self.in_backward = False
        self.ready: torch.cuda.Event | None = None
        self.evict()
        self.handles = [block.register_forward_pre_hook(self._before_forward),
                        block.register_forward_hook(self._after_forward),
                        block.register_full_backward_pre_hook(self._before_backward)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.cpu)

    @property
    def device(self) -> torch.device:
        """Where the block computes: its placeholders follow the model's `.to(device)`."""
        return getattr(*self.slots[0]).device if self.slots else torch.device("cpu")

    def resident_bytes(self) -> int:
        return sum(getattr(o, n).numel() * getattr(o, n).element_size() for o, n in self.slots)

    def load(self, stream: torch.cuda.Stream | None = None) -> None:
        """Start bringing the weights in (on `stream` when given); `wait()` before use. Each comes back in its
        placeholder's dtype: the model may have been cast since (bf16 under bf16-true)."""
        if self.resident:
            return
        device = self.device
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for i, ((owner, name), c) in enumerate(zip(self.slots, self.cpu)):
                dtype = getattr(owner, name).dtype
                if c.dtype != dtype:  # the model was cast since (frozen weights to bf16): keep the CPU copy cast too
                    c = self.cpu[i] = c.to(dtype).pin_memory() if c.is_pinned() else c.to(dtype)
                setattr(owner, name, c.to(device, non_blocking=device.type == "cuda"))
            if stream is not None:
                self.ready = torch.cuda.Event()
                self.ready.record(stream)
        self.resident = True

    def wait(self) -> None:
        if self.ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(self.ready)
            for owner, name in self.slots:  # the side stream's tensors are used (and freed) on the compute stream
                getattr(owner, name).record_stream(current)
            self.ready = None

    def evict(self) -> None:
        for owner, name in self.slots:
            t = getattr(owner, name)
            setattr(owner, name, torch.empty(0, dtype=t.dtype, device=t.device))
        self.resident = False

    # hooks
    def _before_forward(self, module, args):
        self.load()
        self.wait()
        if not self.in_backward:  # a re-run under checkpointing: the next block's backward is already done
            self.swap.prefetch(self.index + 1)

    def _after_forward(self, module, args, output):
        if not self.in_backward:  # a re-run under gradient checkpointing keeps them for the backward that follows
            self.evict()

    def _before_backward(self, module, grad_output):
        self.in_backward = True
        self.load()
        self.wait()
        self.swap.backward_reached(self.index)


class BlockSwap:
    """Swaps the frozen weights of the last `n` blocks of `model` (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, n: int):
        blocks = transformer_blocks(model)
        if not blocks:
            raise ValueError(f"model.block_swap={n}: {type(model).__name__} has no transformer block list to swap; "
                             "block swap needs a transformer backbone (DiT, MMDiT, Flux, SD3, Qwen-Image, Z-Image)")
        if not 0 < n <= len(blocks):
            raise ValueError(f"model.block_swap={n}: {type(model).__name__} has {len(blocks)} blocks; swap between "
                             f"1 and {len(blocks)}")
        start = len(blocks) - n
        self.blocks = [_SwappedBlock(b, i, self) for i, b in enumerate(blocks[start:])]
        self.stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self._finish_queued = False
        log.info("block swap: %d of %d blocks keep their frozen weights in CPU memory (%.1f MiB)", n, len(blocks),
                 self.nbytes / 2**20)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.blocks)

    def prefetch(self, index: int) -> None:
        if 0 <= index < len(self.blocks) and self.stream is not None:
            block = self.blocks[index]
            if block.device.type == "cuda":
                block.load(self.stream)

    def backward_reached(self, index: int) -> None:
        """Block `index`'s output gradient is complete, so every later block's backward has run (autograd runs the
        nodes a later forward created first): the next block can go, and the previous one is fetched."""
        if index + 1 < len(self.blocks) and self.blocks[index + 1].in_backward:
            self.blocks[index + 1].in_backward = False
            self.blocks[index + 1].evict()
        self.prefetch(index - 1)
        if not self._finish_queued:
            self._finish_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)

    def _finish_backward(self) -> None:
        self._finish_queued = False
        for b in self.blocks:
            if b.resident:
                b.in_backward = False
                b.evict()

    def resident_bytes(self) -> int:
        """Bytes of swapped weights currently on the compute device (0 between uses)."""
        return sum(b.resident_bytes() for b in self.blocks)

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        for b in self.blocks:
            yield from b.params

    def remove(self) -> None:
        """Detach the hooks and put every weight back in place, resident on the compute device."""
        for b in self.blocks:
            for h in b.handles:
                h.remove()
            b.resident = False
            b.load()
