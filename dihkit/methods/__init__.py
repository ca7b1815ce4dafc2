"""Helpers the training types share: the on-device epoch counter, the head-based baselines' common parts."""
