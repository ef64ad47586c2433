"""Evaluation: perplexity, zero-shot tasks, speed and memory."""
