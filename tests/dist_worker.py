"""A rank of a real torchrun job for tests/test_distributed.py: trains a small ranker on its shard
through the production Trainer and leaves what the test compares (weights, gradient kinds, counts).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_worker.py LOGS OUT
"""
import json
import sys
from pathlib import Path

import torch

from mtrank.features.featurize import Featurizer
from mtrank.features.spec import load_spec
from mtrank.models import ModelConfig
from mtrank.models.config import EsmmConfig
from mtrank.pipeline.dataset import open_window
from mtrank.pipeline.distributed import GradientSync, process_group
from mtrank.pipeline.reader import ImpressionReader, fit_numeric_stats
from mtrank.pipeline.trainer import TrainConfig, Trainer, build_model


def main(logs: str, out: str) -> None:
    spec = load_spec()
    window = open_window(logs, spec)
    stats = fit_numeric_stats(ImpressionReader(window, spec, progress=False))
    tc = TrainConfig(batch_size=256, loss_weighting="uncertainty", shuffle=True, seed=3)
    with process_group() as d:
        # the widest DDP forward: the bottom again on the children's rows, and their per-id biases
        esmm = EsmmConfig(tower_loss="clicked", tower_weight=1.0, tower_scope="dense", id_bias=0.2)
        model = build_model(spec, ModelConfig(experts=2, expert_mlp=(16,), tower_mlp=(8,), esmm=esmm), tc.seed, stats)
        trainer = Trainer(model, spec, tc, dist=d)
        reader = ImpressionReader(window, spec, Featurizer(spec, stats), batch_size=trainer.rank_batch_size,
                                  shuffle=True, seed=tc.seed, rank=d.rank, world_size=d.world_size, progress=False)
        own_batches = sum(1 for _ in reader.batches(0))
        result = trainer.fit(reader, progress=False)
        info = {"rank": d.rank, "own_rows": reader.rows, "own_batches": own_batches, "steps": result.global_step,
                "rows_trained": result.rows_trained, "rows_read": result.accounting.rows_read,
                "table_grads_sparse": [w.grad is not None and w.grad.is_sparse for w in model.sparse_parameters()],
                "rows_per_step": trainer.sync.rows_sent / max(trainer.sync.steps, 1)}
        info["sparse_sync_modes_agree"] = sparse_sync_modes_agree(d, trainer, model, reader)
        torch.save({"model": model.state_dict(), "loss": trainer.loss.state_dict()}, Path(out) / f"rank{d.rank}.pt")
        (Path(out) / f"rank{d.rank}.json").write_text(json.dumps(info))
        del trainer, model


def sparse_sync_modes_agree(d, trainer, model, reader) -> bool:
    """The all_gather sum (what CUDA tables use under nccl) equals gloo's sparse all_reduce."""
    batch = next(reader.batches(1))
    model.zero_grad(set_to_none=True)
    trainer.loss(model(batch), batch)[0].backward()
    tables = model.sparse_parameters()
    mine = [w.grad.clone() for w in tables]
    summed = {}
    for mode in GradientSync.MODES:
        for w, g in zip(tables, mine):
            w.grad = g.clone()
        GradientSync(d, tables, [], mode=mode)()
        summed[mode] = [w.grad.coalesce() for w in tables]
    return all(torch.equal(a.indices(), b.indices()) and torch.allclose(a.values(), b.values(), rtol=0, atol=1e-7)
               for a, b in zip(summed["all_reduce"], summed["all_gather"]))


if __name__ == "__main__":
    main(*sys.argv[1:3])
