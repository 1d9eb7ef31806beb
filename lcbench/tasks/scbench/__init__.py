"""SCBench (microsoft/MInference@fb56c91 scbench/): 12 released shared-context tasks, multi-turn and
multi-request, plus offline synthetic stand-ins registered as ``scbench_*_synth``."""

_TASKS = ("kv", "prefix_suffix", "vt", "repoqa", "qa_eng", "qa_chn", "choice_eng", "many_shot", "mf", "summary",
          "summary_with_needles", "repoqa_and_kv")
_SYNTH = ("kv", "prefix_suffix", "vt", "mf")

BUILTIN = {"scbench": "lcbench.tasks.scbench.task:SCBench"}
BUILTIN.update({f"scbench_{t}": f"lcbench.tasks.scbench.task:RELEASED.scbench_{t}" for t in _TASKS})
BUILTIN.update({f"scbench_{t}_synth": f"lcbench.tasks.scbench.task:SYNTHETIC.scbench_{t}_synth" for t in _SYNTH})
