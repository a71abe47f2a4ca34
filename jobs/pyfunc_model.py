"""MLflow pyfunc entry point, logged as *code* (MLflow's models-from-code), never as a pickle.

Loading a registered version runs this file, which builds the ranker from the version's artifacts:
the FeatureSpec (with its hash seed), the numeric statistics and the weights (a plain state dict,
`torch.load(weights_only=True)`). `predict` takes a DataFrame of raw feature columns — the same
columns as the impression logs, labels not needed — and returns every task output per row.
"""
from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from mlflow.pyfunc import PythonModel

CHUNK = 16_384


class RankerPyfunc(PythonModel):
    def load_context(self, context) -> None:
        from features.featurize import Featurizer
        from jobs.model_io import load_model

        self.saved = load_model(context.artifacts["model"])
        self.featurizer = Featurizer(self.saved.spec, self.saved.stats)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from pipeline.batch import Batch

        table = pa.Table.from_pandas(model_input, preserve_index=False)
        parts: dict[str, list] = {}
        with torch.inference_mode():
            for start in range(0, table.num_rows, CHUNK):
                arrays = self.featurizer.transform(table.slice(start, CHUNK), with_labels=False)
                out = self.saved.model(Batch.from_arrays(arrays))
                for k, v in out.items():
                    if k in ("logits", "gates") or k.startswith("log_p_"):
                        continue
                    parts.setdefault(k, []).append(v.float().numpy())
        return pd.DataFrame({k: np.concatenate(v) for k, v in parts.items()})


mlflow.models.set_model(RankerPyfunc())
