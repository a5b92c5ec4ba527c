"""Scoring networks: the evaluation protocols, the confusion accumulator, the panels."""
