"""The one way from a file or a live window to a verdict.

``stages`` (read -> clips -> features), ``journal`` (durable file states), ``batcher`` (batches
across files), ``verdict`` (verdict records), ``runner`` (threads), ``identify`` (one-shot),
``serving`` (what is loaded to judge). See docs/architecture.md for the data flow.
"""
