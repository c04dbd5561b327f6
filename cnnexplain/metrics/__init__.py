"""Metrics: pure functions of cached features, labels, maps and model parts.

- :mod:`cnnexplain.metrics.mis`: MIS (seed 004) with the k-NN mutual-information estimator that
  scikit-learn's ``mutual_info_classif`` uses, vectorized in torch.
- :mod:`cnnexplain.metrics.entanglement`: ACC1 / ACC2 / ACC3 (seed 004), R0 / R1 (seed 000),
  gate statistics, and the evaluate-entanglement pipeline.
- Saliency evaluation (registered in :mod:`cnnexplain.explain.saliency.evaluation`):
  :mod:`~cnnexplain.metrics.localization`, :mod:`~cnnexplain.metrics.faithfulness`
  (deletion / insertion, ablation, occlusion rank), :mod:`~cnnexplain.metrics.removal`
  (region perturbation, pixel flipping, symmetric relevance gain),
  :mod:`~cnnexplain.metrics.road`, :mod:`~cnnexplain.metrics.irof`,
  :mod:`~cnnexplain.metrics.infidelity`, :mod:`~cnnexplain.metrics.faithfulness_correlation`,
  :mod:`~cnnexplain.metrics.robustness`, :mod:`~cnnexplain.metrics.complexity`,
  :mod:`~cnnexplain.metrics.randomization`, :mod:`~cnnexplain.metrics.axiomatic`,
  :mod:`~cnnexplain.metrics.sanity`, :mod:`~cnnexplain.metrics.discriminativeness`, with
  :mod:`~cnnexplain.metrics.masking` (removal machinery), :mod:`~cnnexplain.metrics.preprocess`
  (per-sample normalisation) and :mod:`~cnnexplain.metrics.agreement` (how the metrics rank
  methods, and their rank agreement).
"""
