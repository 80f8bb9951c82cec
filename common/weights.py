"""Weights on the wire and on disk: safetensors, never pickle.

A weight message is ``msgpack({"version": int, "tensors": safetensors bytes})``: the receiver
can check the version before touching the tensors, and a hostile payload can at worst fail
to parse; it can never run code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from common.schema import WeightsMessage


class WeightsError(ValueError):
    """A weight message or file could not be decoded or does not fit the network."""


def encode_state_dict(state: dict[str, torch.Tensor]) -> bytes:
    # safetensors refuses shared or non-contiguous storage; clone to plain CPU tensors.
    return st_save({k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()})


def decode_state_dict(data: bytes) -> dict[str, torch.Tensor]:
    try:
        return st_load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError and others on garbage
        raise WeightsError(f"weights payload is not valid safetensors: {exc}") from None


def pack_weights(version: int, module: torch.nn.Module) -> WeightsMessage:
    return WeightsMessage(version=version, payload=encode_state_dict(module.state_dict()))


def message_to_bytes(msg: WeightsMessage) -> bytes:
    return msgpack.packb({"version": int(msg.version), "tensors": msg.payload}, use_bin_type=True)


def message_from_bytes(data: bytes) -> WeightsMessage:
    try:
        obj = msgpack.unpackb(data, raw=False)
    except Exception as exc:
        raise WeightsError(f"weight message is not msgpack: {exc}") from None
    if (
        not isinstance(obj, dict)
        or not isinstance(obj.get("version"), int)
        or not isinstance(obj.get("tensors"), bytes)
    ):
        raise WeightsError("weight message must be a map with an int 'version' and bytes 'tensors'")
    return WeightsMessage(version=obj["version"], payload=obj["tensors"])


def load_into(module: torch.nn.Module, payload: bytes) -> None:
    """Load safetensors bytes into ``module``; a mismatch names the offending keys."""
    state = decode_state_dict(payload)
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise WeightsError(f"weights do not fit the network: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise WeightsError(
                f"weights do not fit the network: {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}"
            )
    module.load_state_dict(state)


@dataclass(frozen=True)
class ActorCheckpoint:
    """The actor network of one checkpoint in run storage, read and verified against its
    manifest, with the counters an evaluation is recorded under."""

    uri: str
    actor: dict[str, torch.Tensor] = field(repr=False)
    weights_version: int
    updates: int
    env_steps: int
    config_yaml: str = field(default="", repr=False)


# Reads the checkpoint at a URI (a local path or an fsspec URI): the learner package's
# checkpoint reader, handed to whoever runs an evaluation (`convoy evaluate`, the evaluator
# actor), so that both load a checkpoint the same way and neither needs the driver's help.
CheckpointLoader = Callable[[str], ActorCheckpoint]
