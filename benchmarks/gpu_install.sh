# Install the carried wheels on the GPU machine and put them and this checkout on PYTHONPATH. Meant to be SOURCED,
# first thing in a device call that carries .whl (made here by benchmarks/gpu_wheels.sh):
#   source benchmarks/gpu_install.sh /tmp/site || exit 1
# It installs .whl/*.whl (WHEELS=folder to use another) into TARGET without network, exports
# PYTHONPATH=<repo root>:TARGET (dqar comes from this checkout, never from a wheel, so it is always the current code),
# then checks `import torch, diffusers, dqar` and, unless REQUIRE_CUDA=0, torch.cuda.is_available(). On a failure it
# prints one line naming the check and the fix and returns non-zero. Run with bash instead, it only checks.
# PY=python3 is the interpreter (on the H200 image: the one that holds torch).
_dqar_gpu_install() {
  local target=${1:?usage: source benchmarks/gpu_install.sh TARGET}
  local root py=${PY:-python3} shown=${WHEELS:-.whl}
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  local folder=${WHEELS:-$root/.whl}
  if ! compgen -G "$folder/*.whl" > /dev/null; then
    echo "no wheels in ${shown%/}/: run benchmarks/gpu_wheels.sh on a machine with PyPI" >&2
    return 1
  fi
  local log
  if ! log=$(PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 "$py" -m pip install -q --no-index \
      --no-deps --no-compile --no-cache-dir --upgrade --target "$target" "$folder"/*.whl 2>&1); then
    echo "gpu_install: pip install of ${shown%/}/*.whl into $target failed ($(echo "$log" | grep -m1 -i error || echo "$log" | tail -1)); fix: rerun benchmarks/gpu_wheels.sh (one version of each, Python 3.12 wheels)" >&2
    return 1
  fi
  export PYTHONPATH="$root:$target${PYTHONPATH:+:$PYTHONPATH}"
  echo "export PYTHONPATH=$PYTHONPATH"
  DQAR_ROOT=$root "$py" - <<'PYEOF'
import os, sys


def fail(check, error, fix):
    """One line naming the failed check, its error and the fix; exit 1."""
    print(f"gpu_install: {check} failed ({' '.join(str(error).split())}); fix: {fix}", file=sys.stderr)
    sys.exit(1)


for name in ("torch", "diffusers", "dqar"):
    try:
        __import__(name)
    except Exception as error:
        fail(f"import {name}", f"{type(error).__name__}: {error}",
             "use the image's python3 (PY=...)" if name == "torch" else "rerun benchmarks/gpu_wheels.sh and carry .whl")
try:
    __import__("diffusers").DiTTransformer2DModel
except Exception as error:
    fail("diffusers.DiTTransformer2DModel", f"{type(error).__name__}: {error}", "rerun benchmarks/gpu_wheels.sh and carry .whl")
dqar = sys.modules["dqar"]
if not os.path.realpath(dqar.__file__).startswith(os.path.realpath(os.environ["DQAR_ROOT"]) + os.sep):
    fail("dqar from the checkout", f"imported {dqar.__file__}", "keep dqar out of .whl and PYTHONPATH")
if os.environ.get("REQUIRE_CUDA", "1") != "0" and not __import__("torch").cuda.is_available():
    fail("torch.cuda.is_available()", "False", "run on the GPU machine, or REQUIRE_CUDA=0 to check without one")
import torch, diffusers
print(f"gpu_install: torch {torch.__version__}, diffusers {diffusers.__version__}, dqar {dqar.__file__}")
PYEOF
}
_dqar_gpu_install "$@"
