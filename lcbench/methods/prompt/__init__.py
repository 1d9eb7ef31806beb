"""Prompt compression: text-stage components that shorten the context before the model sees it."""

BUILTIN: dict[str, str] = {
    "truncate": "lcbench.methods.prompt.truncate:Truncate",
    "selective_context": "lcbench.methods.prompt.selective_context:SelectiveContext",
    "llmlingua": "lcbench.methods.prompt.llmlingua:LLMLingua",
    "longllmlingua": "lcbench.methods.prompt.llmlingua:LongLLMLingua",
    "extractive": "lcbench.methods.prompt.extractive:Extractive",
    "llmlingua2": "lcbench.methods.prompt.llmlingua2:LLMLingua2",
}
