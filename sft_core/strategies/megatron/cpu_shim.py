"""Let megatron-core run on CPU (gloo), where its code assumes CUDA. Active only without CUDA.

megatron-core 0.16 creates some tensors with `device="cuda"` or `torch.cuda.current_device()`, keeps
its RNG streams with `torch.cuda` calls, calls `Tensor.cuda()`, and its optimizer and gradient
clipping assert `Tensor.type() == "torch.cuda.FloatTensor"`. The shim answers those on CPU:

- every loaded `megatron.core` module sees, as its global `torch`, a proxy that sends CUDA devices
  given to tensor factories (`torch.zeros(..., device="cuda")`) to the CPU, and whose `torch.cuda`
  is a CPU stand-in: `current_device()` is "cpu", the RNG calls act on the CPU generator, and
  synchronize / streams are no-ops. Other torch functions and all tensor ops are untouched (a
  TorchFunctionMode would do the same job but costs 30-50% per step: it intercepts every op);
- `megatron.core.tensor_parallel.random`'s private CUDA RNG helpers are pointed at the CPU generator;
- inside `active()` only, `Tensor.cuda()` returns the tensor itself and `Tensor.type()` reports CPU
  tensors with their CUDA names. The megatron strategy wraps each of its calls in `active()`.

The shim does not touch megatron's math: the same layer code, schedules and optimizer run.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator
from typing import Any

import torch

_FACTORIES = (
    "empty",
    "zeros",
    "ones",
    "full",
    "tensor",
    "as_tensor",
    "arange",
    "rand",
    "randn",
    "randint",
    "linspace",
    "empty_strided",
)
_INSTALLED: set[str] = set()


def needed() -> bool:
    return not torch.cuda.is_available()


def _cpu_device(device: Any) -> Any:
    if isinstance(device, int) or (isinstance(device, str) and device.startswith("cuda")):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return "cpu"
    return device


def _on_cpu(factory: Any) -> Any:
    def create(*args: Any, **kwargs: Any) -> Any:
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)  # pinning needs an accelerator
        return factory(*args, **kwargs)

    create.__name__ = factory.__name__
    return create


class _NullStream(contextlib.nullcontext):
    def wait_stream(self, *args: Any) -> None: ...

    def synchronize(self) -> None: ...

    def record_event(self, *args: Any) -> None: ...


class _CudaOnCpu(types.SimpleNamespace):
    """What megatron calls on `torch.cuda`, answered for the CPU; anything else is the real
    `torch.cuda` (and fails loudly if it needs a GPU)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


_cuda_on_cpu = _CudaOnCpu(
    is_available=lambda: False,
    current_device=lambda: "cpu",
    device_count=lambda: 0,
    synchronize=lambda *a, **k: None,
    manual_seed=lambda seed: torch.manual_seed(seed),
    manual_seed_all=lambda seed: torch.manual_seed(seed),
    get_rng_state=lambda *a, **k: torch.get_rng_state(),
    set_rng_state=lambda state, *a, **k: torch.set_rng_state(state),
    current_stream=lambda *a, **k: _NullStream(),
    default_stream=lambda *a, **k: _NullStream(),
    stream=lambda *a, **k: _NullStream(),
    Stream=lambda *a, **k: _NullStream(),
    memory_allocated=lambda *a, **k: 0,
    max_memory_allocated=lambda *a, **k: 0,
    empty_cache=lambda: None,
)


class _TorchOnCpu(types.ModuleType):
    """`torch` as megatron-core sees it under the shim (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _cuda_on_cpu
        for name in _FACTORIES:
            setattr(self, name, _on_cpu(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        value = getattr(torch, name)
        setattr(self, name, value)  # cache: later lookups are plain attribute reads
        return value


_torch_on_cpu = _TorchOnCpu()


def install() -> None:
    """Point every loaded `megatron.core` module at the CPU stand-ins. Idempotent; call it after the
    megatron modules in use are imported (the strategy imports them first)."""
    if not needed():
        return
    import megatron.core.tensor_parallel.random as mp_random

    mp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    for name, module in list(sys.modules.items()):
        if name in _INSTALLED or not name.startswith("megatron.core") or module is None:
            continue
        if getattr(module, "torch", None) is torch:
            module.torch = _torch_on_cpu  # type: ignore[attr-defined]  # the module's own global
        _INSTALLED.add(name)


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


@contextlib.contextmanager
def active() -> Iterator[None]:
    """`Tensor.cuda()` as a no-op and CUDA type names for CPU tensors, for the duration of a call
    into megatron. Nothing changes where CUDA is available."""
    if not needed():
        yield
        return
    original_cuda, original_type = torch.Tensor.cuda, torch.Tensor.type

    def cuda(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self

    def type_(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        result = original_type(self, *args, **kwargs)
        if args or kwargs:
            return result
        return _CUDA_TYPE_NAMES.get(result, result)

    # Deliberate monkeypatching for the duration of the call (restored below).
    torch.Tensor.cuda, torch.Tensor.type = cuda, type_  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.Tensor.type = original_cuda, original_type  # type: ignore[method-assign]
