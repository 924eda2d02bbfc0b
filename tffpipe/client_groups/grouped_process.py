"""The learning process over groups whose `next` takes the round's real client ids."""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence

import tensorflow_federated as tff

from tffpipe.client_groups.packing import pack


class GroupedLearningProcess(tff.learning.templates.LearningProcess):
    """A learning process over groups whose `next` takes the round's real client ids.

    `next(state, client_ids)` packs the ids into groups of at most `group_size` and runs
    the composed process once; `next.type_signature` is the composed one
    (`(<S@SERVER, {str*}@CLIENTS> -> <S@SERVER, M@SERVER>)`). Everything else is the
    composed process's. Grouped evaluation (`group_evaluation`) is one too: its output
    carries no DP query, which `with_member_clipped_count` leaves as it is.
    """

    def __init__(self, process: tff.learning.templates.LearningProcess, group_size: int):
        super().__init__(
            process.initialize,
            process.next,
            process.get_model_weights,
            process.set_model_weights,
            get_hparams_fn=process.get_hparams,
            set_hparams_fn=process.set_hparams,
        )
        self._process = process
        self._group_size = group_size
        self._packing_next = _PackingNext(process.next, group_size)

    @property
    def group_size(self) -> int:
        return self._group_size

    def with_group_size(self, group_size: int) -> GroupedLearningProcess:
        """The same computations packing `group_size` real clients a group: nothing is traced again."""
        return GroupedLearningProcess(self._process, group_size)

    @property
    def next(self):
        return self._packing_next


class _PackingNext:
    def __init__(self, computation, group_size: int):
        self._computation = computation
        self._group_size = group_size
        self.type_signature = computation.type_signature

    def __call__(self, state, client_ids: Sequence[str]):
        return with_member_clipped_count(self._computation(state, pack(client_ids, self._group_size)))


def with_member_clipped_count(output):
    """The output with the members' clipped count where the per-client query reports its clipped count.

    Per client, TF Privacy's query counts the updates it clipped
    (`aggregator/dp_query_metrics/clipped_count`, read as `diagnostic/clipped_fraction`);
    a group's members are clipped in the client work, which counts them in
    `client_work/groups/clipped_count`: the same count of real clients, copied there so
    the round's metrics read alike on both paths. A query that reports a count of its
    own keeps it; without DP there is no query, and nothing changes.
    """
    metrics = output.metrics
    query = metrics.get("aggregator", {}).get("dp_query_metrics") if isinstance(metrics, Mapping) else None
    if not isinstance(query, Mapping) or "clipped_count" in query:
        return output
    if "clipped_count" not in metrics["client_work"]["groups"]:  # `MembersFactory`: its query clips, and counts
        return output
    query = collections.OrderedDict(query, clipped_count=metrics["client_work"]["groups"]["clipped_count"])
    aggregator = collections.OrderedDict(metrics["aggregator"], dp_query_metrics=query)
    return output._replace(metrics=collections.OrderedDict(metrics, aggregator=aggregator))
