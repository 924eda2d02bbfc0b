"""Builds each client's dataset inside its own client computation.

`tff.simulation.compose_dataset_computation_with_learning_process` maps the client ids
through the dataset computation, then maps the datasets through the algorithm's client
computation: two TensorFlow calls per client, and TFF's C++ executor serializes every
dataset between them (`DatasetToGraphV2` / `DatasetFromGraph`). Where clients are many
and small that boundary is a large part of a round (BENCHMARKS.md, W2).

`fuse_client_datasets` rewrites the composed `next` (in TFF's call-dominant form) so one
TensorFlow computation takes the broadcast model and the client id, builds the dataset
and runs the client work. Only the client-placed map is touched: the server logic,
aggregators (DP included) and state stay TFF's own, and the rewritten process gives the
same results as the composed one (tests/fusion_test.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow_federated as tff

_MAP = tff.framework.FEDERATED_MAP.uri
_ZIP = tff.framework.FEDERATED_ZIP_AT_CLIENTS.uri

Local = tuple[str, tff.framework.ComputationBuildingBlock]


class FusionError(ValueError):
    """The process does not have the shape `fuse_client_datasets` rewrites."""


def fuse_client_datasets(
    process: tff.learning.templates.LearningProcess, *, result_transform=None
) -> tff.learning.templates.LearningProcess:
    """`process` (`next` takes `{id}@CLIENTS`) with one TensorFlow call per client.

    Args:
      process: the result of `compose_dataset_computation_with_learning_process`.
      result_transform: optional `(client id, client work result) -> result`, applied
        in the same TensorFlow call: the one place where a client's id meets its
        result (the privacy audit's canaries replace their update here, before the
        aggregator sees it).

    Raises:
      FusionError: when `next` does not map the ids through one dataset computation
        whose datasets go, zipped with other client values (model, hyperparameters),
        into one client computation and nowhere else.
    """
    lam = tff.framework.to_call_dominant(process.next.to_building_block())
    block = lam.result
    if not isinstance(block, tff.framework.Block):
        raise FusionError(f"expected a block of locals, got {type(block).__name__}")
    locals_ = list(block.locals)

    dataset_name, dataset_map = _only(
        [(n, v) for n, v in locals_ if _is_call(v, _MAP) and lam.parameter_name in _reference_names(v.argument[1])],
        "map over the client ids",
    )
    zip_name, zipped = _only_user(locals_, block.result, dataset_name, "dataset")
    positions = (
        [i for i, value in enumerate(zipped.argument) if _is_ref(value, dataset_name)] if _is_call(zipped, _ZIP) else []
    )
    if len(positions) != 1:
        raise FusionError(f"the datasets go into {zipped.compact_representation()[:200]}, not a zip with the model")
    map_name, client_map = _only_user(locals_, block.result, zip_name, "zipped client input")
    if not _is_call(client_map, _MAP):
        raise FusionError(f"the zipped input goes into {client_map.compact_representation()[:200]}, not a map")

    (position,) = positions
    client_inputs = list(zipped.argument)
    client_inputs[position] = dataset_map.argument[1]  # the ids
    fused = _fused_computation(
        client_map.argument[0],
        dataset_map.argument[0],
        [value.type_signature.member for value in client_inputs],
        position,
        result_transform,
    )
    new_zip = _zip_at_clients(client_inputs)
    replaced = {
        zip_name: new_zip,
        map_name: _map(fused, tff.framework.Reference(zip_name, new_zip.type_signature)),
    }
    rewritten = [(n, replaced.get(n, v)) for n, v in locals_ if n != dataset_name]
    next_fn = tff.framework.ConcreteComputation(
        computation_proto=tff.framework.Lambda(
            lam.parameter_name, lam.parameter_type, tff.framework.Block(rewritten, block.result)
        ).proto,
        context_stack=tff.framework.get_context_stack(),
        annotated_type=process.next.type_signature,  # keeps the LearningProcessOutput container
    )
    return tff.learning.templates.LearningProcess(
        process.initialize,
        next_fn,
        process.get_model_weights,
        process.set_model_weights,
        get_hparams_fn=process.get_hparams,
        set_hparams_fn=process.set_hparams,
    )


def _fused_computation(
    client_comp, dataset_comp, input_types: list, position: int, result_transform=None
) -> tff.framework.CompiledComputation:
    """One TF graph: `client_comp(*inputs)` with `inputs[position] = dataset_comp(client_id)`."""
    client_fn = tff.framework.ConcreteComputation.from_building_block(client_comp)
    dataset_fn = tff.framework.ConcreteComputation.from_building_block(dataset_comp)

    @tff.tensorflow.computation(tff.StructType(input_types))
    def client_work_from_id(inputs):
        values = [inputs[i] for i in range(len(input_types))]
        client_id = values[position]
        values[position] = dataset_fn(client_id)
        result = client_fn(*values)
        return result if result_transform is None else result_transform(client_id, result)

    return client_work_from_id.to_building_block()


def _zip_at_clients(values: list) -> tff.framework.Call:
    arg = tff.framework.Struct(values)
    result = tff.FederatedType(tff.StructType([v.type_signature.member for v in values]), tff.CLIENTS)
    return tff.framework.Call(tff.framework.Intrinsic(_ZIP, tff.FunctionType(arg.type_signature, result)), arg)


def _map(fn, value) -> tff.framework.Call:
    arg = tff.framework.Struct([fn, value])
    result = tff.FederatedType(fn.type_signature.result, tff.CLIENTS)
    return tff.framework.Call(tff.framework.Intrinsic(_MAP, tff.FunctionType(arg.type_signature, result)), arg)


def _is_call(value, uri: str) -> bool:
    """`value` calls intrinsic `uri` on a struct of arguments."""
    return (
        isinstance(value, tff.framework.Call)
        and isinstance(value.function, tff.framework.Intrinsic)
        and value.function.uri == uri
        and isinstance(value.argument, tff.framework.Struct)
    )


def _is_ref(value, name: str) -> bool:
    return isinstance(value, tff.framework.Reference) and value.name == name


def _reference_names(value) -> set[str]:
    names = set()

    def visit(comp):
        if isinstance(comp, tff.framework.Reference):
            names.add(comp.name)
        return comp, False

    tff.framework.transform_postorder(value, visit)
    return names


def _only(matches: Sequence[Local], what: str) -> Local:
    if len(matches) != 1:
        raise FusionError(f"expected one {what} in `next`, found {len(matches)}")
    return matches[0]


def _only_user(locals_: Sequence[Local], result, name: str, what: str) -> Local:
    if name in _reference_names(result):
        raise FusionError(f"the {what} leaves `next` as part of its result")
    return _only([(n, v) for n, v in locals_ if name in _reference_names(v)], f"use of the {what}")
