"""The one way from a file or a live window to a verdict.

``stages`` (read -> clips -> features), ``journal`` (durable file states, verdict log), ``batcher``
(batches across files), ``verdict`` (verdict records), ``jobs`` (what travels between the threads),
``runner`` (the threads), ``identify`` (one-shot), ``serving`` (what is loaded to judge).
docs/architecture.md draws the way a file takes through them.
"""
