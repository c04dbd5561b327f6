"""A trained gate in the HDF5 cache (kind ``gate``): its matrix and class clusters, keyed by the
model's fingerprint, layer, method and training config."""

from __future__ import annotations


def gate_cache_parts(model_fingerprint: str, layer: str, method: str, config: dict) -> dict:
    """Cache key parts of a trained gate (kind ``gate``)."""
    from cnnexplain.training.loop import RESUME_IGNORED

    return {"model": model_fingerprint, "layer": layer, "method": method, "source": "train-gated",
            "training": {k: v for k, v in config.items() if k not in RESUME_IGNORED}}


def cache_gate(cache, result, config, class_names: list[str]) -> dict:
    """Store the gate of a finished run (:class:`~cnnexplain.training.loop.TrainResult`) in
    ``cache``; returns ``{"cache_key", "channels_per_class"}`` for the run's summary."""
    from cnnexplain.models.gates import class_clusters
    from cnnexplain.models.loading import architecture, model_fingerprint

    tensors = result.gate.state_tensors()
    matrix = result.gate.matrix().detach().float().cpu()
    fp = model_fingerprint(result.model, tensors,
                           architecture(config.backbone, config.insert_conv, config.stem))
    parts = gate_cache_parts(fp, result.layer, config.method, config.to_dict())
    key = cache.key("gate", **parts)
    name = "W" if "W" in tensors else "P"
    clusters = class_clusters(matrix, config.gate_threshold)
    arrays = {name: tensors[name].numpy(), "clusters": clusters.numpy().astype("uint8")}
    if cache.enabled:
        cache.save("gate", key, arrays, attrs={
            "description": f"gate matrix of a {config.method} model trained by train-gated",
            "method": config.method, "layer": result.layer, "classes": class_names,
            "threshold": config.gate_threshold, "checkpoint": str(result.checkpoint)},
            dataset_attrs={name: {"description": "W: channel-class membership" if name == "W"
                                  else "P: class-filter correspondence",
                                  "shape": "K x C" if name == "W" else "C x K",
                                  "units": "membership in [0, 1]"},
                           "clusters": {"description": "class clusters (membership > threshold)",
                                        "shape": "C x K", "units": "0/1"}})
    return {"cache_key": key if cache.enabled else None,
            "channels_per_class": clusters.sum(1).tolist()}
