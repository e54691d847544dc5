"""Shared pieces of the ops: tile settings of the reference forms, kernel tuning."""
