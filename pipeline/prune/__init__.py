"""Pruning a searched α-model: choosing structured plans (what ships) and eq. 9's ε; the
plans' types and byte accounting are in ``plans/``."""
