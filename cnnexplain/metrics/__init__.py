"""Metrics: pure functions of cached features, labels and model parts.

- :mod:`cnnexplain.metrics.mis`: MIS (seed 004) with the k-NN mutual-information estimator that
  scikit-learn's ``mutual_info_classif`` uses, vectorized in torch.
- :mod:`cnnexplain.metrics.entanglement`: ACC1 / ACC2 / ACC3 (seed 004), R0 / R1 (seed 000),
  gate statistics, and the evaluate-entanglement pipeline.
"""
