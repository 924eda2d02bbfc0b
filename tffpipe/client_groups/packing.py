"""A round's real clients packed into groups, the types a group's client work takes, and
`GroupingError`. Packing itself reads no data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

from tffpipe import errors

DatasetFn = Callable[[tf.Tensor], tf.data.Dataset]
# (member id, update tensors, weight) -> (update tensors, weight), in the group's graph.
ReplaceUpdate = Callable[[tf.Tensor, Sequence[tf.Tensor], tf.Tensor], tuple[Sequence[tf.Tensor], tf.Tensor]]

# A group's member ids are read into one tensor; no group comes near this.
_ALL = 2**31 - 1


class GroupingError(errors.InputError):
    """The configuration has no grouped path (yet); the message says which part."""

    field = "client_batching"


def pack(client_ids: Sequence[str], group_size: int) -> list[list[str]]:
    """The round's real clients in groups of at most `group_size`, in sampled order.

    The groups are as even as can be (sizes differ by at most one), so several
    workers get similar work: ceil(n / K) groups. No clients, no groups.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be positive, got {group_size}")
    ids = list(client_ids)
    if not ids:
        return []
    groups = -(-len(ids) // group_size)
    return [chunk.tolist() for chunk in np.array_split(np.asarray(ids, dtype=object), groups)]


def _per_member(values: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
    """[K] values shaped to broadcast against a [K, ...] tensor."""
    return tf.reshape(values, [-1] + [1] * (len(like.shape) - 1))
