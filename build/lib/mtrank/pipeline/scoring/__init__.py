"""Scoring stage: fusion of task outputs, business rules, ranked lists (pure functions over columns)."""
from mtrank.pipeline.scoring.config import ScoringConfig
from mtrank.pipeline.scoring.fate import Fate
from mtrank.pipeline.scoring.fusion import ScoringError
from mtrank.pipeline.scoring.stage import Scored, score_candidates

__all__ = ["Fate", "Scored", "ScoringConfig", "ScoringError", "score_candidates"]
