#!/usr/bin/env bash
# Bench venv for the peer trainers (torch-rechub 0.9.0, deepctr-torch 0.3.0): `make bench-venv`.
#
# The peers declare `torch>=...`; installed normally they would be free to pull another torch (a CUDA
# build with GBs of nvidia-* wheels). So torch 2.13.0 goes in first, exactly pinned (the local CPU
# wheel), the peers go in with --no-deps, and their pure-Python/numeric needs are installed by name
# (none of which declares torch). Idempotent: a finished venv carries a stamp and is left alone
# unless this script changed since.
set -euo pipefail

cd "$(dirname "$0")/../.."
VENV=${BENCH_VENV:-.mtrank/bench-venv}
PY=$VENV/bin/python
STAMP=$VENV/.installed
SELF=bench/peers/setup_venv.sh

# (deepctr_torch is only located, not imported: its import starts a PyPI version check.)
CHECK="import importlib.util as u, torch_rechub.trainers, torch_rechub.models.multi_task
assert all(u.find_spec(m) for m in ('deepctr_torch', 'requests', 'packaging', 'pandas', 'sklearn', 'pyarrow', 'yaml'))"

if [[ -f $STAMP && $STAMP -nt $SELF ]] && "$PY" -c "$CHECK" 2>/dev/null; then
    echo "bench venv up to date: $VENV"
    exit 0
fi

no_nvidia() {
    if "$PY" -m pip list 2>/dev/null | grep -qi '^nvidia'; then
        echo "nvidia-* packages are in $VENV: something asked for another torch" >&2
        exit 1
    fi
}

test -x "$PY" || "${PYTHON:-python3}" -m venv "$VENV"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q "torch==2.13.0"
no_nvidia
# What the peers import to build, train and evaluate (same versions as the main venv's), plus pyyaml
# for reading features/default_spec.yaml. None of these depends on torch. deepctr_torch imports
# requests and packaging at import time (a PyPI version check, stubbed out by our runner).
"$PY" -m pip install -q "numpy==2.4.6" "pandas==3.1.1" "scikit-learn==1.9.1" "pyarrow==25.0.1" \
    "tqdm==4.70.1" "pyyaml==6.0.3" "requests==2.34.2" "packaging==26.3"
"$PY" -m pip install -q --no-deps "torch-rechub==0.9.0" "deepctr-torch==0.3.0"
no_nvidia
"$PY" -c "import torch; assert torch.__version__.split('+')[0] == '2.13.0', torch.__version__"
"$PY" -c "$CHECK"
touch "$STAMP"
echo "bench venv ready: $VENV ($("$PY" -c 'import torch; print("torch", torch.__version__)'))"
