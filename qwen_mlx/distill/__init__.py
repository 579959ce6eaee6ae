"""``qwen-mlx data distill``: rule documents → a grounded training set and test set.

The steps live one per module: :mod:`documents` reads files into text, :mod:`chunking`
cuts the text at its headings and article numbers, :mod:`teacher` talks to any
OpenAI-compatible model through a resumable ledger, :mod:`generate` asks for questions,
answers, grounding verdicts, paraphrases and questions the documents leave open,
:mod:`retrieval` finds the chunks such a question is checked against (BM25), :mod:`curate`
drops exact repeats, clusters near-duplicates and splits whole clusters, :mod:`pipeline`
runs the stages in order, and :mod:`run` plans, ties them together and writes the output
folder.
"""
