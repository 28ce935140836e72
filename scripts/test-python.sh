#!/usr/bin/env bash
# The Python package's tests: builds the wheel, installs it into the pinned torch venv
# (scripts/install-torch.sh, or the Python named by THOR_PYTHON), checks that the installed
# package finds its own library, then runs pytest on python/tests against it. CUDA cases
# run where torch sees a GPU.
#   scripts/test-python.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
py="${THOR_PYTHON:-$(scripts/install-torch.sh)}"
if ! "$py" -c "import torch, pytest" 2>/dev/null; then
  echo "$py has no torch or pytest" >&2
  exit 2
fi
wheel=$(THOR_PYTHON="$py" scripts/build-wheel.sh | tail -n 1)
"$py" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps "$wheel"
# From outside the source tree: the installed package, with the library inside it.
(cd / && env -u THOR_KERNELS_LIB "$py" -c "
import thor_kernels, pathlib
p = thor_kernels.library_path()
assert 'site-packages' in str(p) and p.parent == pathlib.Path(thor_kernels.__file__).parent, p
print('installed', pathlib.Path(thor_kernels.__file__).parent, 'library', p.name)")
cd python/tests
exec env -u THOR_KERNELS_LIB "$py" -m pytest -q -p no:cacheprovider "$@"
