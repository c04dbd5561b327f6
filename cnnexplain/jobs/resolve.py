"""One place that turns model, data and preprocessing options into what a job computes on.

Given ``checkpoint``, the dataset, its val fraction and the preprocessing default to the ones
the checkpoint records (a model trained on an ImageFolder is evaluated on that ImageFolder, not
on the synthetic world); explicit options override them. Given ``backbone``, the dataset
defaults to the synthetic world and the head has as many classes as the dataset. The layer is
the option's, else the checkpoint's gated layer, else the backbone's default layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cnnexplain.config.common import DataOptions, FileOptions, ModelOptions, PrepOptions
from cnnexplain.config.fields import parse_triplet
from cnnexplain.errors import UsageError, close_matches

DEFAULT_DATASET = "synthetic"
DEFAULT_VAL_FRACTION = 0.1


def preprocessing(prep: PrepOptions, recorded=None):
    """The run's :class:`~cnnexplain.data.preprocessing.Preprocessing`: ``resize`` / ``mean`` /
    ``std`` override the recorded one (a checkpoint's), else the defaults."""
    from cnnexplain.data.preprocessing import Preprocessing

    base = recorded or Preprocessing()
    return base.replace(resize=prep.resize, mean=parse_triplet(prep.mean),
                        std=parse_triplet(prep.std))


def file_policy(files: FileOptions | None):
    """The run's :class:`~cnnexplain.data.files.FilePolicy` (symlinks, decoding limit) from its
    ``files`` options (None: the defaults)."""
    from cnnexplain.data.files import FilePolicy

    return FilePolicy.of(files)


def load_recorded(model: ModelOptions):
    """The checkpoint (None for a backbone), read once."""
    if model.checkpoint is None:
        return None
    from cnnexplain.models.checkpoint import load_checkpoint

    return load_checkpoint(model.checkpoint)


def dataset_spec(data: DataOptions | None, meta: dict) -> str:
    """``dataset`` if given, else the checkpoint's training data, else the synthetic world."""
    given = getattr(data, "dataset", None)
    if given:
        return given
    return (meta.get("data") or {}).get("spec") or DEFAULT_DATASET


def val_fraction(data: DataOptions | None, meta: dict) -> float:
    given = getattr(data, "val_fraction", None)
    if given is not None:
        return float(given)
    return float((meta.get("training") or {}).get("val_fraction") or DEFAULT_VAL_FRACTION)


def gate_layer(meta: dict) -> str | None:
    """The layer a gated checkpoint gates (None for an ungated model)."""
    g = meta.get("gate") or {}
    return g.get("layer") or (meta.get("layer") if g else None)


@dataclass
class Resolved:
    """A job's model, data, preprocessing and layer.

    ``loaded``: :class:`~cnnexplain.models.loading.LoadedModel` (eval mode, on the device, with
    ``preprocessing`` set); ``data``: the opened split (None when not asked for);
    ``layer``: the layer to explain / measure; ``gate_layer``: the checkpoint's gated layer or
    None; ``spec``: the dataset spec used."""

    loaded: Any
    preprocessing: Any
    layer: str
    gate_layer: str | None = None
    data: Any = None
    spec: str | None = None
    val_fraction: float = DEFAULT_VAL_FRACTION

    @property
    def class_names(self) -> list[str] | None:
        names = self.loaded.class_names or list(getattr(self.data, "class_names", []) or [])
        return names or None


def resolve(model: ModelOptions, prep: PrepOptions, data: DataOptions | None = None, *,
            device="cpu", seed: int = 0, keep_size: bool = False,
            several_layers: bool = False, input_side: int | None = None,
            files=None) -> Resolved:
    """Load the model and open the data the options name (see the module docstring).

    ``data``: the split to open (None: the job reads its own inputs, e.g. image files);
    ``keep_size``: ignore a recorded resize (Broden images keep their size unless ``resize``
    is given); ``several_layers``: ``model.layer`` is a comma-separated list the job checks
    itself (``layer`` is then the default layer); ``input_side``: the side of the job's own
    inputs, for a backbone's default stem (else the dataset's, or ``resize``); ``files``: the
    :class:`~cnnexplain.data.files.FilePolicy` the data is read with (None: the defaults)."""
    from cnnexplain.data.datasets import open_dataset
    from cnnexplain.data.preprocessing import Preprocessing
    from cnnexplain.models.loading import load_model

    if model.checkpoint is None and model.backbone is None:
        raise UsageError("no model given", "pass `checkpoint=PATH` or `backbone=NAME`")
    ck = load_recorded(model)
    meta = ck.meta if ck is not None else {}
    spec = dataset_spec(data, meta)
    fraction = val_fraction(data, meta)
    split = getattr(data, "split", "test")
    limit = getattr(data, "limit", None)
    recorded = Preprocessing.from_dict(meta.get("preprocessing")) if meta else None
    if recorded is not None and keep_size:
        recorded = Preprocessing(resize=None, mean=recorded.mean, std=recorded.std)
    prep_ = preprocessing(prep, recorded)
    dataset = None
    class_names = None
    if model.checkpoint is None and data is not None:
        # a backbone's head is sized by the dataset's classes
        dataset = open_dataset(spec, split, prep_, limit=limit, seed=seed, val_fraction=fraction,
                               files=files)
        class_names = list(getattr(dataset, "class_names", []) or []) or None
    side = prep_.resize or input_side
    if side is None and model.checkpoint is None and dataset is not None and len(dataset):
        first = dataset[0]["image"]
        side = min(int(first.shape[-2]), int(first.shape[-1]))
    loaded = load_model(checkpoint=ck, backbone=model.backbone,
                        num_classes=model.num_classes, weights=model.weights, device=device,
                        layer=None if several_layers else model.layer, class_names=class_names,
                        default_num_classes=len(class_names) if class_names else 10,
                        preprocessing=prep_, stem=getattr(model, "stem", None),
                        input_side=side)
    if dataset is None and data is not None:
        dataset = open_dataset(spec, split, prep_, limit=limit, seed=seed, val_fraction=fraction,
                               files=files)
    return Resolved(loaded=loaded, preprocessing=prep_, layer=loaded.layer,
                    gate_layer=gate_layer(meta), data=dataset, spec=spec, val_fraction=fraction)


def resolve_classes(targets: list[str], class_names: list[str] | None, num_classes: int,
                    name: str = "target") -> list[tuple[int, str]]:
    """Class names or indices -> ``[(index, name)]`` in order, without duplicates; a one-line
    UsageError with close matches for an unknown name or an index out of range (``name``: the
    option's field, for the message)."""
    names = list(class_names or [])
    out = []
    for t in targets:
        if t.lstrip("-").isdigit():
            i = int(t)
            if not 0 <= i < num_classes:
                raise UsageError(f"`{name}` {t} is out of range: the model has {num_classes} "
                                 "classes", f"pass an index in 0..{num_classes - 1}"
                                 + (f" or a name ({', '.join(names[:8])})" if names else ""))
            out.append((i, names[i] if i < len(names) else str(i)))
        elif t in names:
            i = names.index(t)
            if i >= num_classes:
                raise UsageError(f"`{name}` {t!r} is class {i}, but the model has {num_classes} "
                                 "classes", "check the model and the dataset belong together")
            out.append((i, t))
        else:
            known = ", ".join(names[:10]) if names else "none: pass an index"
            raise UsageError(f"unknown `{name}` {t!r}{close_matches(t, names)}",
                             f"pass a class index or one of the class names ({known})")
    return list(dict.fromkeys(out))
