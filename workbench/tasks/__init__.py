"""Prompt sets and task generators: the inputs every scan and intervention runs on."""

from workbench.tasks.prompts import PromptSet, load_prompts, shipped_prompt_sets

__all__ = ["PromptSet", "load_prompts", "shipped_prompt_sets"]
