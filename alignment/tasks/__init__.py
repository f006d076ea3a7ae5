"""Synthetic tasks with verifiable answers, used by the tiny recipes."""
