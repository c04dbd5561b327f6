"""Network Dissection over a Broden dataset: the two passes, batched, bounded, distributed.

:func:`dissect` runs a model over a Broden-format dataset and labels every unit of one or more
layers (Bau et al. 2017; seed ``001_67e86decce6b6927.txt`` section 7.1.2). The math lives in
:mod:`cnnexplain.explain.dissect.tally`, :mod:`cnnexplain.explain.dissect.labels` and
:mod:`cnnexplain.explain.dissect.quantiles`; this module feeds it:

1. **Activations.** One forward pass records every requested layer (``layers.record`` hooks, so
   ``layer layer3,layer4`` costs one pass) and streams the maps ``[N, K, h, w]`` to the HDF5
   cache (:func:`cnnexplain.activations.compute_activations`; a private temporary file with
   ``no_cache``). A later run with the same model, data and preprocessing reads them back
   without a forward pass. Measured (benchmarks/bench_dissect.py, resnet18 layer4 at 224 px,
   2 CPU threads): storing and reading the maps back costs a fraction of a second forward pass
   (dissection at 0.84x the bare forward's images/s, 0.87x a forward that also reads the
   images; 0.90x at 10,000 images of 1,197 labels, bench_dissect_scale.py), recomputing costs a whole one (0.38-0.61x), so storing is the default;
   ``recompute=True`` runs the forward again instead (no disk, two forward passes; three with
   the sketch), for layers whose maps would fill the disk.
2. **Thresholds** (pass 1): per unit, the top-``q`` quantile over every image and position at
   feature resolution, exact (:class:`~cnnexplain.explain.dissect.quantiles.TopCandidates`) or
   with constant memory (:class:`~cnnexplain.explain.dissect.quantiles.RadixSketch`, one extra
   read), plus each unit's top images by maximum activation (their maps kept for the report).
3. **Tallies** (pass 2): the masks of each batch and the stored maps, through
   :func:`~cnnexplain.explain.dissect.tally.accumulate_tallies` on the chosen device.

**Views** (:data:`VARIANTS`): the same maps can be dissected several ways in the same passes,
each with its own thresholds, tallies and labels. ``positive`` is the paper's dissection;
``negative=True`` adds the units' lowest activations (dissecting ``-A``: its top-``q``
threshold is minus the bottom-``q`` quantile of ``A``, and ``-A > T`` is ``A < -T``), which
Network Dissection leaves out (seed ``001_67e86decce6b6927.txt`` section 7.1.4);
``rotate=SEED`` adds the layer after a random orthogonal change of its channel basis,
``A' = einsum("kj,bjhw->bkhw", Q, A)`` with ``Q`` from :func:`rotation_matrix`, Bau et al.
2017 section 3.2's test that interpretability is axis-aligned (the rotated layer is exactly as
discriminative, but has fewer unique detectors; seed ``001`` fig. 7.10). Every view is
thresholded, tallied and labelled exactly as the unrotated layer.

Memory is bounded whatever the number of images: one batch of maps and masks, the exact mode's
``[K, m]`` candidates (``m`` about ``q * N * h * w``; checked against ``max_exact_bytes`` before
anything runs) or the sketch's ``[K, 4096]`` histogram, the ``[K, NL]`` int64 tallies and the
``[K, top_images, h, w]`` maps of the top images, each once per view.

Distributed (``torchrun``): rank ``r`` of ``W`` takes a contiguous run of whole batches
(:func:`shard_range`), so every image is computed in the same batch as in a single process;
thresholds merge exactly (``all_gather`` of the top-``m`` candidates, or ``all_reduce`` of the
sketch's histograms), tallies and top images are reduced likewise, and every rank ends with
the single-process result (only rank 0 should write it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from cnnexplain.activations import compute_activations
from cnnexplain.config.dissect import DissectConfig
from cnnexplain.data.base import ImageDataset, make_loader
from cnnexplain.data.preprocessing import Preprocessing
from cnnexplain.errors import CnnexplainError, UsageError
from cnnexplain.explain.dissect.labels import (
    ConceptSpace,
    UnitLabels,
    activation_for,
    detector_summary,
    iou,
    label_units,
)
from cnnexplain.explain.dissect.quantiles import (
    RadixSketch,
    TopCandidates,
    check_finite,
    top_count,
)
from cnnexplain.explain.dissect.tally import QuadTable, Tally, accumulate_tallies
from cnnexplain.fingerprint import digest_parts
from cnnexplain.models.layers import ONE_BY_ONE_FIX, get_module, one_by_one, record
from cnnexplain.progress import silent
from cnnexplain.runtime import Dist

VARIANTS = {
    "positive": "each unit's highest activations, A_k > T_k (Bau et al. 2017)",
    "negative": "each unit's lowest activations, A_k < the bottom-quantile threshold (the maps "
                "negated: -A_k > T_k)",
    "rotated": "the layer's channels after a seeded random orthogonal rotation, "
               "A' = Q A (Bau et al. 2017 section 3.2)",
}
"""The views :func:`dissect` computes (``positive`` always; the others with ``negative`` and
``rotate``); module docstring."""

QUANTILE_MODES = {
    "exact": "each unit's top-m values (m ~ q x images x h x w), exact, memory O(q N h w K)",
    "sketch": "two-pass radix histogram, constant memory, error bounded by the final bucket's "
              "count",
}
"""How the thresholds are found, per ``quantile_mode`` (declared in
:mod:`cnnexplain.config.dissect`)."""


@dataclass(frozen=True)
class LayerPlan:
    """A layer's units ``K`` and feature size ``(h, w)``, from a probe forward pass."""

    layer: str
    units: int
    feature_size: tuple[int, int]


@dataclass
class TopImages:
    """Per unit, the images with the largest maximum activation: ``values`` float32 ``[K, N]``
    (descending; -inf for empty slots), ``index`` int64 ``[K, N]`` dataset positions (-1
    empty), ``maps`` float32 ``[K, N, h, w]`` the unit's map on that image."""

    values: torch.Tensor
    index: torch.Tensor
    maps: torch.Tensor

    @classmethod
    def empty(cls, units: int, n: int, size: tuple[int, int], device) -> "TopImages":
        return cls(torch.full((units, n), -math.inf, device=device),
                   torch.full((units, n), -1, dtype=torch.int64, device=device),
                   torch.zeros(units, n, *size, device=device))

    def update(self, values: torch.Tensor, index: torch.Tensor, maps: torch.Tensor) -> None:
        """Fold in candidates ``values [K, B]``, ``index [K, B]``, ``maps [K, B, h, w]``; ties
        in value go to the lower image index (so the result does not depend on the order)."""
        n = self.values.shape[1]
        if n == 0:
            return
        v = torch.cat([self.values, values.to(self.values)], dim=1)
        i = torch.cat([self.index, index.to(self.index)], dim=1)
        m = torch.cat([self.maps, maps.to(self.maps)], dim=1)
        big = torch.where(i < 0, torch.full_like(i, torch.iinfo(torch.int64).max), i)
        o1 = torch.argsort(big, dim=1, stable=True)
        o2 = torch.argsort(-v.gather(1, o1), dim=1, stable=True)
        order = o1.gather(1, o2)[:, :n]
        self.values = v.gather(1, order)
        self.index = i.gather(1, order)
        self.maps = m[torch.arange(m.shape[0], device=m.device)[:, None], order]


@dataclass
class LayerResult:
    """Everything dissection found for one layer (arrays on the CPU, numpy)."""

    layer: str
    units: int
    feature_size: tuple[int, int]
    thresholds: np.ndarray                 # float64 [K], of the view's maps (-A: negative)
    tally: dict                            # Tally.numpy(): int64 counts
    iou: np.ndarray                        # float64 [K, NL] in the configured mode
    labels: UnitLabels
    top_values: np.ndarray                 # float32 [K, N]
    top_index: np.ndarray                  # int64 [K, N]
    top_maps: np.ndarray                   # float32 [K, N, h, w]
    quantile_info: dict = field(default_factory=dict)

    def summary_rows(self, categories, threshold: float) -> list[dict]:
        return detector_summary(self.labels, categories, threshold)


@dataclass
class DissectionResult:
    """The result of :func:`dissect`: per-layer results in the order the layers were given
    (``layers``: the positive view); ``variants``: the other views of :data:`VARIANTS` that
    ran, ``{"negative" | "rotated": {layer: LayerResult}}``; ``rotations``: ``{layer: Q}``
    float64 ``[K, K]``, the rotation of each rotated layer."""

    layers: dict[str, LayerResult]
    space: ConceptSpace
    config: DissectConfig
    n_images: int
    image_size: tuple[int, int]
    mask_size: tuple[int, int]
    variants: dict[str, dict[str, LayerResult]] = field(default_factory=dict)
    rotations: dict[str, np.ndarray] = field(default_factory=dict)

    def view(self, variant: str = "positive") -> dict[str, LayerResult]:
        """The per-layer results of one view (``positive``, ``negative`` or ``rotated``)."""
        return self.layers if variant == "positive" else self.variants[variant]

    def summary(self, variant: str = "positive") -> dict:
        """JSON-able headline counts per layer (units, detectors, unique concepts, by
        category) of one view."""
        out = {}
        for name, lr in self.view(variant).items():
            rows = lr.summary_rows(self.space.categories, self.config.iou_threshold)
            total = rows[-1]
            out[name] = {"units": lr.units, "detectors": total["detector_units"],
                         "unique_concepts": total["unique_concepts"],
                         "by_category": {r["category"]: {"detector_units": r["detector_units"],
                                                         "unique_concepts": r["unique_concepts"]}
                                         for r in rows[:-1]}}
        return out


# ---------------------------------------------------------------------------------------------
# Planning and validation
# ---------------------------------------------------------------------------------------------


def require_broden(dataset) -> None:
    for attr in ("categories", "label_names", "category_of", "mask_size"):
        if not hasattr(dataset, attr):
            raise UsageError(f"dissection needs a Broden-format dataset, got "
                             f"{getattr(dataset, 'spec', type(dataset).__name__)}",
                             "pass `broden` PATH (or `dataset` broden:PATH)")


def plan_layers(model: nn.Module, layers: Sequence[str], dataset, preprocessing: Preprocessing,
                device: torch.device | str) -> dict[str, LayerPlan]:
    """Check that every layer exists and outputs spatial maps ``[B, K, h, w]`` (one probe image
    through the model); their units and feature sizes."""
    if not layers:
        raise UsageError("no layer to dissect", "pass `layer` NAME, e.g. layer4")
    for layer in layers:
        get_module(model, layer)
    dupes = sorted({x for x in layers if list(layers).count(x) > 1})
    if dupes:
        raise UsageError(f"`layer` lists {dupes[0]!r} twice", "list each layer once")
    if len(dataset) == 0:
        raise CnnexplainError("the Broden dataset has no images (after `limit`/`categories`)",
                              "check `categories` and `limit`")
    image = preprocessing.normalize(_item(dataset, 0, ("image",))["image"][None].float())
    acts = _probe(model, list(layers), image, device)
    plans = {}
    for layer in layers:
        a = acts.get(layer)
        if a is None:
            raise UsageError(f"layer {layer!r} did not run in the forward pass",
                             "choose a layer the model uses (see `cnnexplain layers`)")
        if a.dim() != 4:
            raise UsageError(f"layer {layer!r} outputs shape {list(a.shape)}, not channel maps "
                             "[B, K, h, w], so it has no units to dissect",
                             "choose a convolutional layer, e.g. layer4 or features")
        if a.shape[2] * a.shape[3] == 1:
            raise UsageError(one_by_one(layer, tuple(image.shape[-2:]), "dissection"),
                             ONE_BY_ONE_FIX)
        plans[layer] = LayerPlan(layer, int(a.shape[1]), (int(a.shape[2]), int(a.shape[3])))
    return plans


def _probe(model: nn.Module, layers: list[str], image: torch.Tensor, device) -> dict:
    """The layers' outputs for one image: shapes only, on the ``meta`` device (no arithmetic),
    falling back to a real forward pass on ``device`` for models that meta tensors cannot run
    (data-dependent Python control flow)."""
    was = model.training
    model.eval()
    try:
        try:
            state = {name: torch.empty_like(t, device="meta") for name, t in
                     [*model.named_parameters(), *model.named_buffers()]}
            with torch.no_grad(), record(model, layers) as acts:
                torch.func.functional_call(model, state, (image.to("meta"),))
            return dict(acts)
        except Exception:  # noqa: BLE001 - any failure on meta means: run it for real
            with torch.no_grad(), record(model, layers) as acts:
                model(image.to(device))
            return dict(acts)
    finally:
        model.train(was)


def exact_bytes(plans: dict[str, LayerPlan], n_images: int, q: float, views: int = 1) -> int:
    """Peak bytes of the exact mode's candidate buffers (about ``(3 m + 8192) K`` float32 per
    layer and view: the kept top ``m``, the buffer before a cut, and ``topk``'s output)."""
    total = 0
    for p in plans.values():
        m = top_count(n_images * p.feature_size[0] * p.feature_size[1], q)
        total += (3 * m + 8192) * p.units * 4
    return total * views


def view_names(config: DissectConfig, rotations: dict | None = None) -> list[str]:
    """The views of :data:`VARIANTS` a dissection with ``config`` computes, in order."""
    return (["positive"] + (["negative"] if config.negative else [])
            + (["rotated"] if config.rotate is not None or rotations else []))


def check_memory(plans: dict[str, LayerPlan], n_images: int, config: DissectConfig,
                 views: int | None = None) -> None:
    """One-line error when the exact thresholds of every layer and view (``views``; default:
    :func:`view_names`) would exceed ``max_exact_bytes``."""
    if config.quantile_mode != "exact":
        return
    views = len(view_names(config)) if views is None else views
    need = exact_bytes(plans, n_images, config.quantile, views)
    if need > config.max_exact_bytes:
        raise UsageError(f"exact thresholds would hold {need / 2**30:.1f} GiB of candidates "
                         f"({n_images} images, `quantile` {config.quantile})",
                         "pass `quantile_mode` sketch (constant memory), or lower `limit`")


def shard_range(n: int, batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s images ``[start, stop)``: a contiguous run of whole batches of
    ``batch_size`` (the last batch may be short), as even as possible across ``world`` ranks."""
    nb = -(-n // batch_size)
    b0, b1 = rank * nb // world, (rank + 1) * nb // world
    return min(n, b0 * batch_size), min(n, b1 * batch_size)


FORWARD_FIELDS = ("image", "label")
"""What the activation pass reads of an item."""
LABEL_FIELDS = ("masks", "image_labels")
"""What the tally pass reads of an item (the maps come from the store)."""


def _item(dataset, i: int, fields: Sequence[str]) -> dict:
    """``dataset.item(i, fields)`` where the dataset has it (:class:`ImageDataset`), else the
    ``fields`` of ``dataset[i]``."""
    if hasattr(dataset, "item"):
        return dataset.item(i, fields)
    full = dataset[i]
    return {name: full[name] for name in fields}


class _Shard(ImageDataset):
    """Rows ``[start, stop)`` of a dataset, with a fingerprint of its own (cache keys); its
    items hold only :data:`FORWARD_FIELDS` (what the activation pass reads), so no mask is
    decoded for the forward pass."""

    def __init__(self, base, start: int, stop: int):
        self.base, self.start, self.stop = base, int(start), int(stop)
        self.preprocessing = getattr(base, "preprocessing", Preprocessing())
        self.class_names = list(getattr(base, "class_names", []))
        whole = self.start == 0 and self.stop == len(base)
        self.spec = getattr(base, "spec", "") + ("" if whole else f"[{start}:{stop}]")
        self._whole = whole

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> dict:
        return self.item(i, FORWARD_FIELDS)

    def item(self, i: int, fields: Sequence[str]) -> dict:
        return _item(self.base, self.start + int(i), fields)

    def fingerprint(self) -> str:
        fp = self.base.fingerprint()
        return fp if self._whole else digest_parts(fp, "rows", self.start, self.stop)


class _Fields(torch.utils.data.Dataset):
    """A dataset's items with only ``fields`` (the tally pass needs only the labels, since the
    maps come from the store, and a recomputing pass adds the image), so no batch decodes or
    stacks what it does not use."""

    def __init__(self, base, fields: Sequence[str]):
        self.base, self.fields = base, tuple(fields)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        return _item(self.base, i, self.fields)


# ---------------------------------------------------------------------------------------------
# Views: negated and rotated maps
# ---------------------------------------------------------------------------------------------


def rotation_matrix(units: int, seed: int) -> torch.Tensor:
    """float64 ``[K, K]`` random orthogonal matrix for the rotation control of Bau et al. 2017
    (section 3.2): ``G = Q R`` the QR decomposition of a standard Gaussian ``K x K`` matrix
    drawn from a CPU generator seeded with ``seed``, and each column of ``Q`` multiplied by the
    sign of ``R``'s diagonal entry (a zero counts as +1), which makes ``Q`` Haar-distributed
    on the orthogonal group and unique given ``G`` (Mezzadri 2007). Same ``seed`` and ``K``,
    same ``Q``."""
    if units < 1:
        raise ValueError("a rotation needs at least one channel")
    gen = torch.Generator().manual_seed(int(seed))
    g = torch.randn(units, units, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    sign = torch.sign(torch.diagonal(r))
    return q * torch.where(sign == 0, torch.ones_like(sign), sign)[None, :]


def rotate_maps(maps: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """``A' = einsum("kj,bjhw->bkhw", Q, A)``: maps ``[B, K, h, w]`` in the channel basis
    rotated by ``rotation`` ``Q`` ``[K, K]`` (computed in the maps' dtype and device; ``Q = I``
    gives the maps back exactly)."""
    return torch.einsum("kj,bjhw->bkhw", rotation.to(maps), maps)


@dataclass(frozen=True)
class View:
    """How one layer's maps ``[B, K, h, w]`` are read before thresholding, for view
    ``variant`` of :data:`VARIANTS`: unchanged, negated, or rotated by ``rotation`` ``[K, K]``
    (float32, on the device)."""

    variant: str
    layer: str
    rotation: torch.Tensor | None = None

    def __call__(self, maps: torch.Tensor) -> torch.Tensor:
        if self.variant == "negative":
            return -maps
        if self.rotation is not None:
            return rotate_maps(maps, self.rotation)
        return maps


def make_views(config: DissectConfig, plans: dict[str, LayerPlan], device,
               rotations: dict[str, torch.Tensor] | None = None
               ) -> tuple[dict[tuple[str, str], View], dict[str, np.ndarray]]:
    """Every ``(variant, layer)`` to dissect (:func:`view_names`) and the float64 ``[K, K]``
    rotation of each rotated layer: ``rotations[layer]`` where given (e.g. the identity),
    else :func:`rotation_matrix` ``(K, rotate)``."""
    rotations = dict(rotations or {})
    unknown = sorted(set(rotations) - set(plans))
    if unknown:
        raise UsageError(f"a rotation is given for layer {unknown[0]!r}, which is not dissected",
                         "give rotations only for the layers in `layer`")
    views: dict[tuple[str, str], View] = {}
    used: dict[str, np.ndarray] = {}
    for variant in view_names(config, rotations):
        for layer, p in plans.items():
            rot = None
            if variant == "rotated":
                if layer in rotations:
                    q = torch.as_tensor(rotations[layer], dtype=torch.float64).cpu()
                    if tuple(q.shape) != (p.units, p.units):
                        raise UsageError(f"the rotation of layer {layer!r} has shape "
                                         f"{list(q.shape)}, not [{p.units}, {p.units}]",
                                         "give a K x K matrix for a layer of K units")
                elif config.rotate is not None:
                    q = rotation_matrix(p.units, config.rotate)
                else:
                    continue
                used[layer] = q.numpy()
                rot = q.to(device=device, dtype=torch.float32)
            views[(variant, layer)] = View(variant, layer, rot)
    return views, used


# ---------------------------------------------------------------------------------------------
# Activation sources
# ---------------------------------------------------------------------------------------------


class _Stored:
    """Maps read back from an :class:`~cnnexplain.activations.ActivationSet`."""

    def __init__(self, acts, layers, batch_size: int, device):
        self.acts, self.layers = acts, list(layers)
        self.batch_size, self.device = batch_size, device

    def blocks(self) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        gens = [self.acts.chunks(layer, self.batch_size) for layer in self.layers]
        for parts in zip(*gens):
            start = parts[0][0]
            yield start, {layer: torch.from_numpy(block).to(self.device)
                          for layer, (_, block) in zip(self.layers, parts)}


class _Forward:
    """Maps recomputed by a forward pass per batch (``recompute=True``)."""

    def __init__(self, model, layers, dataset, preprocessing, batch_size, workers, device):
        self.model, self.layers, self.dataset = model, list(layers), dataset
        self.preprocessing, self.batch_size, self.workers = preprocessing, batch_size, workers
        self.device = device

    def batches(self, fields: Sequence[str] = FORWARD_FIELDS
                ) -> Iterator[tuple[int, dict, dict[str, torch.Tensor]]]:
        """``(start row, batch of ``fields``, maps per layer)`` per batch."""
        loader = make_loader(_Fields(self.dataset, fields), batch_size=self.batch_size,
                             workers=self.workers)
        was = self.model.training
        self.model.eval()
        try:
            start = 0
            with torch.no_grad(), record(self.model, self.layers) as acts:
                for batch in loader:
                    self.model(self.preprocessing.normalize(batch["image"].to(self.device).float()))
                    yield start, batch, {layer: acts[layer].float() for layer in self.layers}
                    start += batch["image"].shape[0]
        finally:
            self.model.train(was)

    def blocks(self) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        for start, _, maps in self.batches():
            yield start, maps


def _tally_batches(source, shard, layers, batch_size, workers, device
                   ) -> Iterator[tuple[dict, dict[str, torch.Tensor]]]:
    """(dataset batch with masks, maps per layer), aligned, for the tally pass."""
    if isinstance(source, _Forward):
        for _, batch, maps in source.batches(FORWARD_FIELDS + LABEL_FIELDS):
            yield batch, maps
        return
    loader = make_loader(_Fields(shard, LABEL_FIELDS), batch_size=batch_size, workers=workers)
    blocks = source.blocks()
    for batch in loader:
        _, maps = next(blocks)
        yield batch, maps


# ---------------------------------------------------------------------------------------------
# Collectives (no-ops in a single process)
# ---------------------------------------------------------------------------------------------


def _all_reduce(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.enabled:
        import torch.distributed as td

        td.all_reduce(t, op=td.ReduceOp.SUM)
    return t


def _all_gather(t: torch.Tensor, dist: Dist) -> list[torch.Tensor]:
    if not dist.enabled:
        return [t]
    import torch.distributed as td

    out = [torch.empty_like(t) for _ in range(dist.world_size)]
    td.all_gather(out, t.contiguous())
    return out


def _raise_on_any_rank(failure: CnnexplainError | None, dist: Dist) -> None:
    """Raise ``failure`` here, and on every other rank too (instead of leaving them waiting in
    the next collective)."""
    if dist.enabled:
        flag = torch.tensor([0 if failure is None else 1], dtype=torch.int64)
        import torch.distributed as td

        if td.get_backend() == "nccl":
            flag = flag.cuda()
        _all_reduce(flag, dist)
        if failure is None and int(flag.item()):
            failure = CnnexplainError("another torchrun rank found NaN or infinite activations",
                                      "see that rank's error; check the model and `mean`/`std`")
    if failure is not None:
        raise failure


# ---------------------------------------------------------------------------------------------
# The dissection
# ---------------------------------------------------------------------------------------------


def dissect(model: nn.Module, layers: Sequence[str], dataset, *, preprocessing: Preprocessing,
            config: DissectConfig = DissectConfig(), device: torch.device | str = "cpu",
            model_fingerprint: str = "", cache=None, progress=None, dist: Dist = Dist(),
            plans: dict[str, LayerPlan] | None = None,
            rotations: dict[str, np.ndarray | torch.Tensor] | None = None) -> DissectionResult:
    """Dissect ``layers`` of ``model`` (on ``device``, run in eval mode) over a Broden
    ``dataset`` (module docstring). ``model_fingerprint`` keys the activation cache
    (:class:`~cnnexplain.cache.Cache` or None for a private temporary file); ``progress`` is a
    :class:`~cnnexplain.progress.ProgressFactory`; ``dist`` the torchrun membership;
    ``rotations`` ``{layer: Q [K, K]}`` orthogonal bases for the ``rotated`` view instead of
    the seeded ones (it then runs for those layers even without ``rotate``).
    Returns the same :class:`DissectionResult` on every rank."""
    config = config.validate()
    require_broden(dataset)
    layers = list(layers)
    device = torch.device(device)
    progress = progress or silent()
    plans = plans or plan_layers(model, layers, dataset, preprocessing, device)
    n = len(dataset)
    views, used_rotations = make_views(config, plans, device, rotations)
    check_memory(plans, n, config, len({v for v, _ in views}))
    space = ConceptSpace.from_dataset(dataset)
    label_category = torch.as_tensor(space.label_category, device=device)
    ncat = len(space.categories)
    start, stop = shard_range(n, config.batch_size, dist.rank, dist.world_size)
    shard = _Shard(dataset, start, stop)

    source = None
    if len(shard):
        if config.recompute:
            source = _Forward(model, layers, shard, preprocessing, config.batch_size,
                              config.workers, device)
        else:
            acts = compute_activations(model, layers, shard, model_fingerprint=model_fingerprint,
                                       preprocessing=preprocessing, device=device,
                                       batch_size=config.batch_size, cache=cache,
                                       progress=progress, workers=config.workers)
            source = _Stored(acts, layers, config.batch_size, device)

    # -- pass 1: thresholds and top images, per (view, layer) ----------------------------------
    totals = {layer: n * p.feature_size[0] * p.feature_size[1] for layer, p in plans.items()}
    size = {key: plans[key[1]] for key in views}
    top = {key: TopImages.empty(p.units, config.top_images, p.feature_size, device)
           for key, p in size.items()}
    if config.quantile_mode == "exact":
        est = {key: TopCandidates(p.units, top_count(totals[key[1]], config.quantile), device)
               for key, p in size.items()}
        rounds = 1
    else:
        est = {key: RadixSketch(p.units, totals[key[1]], config.quantile, device)
               for key, p in size.items()}
        rounds = 2
    for r in range(rounds):
        what = "thresholds" if rounds == 1 else f"thresholds (sketch pass {r + 1}/{rounds})"
        failure = None
        with progress(total=len(shard), description=f"pass 1/2: {what}") as bar:
            for s, maps in (source.blocks() if source is not None else ()):
                if r == 0:
                    try:
                        for layer, a in maps.items():
                            check_finite(a, f"layer {layer}")
                    except CnnexplainError as exc:
                        failure = exc
                        break
                for key, view in views.items():
                    a = view(maps[view.layer])
                    k = a.shape[1]
                    if r == 0:
                        if view.rotation is not None:
                            try:
                                check_finite(a, f"layer {view.layer} (rotated)")
                            except CnnexplainError as exc:
                                failure = exc
                                break
                        if config.top_images:
                            idx = torch.arange(start + s, start + s + a.shape[0], device=device)
                            top[key].update(a.amax(dim=(2, 3)).t(),
                                            idx[None, :].expand(k, -1), a.transpose(0, 1))
                    est[key].update(a.transpose(0, 1).reshape(k, -1))
                if failure is not None:
                    break
                bar.advance(next(iter(maps.values())).shape[0])
        _raise_on_any_rank(failure, dist)
        if config.quantile_mode == "sketch":
            for key in views:
                _all_reduce(est[key].counts, dist)  # in place: every rank's histogram
                est[key].finish_pass()
    thresholds, qinfo = {}, {}
    for key, p in size.items():
        total = totals[key[1]]
        if config.quantile_mode == "exact":
            cand = est[key].candidates()
            m = est[key].m
            if dist.enabled:
                pad = torch.full((p.units, m), -math.inf, device=device)
                pad[:, :cand.shape[1]] = cand
                est[key] = TopCandidates(p.units, m, device)
                est[key].merge(_all_gather(pad, dist))
            thresholds[key] = est[key].thresholds(total, config.quantile)
            qinfo[key] = {"mode": "exact", "values_per_unit": total, "top_m": m}
        else:
            thresholds[key] = est[key].thresholds()
            qinfo[key] = {"mode": "sketch", "values_per_unit": total,
                          "rank_error": est[key].rank_error}
        if dist.enabled and config.top_images:
            t = top[key]
            merged = TopImages.empty(p.units, config.top_images, p.feature_size, device)
            for v, i, mp in zip(_all_gather(t.values, dist), _all_gather(t.index, dist),
                                _all_gather(t.maps, dist)):
                merged.update(v, i, mp)
            top[key] = merged

    # -- pass 2: tallies ------------------------------------------------------------------------
    sh, sw = dataset.mask_size
    tallies = {key: Tally.zeros(p.units, space.size, ncat, device) for key, p in size.items()}
    quads = {layer: (QuadTable.build(p.feature_size[0], sh, device),
                     QuadTable.build(p.feature_size[1], sw, device))
             for layer, p in plans.items()}
    thr_t = {key: torch.as_tensor(thresholds[key], dtype=torch.float64, device=device)
             for key in views}
    with progress(total=len(shard), description="pass 2/2: tally") as bar:
        if source is not None:
            for batch, maps in _tally_batches(source, shard, layers, config.batch_size,
                                              config.workers, device):
                masks = batch["masks"].to(device)
                image_labels = batch["image_labels"].to(device)
                for key, view in views.items():
                    accumulate_tallies(view(maps[view.layer]).float(), thr_t[key], masks,
                                       image_labels, label_category, tallies[key],
                                       quads[view.layer])
                bar.advance(masks.shape[0])
    results: dict[str, dict[str, LayerResult]] = {}
    for key, p in size.items():
        variant, layer = key
        t = tallies[key]
        if dist.enabled:
            t.load_flat(_all_reduce(t.flat(), dist))
        counts = t.numpy()
        matrix = iou(counts["intersection"], counts["truth"],
                     activation_for(counts, config.iou_mode), space.label_category)
        labels = label_units(matrix, space.label_category, ncat)
        tp = top[key]
        results.setdefault(variant, {})[layer] = LayerResult(
            layer=layer, units=p.units, feature_size=p.feature_size,
            thresholds=np.asarray(thresholds[key], dtype=np.float64), tally=counts, iou=matrix,
            labels=labels, top_values=tp.values.cpu().numpy(), top_index=tp.index.cpu().numpy(),
            top_maps=tp.maps.cpu().numpy(), quantile_info=qinfo[key])
    positive = results.pop("positive")
    return DissectionResult(layers=positive, space=space, config=config, n_images=n,
                            image_size=tuple(getattr(dataset, "image_size", (0, 0))),
                            mask_size=(sh, sw), variants=results, rotations=used_rotations)


def silent_layers(result: DissectionResult, variant: str = "negative") -> list[str]:
    """The layers of one view where no unit's mask is ever on (every ``activation`` count 0).
    For ``negative``: every unit's minimum fills at least its bottom ``quantile`` of positions,
    so the threshold is that minimum and nothing lies strictly below it (after a ReLU the
    minimum is 0)."""
    return [layer for layer, lr in result.variants.get(variant, {}).items()
            if not lr.tally["activation"].any()]


def image_loader(dataset) -> Callable[[int], torch.Tensor]:
    """``load(i) -> (float32 [3, H, W] in [0, 1], int [L, h, w] label maps or None)``: image
    ``i`` of the dataset and its pixel labels (for the report's top-image strips, which draw
    the unit's mask and its concept's outline)."""

    def load(i):
        item = dataset[int(i)]
        return item["image"], item.get("masks")

    return load
