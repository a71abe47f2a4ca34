"""MLflow pyfunc entry point, logged as *code* (MLflow's models-from-code), never as a pickle.

Loading a registered version runs this file, which builds the ranker from the version's artifacts:
the FeatureSpec (with its hash seed), the numeric statistics and the weights (a plain state dict,
`torch.load(weights_only=True)`). `predict` takes a DataFrame of raw feature columns — the same
columns as the impression logs, labels not needed — and returns every task output per row.
"""
from __future__ import annotations

import mlflow
import pandas as pd
import pyarrow as pa
from mlflow.pyfunc import PythonModel

class RankerPyfunc(PythonModel):
    def load_context(self, context) -> None:
        from mtrank.features.featurize import Featurizer
        from mtrank.jobs.model_io import load_model

        self.saved = load_model(context.artifacts["model"])
        self.featurizer = Featurizer(self.saved.spec, self.saved.stats)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from mtrank.pipeline.evaluate import predict_rows

        table = pa.Table.from_pandas(model_input, preserve_index=False)
        return pd.DataFrame(predict_rows(self.saved.model, self.featurizer, table))


mlflow.models.set_model(RankerPyfunc())
