"""Measuring what a patch bought: MACs and MAC budgets, throughput, accuracy, tables and charts."""

from .budget import BudgetFit, set_macs_ratio
from .evaluate import Accuracy, accuracy, predict
from .flops import MacReport, count_macs
from .speed import Throughput, benchmark, compare_throughput, paired_speedup

__all__ = ["BudgetFit", "set_macs_ratio", "Accuracy", "accuracy", "predict", "MacReport", "count_macs", "Throughput",
           "benchmark", "compare_throughput", "paired_speedup"]
