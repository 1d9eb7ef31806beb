"""LongBench v1, LongBench-E and MiniLongBench (shared/specs/suites.md §1 and §5)."""

BUILTIN = {
    "longbench": "lcbench.tasks.longbench.task:LongBench",
    "longbench_e": "lcbench.tasks.longbench.task:LongBenchE",
    "minilongbench": "lcbench.tasks.longbench.minilongbench:MiniLongBench",
}
