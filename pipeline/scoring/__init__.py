"""Scoring stage: fusion of task outputs, business rules, ranked lists (pure functions over columns)."""
from pipeline.scoring.config import ScoringConfig
from pipeline.scoring.fate import Fate
from pipeline.scoring.fusion import ScoringError
from pipeline.scoring.stage import Scored, score_candidates

__all__ = ["Fate", "Scored", "ScoringConfig", "ScoringError", "score_candidates"]
