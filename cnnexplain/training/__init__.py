"""``train-gated``'s training: the loop (:mod:`~cnnexplain.training.loop`), seeds and RNG state
(:mod:`~cnnexplain.training.state`), augmentation, global BatchNorm under torchrun, the data."""
