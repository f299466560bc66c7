"""Accuracy and fact retention (claims C6, C7): an lm-evaluation-harness `LM` over the engine
(lm.py), the fact-retention tests (facts.py token level, chat.py natural language), the
retrieval model's trainer (train.py) and the cell that runs them (cell.py)."""
