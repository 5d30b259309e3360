"""Explaining what a patched model computed: maps over the patch grid, attention baselines,
the deletion metric, and PNG rendering."""

from .explanation import (Explanation, attention_maps, attention_rollout, cls_attention_map, deletion_auc, deletion_curve,
                          explain, score_map)

__all__ = ["Explanation", "attention_maps", "attention_rollout", "cls_attention_map", "deletion_auc", "deletion_curve",
           "explain", "score_map"]
