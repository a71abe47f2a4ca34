"""MLflow pyfunc entry point, logged as *code* (MLflow's models-from-code), never as a pickle.

Loading a registered version runs this file, which builds the ranker from the version's artifacts:
the FeatureSpec (with its hash seed), the numeric statistics, the weights (a plain state dict,
`torch.load(weights_only=True)`) and the training logs' column types. The `mtrank` code it imports
travels with the version (`code/`), so no mtrank install is needed where it loads.

`predict` takes a DataFrame of raw feature columns — the same columns as the impression logs, other
columns ignored, nulls allowed; features with a `serve_value` (position) are set, not read — and
returns one column per output of the spec.

Requests of fewer than `serial_rows` rows (default 1,024; environment MTRANK_SERVING_SERIAL_ROWS at
load, 0 = never) run the forward on one intra-op thread: at serving sizes the work per operator is
tiny, and torch's thread team costs more in wake-ups and barriers than it saves (4-8x slower at
1-1,000 rows on a busy 2-core machine, `bench/serving_bench.py`). Predictions are the same either way.

Loading does not change the host process's allocator (a server, a Spark executor): with
MTRANK_KEEP_FREED_MEMORY=1 set explicitly it keeps freed memory as the `mtrank` CLI does
(jobs/process_memory.py), which pays for large in-process batches (tens of thousands of rows per call).
"""
from __future__ import annotations

import contextlib
import os
import threading

import mlflow
import pandas as pd
import pyarrow as pa
from mlflow.pyfunc import PythonModel


class RankerPyfunc(PythonModel):
    def load_context(self, context) -> None:
        from mtrank.features.featurize import Featurizer
        from mtrank.features.inputs import serving_schema
        from mtrank.jobs.model_io import load_model
        from mtrank.jobs.process_memory import ENV, keep_freed_memory

        if os.environ.get(ENV) == "1":   # opt-in only: the allocator belongs to the host process
            keep_freed_memory()
        self.saved = load_model(context.artifacts["model"])
        self.featurizer = Featurizer(self.saved.spec, self.saved.stats)
        self.schema = serving_schema(self.saved.spec, self.saved.input_schema)
        self.serial_rows = int(os.environ.get("MTRANK_SERVING_SERIAL_ROWS", "1024"))
        self.saved.model.eval()

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        import torch
        from mlflow.exceptions import MlflowException

        from mtrank.features.base import MtrankError
        from mtrank.features.inputs import check_serving_nulls, conform, with_served_values
        from mtrank.pipeline.evaluate import predict_rows

        cols = [c for c in self.schema.names if c in model_input.columns]
        try:
            table = conform(pa.Table.from_pandas(model_input[cols], preserve_index=False), self.schema)
            check_serving_nulls(table, self.saved.spec)
            table = with_served_values(table, self.saved.spec)
        except (MtrankError, pa.ArrowException) as e:   # the client's rows: HTTP 400, not 500
            raise MlflowException.invalid_parameter_value(str(e)) from None
        with torch.inference_mode(), _serial_forward(table.num_rows < self.serial_rows):
            return pd.DataFrame(predict_rows(self.saved.model, self.featurizer, table))


_serial_lock = threading.Lock()
_serial_requests = 0       # small requests in flight (the server may run several at once)
_threads_before = 0        # torch's thread count when the first of them started


@contextlib.contextmanager
def _serial_forward(serial: bool):
    """One intra-op thread while any small request runs, torch's own count back when the last ends.

    torch's thread count is process-wide, so concurrent requests share one counter: saving and
    restoring per request would let an overlap leave the server at one thread for good. A large
    request that overlaps a small one runs on one thread too (slower, same numbers)."""
    global _serial_requests, _threads_before
    import torch

    if not serial:
        yield
        return
    with _serial_lock:
        if _serial_requests == 0:
            _threads_before = torch.get_num_threads()
            torch.set_num_threads(1)
        _serial_requests += 1
    try:
        yield
    finally:
        with _serial_lock:
            _serial_requests -= 1
            if _serial_requests == 0:
                torch.set_num_threads(_threads_before)


mlflow.models.set_model(RankerPyfunc())
