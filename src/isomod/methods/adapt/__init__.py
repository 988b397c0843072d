"""Domain adaptation by re-ordering pretrained modules.

A model trained on several labelled *source domains* (tasks of one label space: a shared
stem, pool and head, one route and set of step norms per domain) meets a new *target
domain*. The target becomes one more domain of the model: its own route and step norms,
the shared head. Unless a method says otherwise, pool, stem, head and every source stay
exactly as they were.

The methods, one registry (`ADAPT`), one module per setting; importing this package
registers them all:

- `source_free`: the target's images alone (`source_only`, `adabn`, `tent`,
  `route_select`, `route_entropy`, `route_im`; and `route_shot` in `select`);
- `with_sources`: the labelled source domains too (`route_moment`, `route_adversarial`,
  `m3sda`, `dann`; and `route_calibrated` in `select`);
- `few_labels`: a few labelled target images per class (`route`, `route_search`,
  `norm_patch`, `route_norms`, `head_only`, `finetune`);
- `select`: choosing or self-training the target's route without its labels.

Every method is a registered unit with its setting, what it changes and what a bench may
tune; every one that trains runs through the one `Trainer`.
"""

from isomod.methods.adapt.base import (ADAPT, ADAPT_TRAIN, MIN_TARGET_IMAGES, AdaptResult, Target, adapt, add_as_copy,
                                       by_im, changed_numbers, check_labelled, check_target, entropy, im_score,
                                       marginal_entropy, predict_logits, route_oracle, score_sources, setting,
                                       start_from_sources, stats_distance, unlabelled)
from isomod.methods.adapt import source_free, with_sources, few_labels, select  # noqa: E402  each fills ADAPT

__all__ = ["ADAPT", "ADAPT_METHODS", "ADAPT_TRAIN", "ALIGN_ROUTE_METHODS", "AdaptResult", "FEW_LABELS",
           "FULL_NETWORK_METHODS", "MIN_TARGET_IMAGES", "ROUTE_METHODS", "SOURCE_FREE", "Target", "WITH_SOURCES",
           "adapt", "add_as_copy", "by_im", "changed_numbers", "check_labelled", "check_target", "entropy",
           "few_labels", "im_score", "marginal_entropy", "predict_logits", "route_oracle", "score_sources", "select",
           "setting", "source_free", "start_from_sources", "stats_distance", "unlabelled", "with_sources"]

SOURCE_FREE = ADAPT.names("source_free")
WITH_SOURCES = ADAPT.names("with_sources")
FEW_LABELS = ADAPT.names("few_labels")
ADAPT_METHODS = SOURCE_FREE + WITH_SOURCES  # the unsupervised ones
ROUTE_METHODS = tuple(m for m in SOURCE_FREE if ADAPT[m].learns_route)  # source-free methods that learn a route
ALIGN_ROUTE_METHODS = tuple(m for m in WITH_SOURCES if ADAPT[m].learns_route)  # with sources, the route alone
FULL_NETWORK_METHODS = tuple(m for m in WITH_SOURCES if not ADAPT[m].learns_route)  # with sources, every parameter
