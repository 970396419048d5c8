"""Explainers behind one interface, footprint and localisation scores, and the ranking of methods against baselines."""
