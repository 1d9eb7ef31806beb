"""Prompt compression: text-stage components that shorten the context before the model sees it."""
