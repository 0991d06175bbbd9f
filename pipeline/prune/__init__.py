"""Pruning a searched α-model: structured plans (what ships) and eq. 9 byte accounting."""
