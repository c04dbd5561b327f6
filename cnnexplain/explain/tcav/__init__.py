"""TCAV (Kim et al. 2018) with seed 000's interventional scores I+ / I- and a significance test."""

from cnnexplain.config.tcav import CAVConfig, TCAVConfig
from cnnexplain.explain.tcav.cav import (
                                         CAV,
                                         SOLVERS,
                                         stratified_split,
                                         subsample_size,
                                         train_cav,
)
from cnnexplain.explain.tcav.concepts import (
                                         ConceptSets,
                                         broden_concept_sets,
                                         folder_concept_sets,
)
from cnnexplain.explain.tcav.plot import plot_tcav
from cnnexplain.explain.tcav.run import (
    INPUT_INDEPENDENT,
    RUN_COLUMNS,
    TCAVResult,
    check_layers,
    gradient_spread,
    run_tcav,
)
from cnnexplain.explain.tcav.scores import (
                                         directional_derivatives,
                                         interventional_scores,
                                         logit_gradients,
                                         magnitude,
                                         sign_count,
)
from cnnexplain.explain.tcav.stats import TABLE_COLUMNS, kim_ttest, summarize

__all__ = ["CAV", "CAVConfig", "ConceptSets", "INPUT_INDEPENDENT", "RUN_COLUMNS", "gradient_spread", "SOLVERS", "TABLE_COLUMNS",
           "TCAVConfig", "TCAVResult", "broden_concept_sets", "check_layers",
           "directional_derivatives", "folder_concept_sets", "interventional_scores", "kim_ttest",
           "logit_gradients", "magnitude", "plot_tcav", "run_tcav", "sign_count",
           "stratified_split", "subsample_size", "summarize", "train_cav"]
