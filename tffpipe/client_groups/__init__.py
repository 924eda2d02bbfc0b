"""Client groups: many real clients trained in one TensorFlow call (issue 21).

A round's sampled real-client ids are packed into groups (`pack`); one TFF client then
carries one group, `{str*}@CLIENTS`, a sequence of its members' ids. Sampling, the
privacy accounting and everything upstream stay per real client: a group is only how
the round's members are handed to TensorFlow, so the C++ executor pays its per-call
cost (dataset serialization, graph instantiation, dispatch) once per group instead of
once per client.

In the group's one call, `build_group_client_work` builds each member's dataset from
its id (the task's `serializable_dataset_fn`, the same pipeline and seeded shuffle as
the per-client path) and trains it with TFF's own functional client update
(`build_functional_model_delta_update`): the same steps and optimizer arithmetic, so a
member's update is bit-for-bit the one it would compute alone. The group returns:

* without DP (weighted by examples): the example-weighted mean of its members'
  updates and their total weight, which TFF's weighted `MeanFactory` then weights back:
  sum_g W_g (sum_{i in g} w_i u_i / W_g) / sum_g W_g = sum_i w_i u_i / sum_i w_i, the
  per-client mean up to float rounding;
* with fixed-clip DP: the sum of its members' updates, each clipped to L2 norm C
  **by itself** (`tf.clip_by_global_norm`, as TF Privacy clips), and the member count;
* with adaptive clipping, tree aggregation or zeroing: each member's own update,
  stacked `[K, ...]` with a mask of real members (`members`), since the clip lives in
  the aggregator's state and zeroing and the quantile count look at each update. The
  aggregator (`MembersFactory`) applies the per-client query's record preprocessing to
  each real member on its own with the round's clip and adds the results up
  (`GroupedQuery`); zeroing zeroes each member on its own first. Memory: K copies of
  the update per group, a few times over (`configs.member_group_limit` bounds K).

**Sensitivity, with DP.** Each mechanism is the per-client one, and the server adds its
noise to the same sum. Per client, TF Privacy preprocesses each real client's update u_i
into a record r(u_i) (params: this round's clip, fixed before the round's data is
read), the records are summed over the round's real clients, and noise is added to
sum_i r(u_i) once at the server; every sum query accumulates records by addition. A
group g hands the server S_g = sum_{i in g} r(u_i) (padding members add 0: masked, not
preprocessed), and sum_g S_g = sum_i r(u_i) whatever the packing: the noised value is
the same function of the real clients' data as per client, so the output distribution,
the DpEvent the query reports and the accountant's q = m/N over real clients (sampling
is per real client) are unchanged. Adding or removing one real client changes the sum
by one record r(u_i), per mechanism:

* fixed: r(u) = clip_C(u), norm <= C; noise N(0, (zC)^2) per coordinate: the Gaussian
  mechanism of multiplier z. Here the group clips its members in the client work and
  sends S_g itself, whose norm can reach |g|*C, so TFF's DP factory must not clip it
  again (that would shrink honest sums and change the result, though not the
  privacy): `build_factory` gives it `PreclippedGaussianSumQuery`, TF Privacy's
  Gaussian sum query with the identity as preprocessing, clip C and noise std zC.
* adaptive (Andrew et al. 2021): r(u) = (clip_C(u), 1[|u| <= C] - 1/2) with C the
  state's clip; the value part has norm <= C and noise z_v*C, the centred count
  |1/2| and noise sigma_b, the split of z TFF makes (`accounting.adaptive_noise_split`),
  as per client. A padding member would add -1/2 to the count: the mask keeps it out.
* tree (DP-FTRL, Kairouz et al. 2021): r(u) = clip_C(u), norm <= C, summed into the
  tree's leaf of the round, whose seeded noise does not depend on the records.
* zeroing: a member whose largest |coordinate| exceeds the bound is replaced by zeros
  before r, as TFF's `zeroing_factory` does per client; zeroing is data-dependent
  preprocessing of one client's update, so r(u) still has norm <= C.

Packing itself reads no data.

What runs grouped today: every registered model and every algorithm, without DP or
with fixed, adaptive or tree DP, with or without zeroing.

* Models: functional ones (`linear`, `mlp`) as they are; Keras-wrapped ones (`small_cnn`,
  `cnn`, `cifg_lstm`; `so_lstm` not tried) converted by `create_functional_model` with TFF's
  `functional_model_from_keras` (the same layers and loss on weight tensors, and the
  metrics `from_keras_model` reports, in its order). The keyboard pipeline's vocabulary
  table is initialized inside the members' loop (`in_loop`). Refused: models with
  non-trainable weights (BatchNormalization; `functional_obstacle`). `cnn`'s dropout
  draws unseeded masks on both paths, so its members are as random as its per-client
  runs (two of which differ by 1.2 relative), not copies of them.
* Algorithms: each member runs its algorithm's own TFF functional client update
  (`build_member_update`): FedAvg and the server optimizers (FedAvgM, FedAdam, FedYogi,
  FedAdagrad: only the finalizer differs), FedProx (the proximal gradient mu (w - w0)
  added to every step), FedSGD (the example-weighted mean gradient at the initial
  weights, without DP as per client).

Measured equal to the per-client rounds within 1e-5 relative (weights and metrics,
tests/client_groups_test.py): linear, mlp, small_cnn (FedAvg with fixed DP, FedSGD; one
round, since a second once differed by 2.6e-5 from weights ~1e-7 apart),
FedProx with fixed DP, cifg_lstm on the keyboard pipeline (with a group of one and a
member without examples); observed ~1e-7 (float rounding of the group's mean).

Everything else raises `GroupingError` naming why (distributed DP,
compression, secure aggregation); `configs` refuses those combinations with an explicit
`client_batching=K` and `auto` runs them per client, saying why in one note
(`auto_note`). With fixed-clip DP the per-member clipped count is in
`client_work/groups/clipped_count`, and `next` copies it where the per-client query
reports its own (`with_member_clipped_count`), so `diagnostic/clipped_fraction` counts
real clients on both paths; with `MembersFactory` the query counts them itself, as per
client. Distributed DP and secure aggregation run per client by design
(`configs.per_client_reason`: each device's own rounding, noise share, secure input).

Around a group, per real client as per client: the audit's canaries are members whose
update is replaced in the group's call before it is clipped (`replace_update`); the
device model chooses who reports before `next` (dropped and late devices are never
packed) and counts bytes per reporting device; over several workers TFF's mergeable
context splits the groups as it splits clients (a worker may get none) and merges the
partial sums. All three are tested against the per-client path.

The parts, one module each:

* `packing`: real-client ids into groups (`pack`), a group's types, `GroupingError`;
* `functional`: Keras-wrapped models converted to functional ones, and what prevents it;
* `members`: a group's client work, its members trained one after the other (the member loop);
* `batched`: members stepping together with K weight copies, and the Dense-stack forward pass;
* `shared`: members stepping together on the shared weights (low-rank corrections);
* `queries`: the grouped DP queries and the aggregator factory over groups;
* `grouped_process`: the learning process whose `next` takes real client ids;
* `process`: the builders of the grouped training process;
* `rules`: what `client_batching` decides (`auto`, model kinds, obstacles, memory limits).
"""

from tffpipe.client_groups.batched import create_dense_forward, dense_activations
from tffpipe.client_groups.functional import create_functional_model, functional_obstacle, initial_weights_of
from tffpipe.client_groups.grouped_process import GroupedLearningProcess
from tffpipe.client_groups.members import in_loop
from tffpipe.client_groups.packing import DatasetFn, GroupingError, pack
from tffpipe.client_groups.process import build_learning_process, build_training_process
from tffpipe.client_groups.queries import GroupedQuery, MembersFactory, PreclippedGaussianSumQuery, build_factory
from tffpipe.client_groups.rules import (
    AUTO_GROUPS,
    ONE_GROUP_PER_CORE,
    auto_groups,
    auto_note,
    check_model,
    group_size,
    model_kind,
    shared_obstacle,
)

__all__ = [
    "AUTO_GROUPS",
    "DatasetFn",
    "GroupedLearningProcess",
    "GroupedQuery",
    "GroupingError",
    "MembersFactory",
    "ONE_GROUP_PER_CORE",
    "PreclippedGaussianSumQuery",
    "auto_groups",
    "auto_note",
    "build_factory",
    "build_learning_process",
    "build_training_process",
    "check_model",
    "create_dense_forward",
    "create_functional_model",
    "dense_activations",
    "functional_obstacle",
    "group_size",
    "in_loop",
    "initial_weights_of",
    "model_kind",
    "pack",
    "shared_obstacle",
]
