"""Reasoning with search (Search-R1) and the two-phase reasoning pipeline."""
