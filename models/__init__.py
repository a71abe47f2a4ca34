"""Multi-task ranking models: fused embeddings, MoE bottoms, per-task towers, ESMM products."""
from models.bottoms import MMoE, OMoE, PLE, BatchedMLP, SharedBottom
from models.config import ModelConfig
from models.embedding import FusedEmbeddings
from models.batch import Batch, ModelOutput, TableInput
from models.ranker import DenseStage, MultiTaskRanker, build_bottom

__all__ = ["Batch", "BatchedMLP", "DenseStage", "FusedEmbeddings", "MMoE", "ModelConfig", "ModelOutput",
           "MultiTaskRanker", "OMoE", "PLE", "SharedBottom", "TableInput", "build_bottom"]
