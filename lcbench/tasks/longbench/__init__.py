"""LongBench v1, LongBench-E and MiniLongBench (shared/specs/suites.md §1 and §5)."""
