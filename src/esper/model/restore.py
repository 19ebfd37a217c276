"""Restore a model to a `state_dict` taken before its structure changed.

`load_state_dict` refuses a tensor of another shape, so after a fold (layers physically
wider) a snapshot taken before it could not be loaded: the governor swallowed the error
and restored nothing. `restore_state` first gives every parameter and buffer the
snapshot's shape (the same Parameter objects, as a fold keeps them), re-reads the slots'
specs from the resized host, and then loads; seeds are rebuilt from their blueprint ids
by the slots' own extra state, against the restored host. It is all or nothing: on any
error the model is put back as it was and the error raised.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from esper.model.fold import sync_sizes
from esper.model.morphogenetic import MorphogeneticModel


def _resize_to(model: nn.Module, state: Mapping[str, Any]) -> None:
    """Give every tensor of ``model`` whose shape differs from ``state``'s that shape
    (uninitialised: loading fills it)."""
    tensors = [(name, t, True) for name, t in model.named_parameters()]
    tensors += [(name, t, False) for name, t in model.named_buffers()]
    for name, tensor, is_param in tensors:
        wanted = state.get(name)
        if not isinstance(wanted, Tensor) or wanted.shape == tensor.shape:
            continue
        module_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(module_name)
        value = torch.empty(wanted.shape, dtype=tensor.dtype, device=tensor.device)
        if is_param:
            tensor.data = value  # the same Parameter object, as a fold keeps it
            tensor.grad = None
        else:
            setattr(owner, attr, value)
        sync_sizes(owner)


def _load(model: nn.Module, state: Mapping[str, Any]) -> None:
    _resize_to(model, state)
    if isinstance(model, MorphogeneticModel):
        # Slots check their channels against the state's: they must see the restored host.
        model.refresh_specs()
    model.load_state_dict(state)


def restore_state(model: nn.Module, state: Mapping[str, Any]) -> None:
    """``model.load_state_dict(state)``, whatever changed in the model's structure since
    ``state`` was taken (module docstring); the model's own modules are kept."""
    backup = copy.deepcopy(model.state_dict())
    try:
        _load(model, state)
    except Exception:
        _load(model, backup)  # all or nothing: never leave a half-restored model
        raise
