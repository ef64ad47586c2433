"""Self-Pruner's LLM operator (:mod:`.operator`), its prompts and reply parsing (:mod:`.prompts`) and the local
OpenAI-compatible servers it can talk to (:mod:`.server`)."""
