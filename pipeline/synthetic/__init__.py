"""Synthetic data: impression logs with hidden ground truth, and the MMoE paper's regression tasks."""
from pipeline.synthetic.impressions import SCHEMA, GenerationSummary, ImpressionConfig, generate_impressions
from pipeline.synthetic.mmoe_regression import mmoe_synthetic

__all__ = ["SCHEMA", "GenerationSummary", "ImpressionConfig", "generate_impressions", "mmoe_synthetic"]
