"""Synthetic data: impression logs with hidden ground truth, candidate days for scoring, and the
MMoE paper's regression tasks."""
from mtrank.pipeline.synthetic.candidates import CANDIDATE_SCHEMA, CandidateSummary, generate_candidates
from mtrank.pipeline.synthetic.impressions import SCHEMA, GenerationSummary, ImpressionConfig, generate_impressions
from mtrank.pipeline.synthetic.mmoe_regression import mmoe_synthetic

__all__ = ["CANDIDATE_SCHEMA", "SCHEMA", "CandidateSummary", "GenerationSummary", "ImpressionConfig",
           "generate_candidates", "generate_impressions", "mmoe_synthetic"]
