"""Survival models: classical (Cox on selected features) and, later, deep (MIL + fusion)."""
