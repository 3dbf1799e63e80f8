"""Shared library of the kmed-r1 stages: config, data, modeling, lm utilities, tracking, io."""
