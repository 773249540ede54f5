"""The daemon: durable journal, directory watcher, dynamic batcher, pipeline service, verdicts.

Data flow: sources -> journal -> decode + features (worker threads) -> batcher -> backend
(one inference thread) -> verdict writer (journal + JSONL log + metrics).
"""
