"""SCBench (microsoft/MInference@fb56c91 scbench/): 12 released shared-context tasks, multi-turn and
multi-request, plus offline synthetic stand-ins registered as ``scbench_*_synth``."""
