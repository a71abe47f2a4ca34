"""Multi-task ranking models: fused embeddings, MoE bottoms, per-task towers, ESMM products."""
from models.bottoms import MMoE, OMoE, PLE, BatchedMLP, SharedBottom
from models.config import ModelConfig
from models.embedding import FusedEmbeddings
from models.ranker import DenseStage, MultiTaskRanker, build_bottom, product_key

__all__ = ["BatchedMLP", "DenseStage", "FusedEmbeddings", "MMoE", "ModelConfig", "MultiTaskRanker", "OMoE", "PLE",
           "SharedBottom", "build_bottom", "product_key"]
