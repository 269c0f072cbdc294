#!/usr/bin/env bash
# Install time and venv size of torch/torchvision pairs in fresh venvs (docs/benchmarks.md).
# Usage: bash benchmarks/torch_pair_install.sh   (needs python3.11; leaves nothing behind)
set -e
for pair in "2.13.0 0.28.0" "2.14.1 0.29.1"; do
  set -- $pair
  d=/tmp/venv_t$1; rm -rf $d
  python3.11 -m venv $d
  s=$(date +%s.%N)
  $d/bin/pip install -q torch==$1 torchvision==$2 >/dev/null 2>&1
  e=$(date +%s.%N)
  imp=$($d/bin/python -c "import torchvision, torch; print('import ok', torch.__version__, torchvision.__version__)" 2>&1 | tail -1)
  echo "torch $1 + torchvision $2: install $(echo "$e - $s" | bc) s, venv $(du -sm $d | cut -f1) MB, $imp"
  rm -rf $d
done
