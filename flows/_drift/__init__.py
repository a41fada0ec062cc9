"""Embedding drift: the tests (`methods`: statistics and their permutation p-values), the two
windows read and checked (`windows`), the pinned baselines (`baseline`) and the run history with
its plot (`history`); used by `monitor_drift`."""
