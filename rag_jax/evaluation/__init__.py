"""Evaluation: the loop (loop.py), scores from written predictions (scoring.py), the modes of
evaluate.py (runner.py) and the paper-row configs' runs (paper.py); docs/evaluation.md."""
