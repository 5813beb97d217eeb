#!/usr/bin/env bash
# Parity with AdapterHub (`adapters` 1.3.0, transformers 4.57) in a side venv that borrows the
# project venv's torch (a .pth file) so nothing large is downloaded. See adapterhub_parity.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
V=benchmarks/.work/ahvenv
if [ ! -x $V/bin/python ]; then
  python3 -m venv $V
  SITE=$($PY -c "import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))")
  echo "$SITE" > "$($V/bin/python -c 'import site; print(site.getsitepackages()[0])')/zz_project_venv.pth"
  $V/bin/pip install -q --no-deps adapters==1.3.0 "transformers>=4.57,<4.58"
  $V/bin/pip install -q requests "huggingface-hub>=0.34,<1.0" "tokenizers>=0.22,<=0.23.0"
fi
export HF_HUB_OFFLINE=1
$PY benchmarks/adapterhub_parity.py ours
$V/bin/python benchmarks/adapterhub_parity.py hub
$PY benchmarks/adapterhub_parity.py back
