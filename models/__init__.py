"""Multi-task ranking models: fused embeddings, MoE bottoms, per-task towers, ESMM products."""
from mtrank.models.bottoms import MMoE, OMoE, PLE, BatchedMLP, SharedBottom
from mtrank.models.config import ModelConfig
from mtrank.models.embedding import FusedEmbeddings
from mtrank.models.batch import Batch, ModelOutput, TableInput
from mtrank.models.ranker import DenseStage, MultiTaskRanker, build_bottom

__all__ = ["Batch", "BatchedMLP", "DenseStage", "FusedEmbeddings", "MMoE", "ModelConfig", "ModelOutput",
           "MultiTaskRanker", "OMoE", "PLE", "SharedBottom", "TableInput", "build_bottom"]
