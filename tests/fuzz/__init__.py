"""Seeded property-based fuzzing of every op against an independent fp64 oracle (tests/test_fuzz.py)."""
