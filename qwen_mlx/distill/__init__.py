"""``qwen-mlx data distill``: rule documents → a grounded training set and test set.

The steps live one per module: :mod:`documents` reads files into text, :mod:`chunking`
cuts the text at its headings and article numbers, :mod:`teacher` talks to any
OpenAI-compatible model through a resumable ledger, :mod:`generate` asks for questions,
answers and a grounding verdict, :mod:`curate` filters and splits, :mod:`run` ties them
together and writes the output folder.
"""
