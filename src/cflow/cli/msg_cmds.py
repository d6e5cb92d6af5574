"""Placeholder; commands land shortly."""
