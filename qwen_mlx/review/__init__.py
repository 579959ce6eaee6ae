"""``qwen-mlx review``: people check the data and grade the model's answers in a browser.

Two pages on one small server (:mod:`~qwen_mlx.review.server`, the conventions of ``serve``):
the records of a data set, each accepted, edited or rejected (:mod:`~qwen_mlx.review.records`,
materialised by :mod:`~qwen_mlx.review.reviewed`), and the answers of an eval report, each
graded (:mod:`~qwen_mlx.review.grades`). Every decision is a line of an append-only ledger
(:mod:`~qwen_mlx.review.ledger`), on disk before the page hears it was saved.
"""
