#!/usr/bin/env bash
# GPU acceptance in one run: GPU tests and every GPU benchmark against its goal, one summary table,
# results as JSON under benchmarks/results/, BENCHMARKS.md re-rendered (benchmarks/gpu_check.py).
#
#   bash launch/gpu_check.sh                    on a GPU host (finishes in about 7 minutes at most)
#   bash launch/gpu_check.sh --wheels DIR       first install the packages this host lacks from the
#                                               wheels in DIR, no package index (air-gapped hosts);
#                                               DIR may hold a big wheel split by `split` (X.whl.part-aa, ...)
#   bash launch/gpu_check.sh --dry-run          the same parts at tiny sizes on the CPU (CI), results
#                                               in a scratch dir, never the committed ones
# Other options go to benchmarks/gpu_check.py (--only PART..., --budget PART=S, --total-s S, --strict,
# --results-dir DIR; --help lists them). Python: .venv/bin/python when there is one, else $PYTHON or
# python3; the torch found there is used as it is: never installed, upgraded or replaced. The project
# itself is not installed: the repository goes first on PYTHONPATH.
# With $OUT set, $OUT gets gpu_check_summary.{md,json}, gpu_check.log and gpu_check_results.tar.gz,
# rewritten after every part so a run killed from outside still returns what it measured.
set -uo pipefail  # no -e: a failing step is reported in the summary, the rest still runs
cd "$(dirname "$0")/.." || exit 2
REPO="$(pwd)"
START="$(date +%s)"

if [ -x .venv/bin/python ]; then default_py=.venv/bin/python; else default_py=python3; fi
PY="${PYTHON:-$default_py}"
WORK="${SCP_GPU_CHECK_WORK:-${TMPDIR:-/tmp}/scp_gpu_check}"
SITE="$WORK/site"  # where --wheels installs (pip --target): nothing outside it is touched
LOG="$WORK/gpu_check.log"
WHEEL_DIRS=()
PASS=()

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) [ $# -ge 2 ] || { echo "--wheels needs a directory" >&2; exit 2; }; WHEEL_DIRS+=("$2"); shift ;;
    --wheels=*) WHEEL_DIRS+=("${1#--wheels=}") ;;
    -h|--help) usage; exit 0 ;;
    *) PASS+=("$1") ;;
  esac
  shift
done

# Distributions never installed from --wheels: the host's torch stack is the one to measure.
NEVER='^(torch|torchvision|torchaudio|triton|pytorch-triton)$'

# A wheel split into X.whl.part-aa, X.whl.part-ab, ... (to ship it in pieces) is put back together
# in $WORK/wheels; a X.whl.sha256 beside the parts is checked.
reassemble() {
  local dir first whl out
  dir="$(cd "$1" && pwd)"
  mkdir -p "$WORK/wheels"
  for first in "$dir"/*.whl.part-aa; do
    [ -e "$first" ] || continue
    whl="$(basename "${first%.part-aa}")"
    out="$WORK/wheels/$whl"
    [ -f "$dir/$whl" ] && continue
    cat "$dir/$whl".part-* > "$out.tmp" && mv "$out.tmp" "$out"
    if [ -f "$dir/$whl.sha256" ]; then
      if (cd "$WORK/wheels" && sha256sum --quiet -c "$dir/$whl.sha256"); then
        echo "[wheels] reassembled $whl (sha256 ok)"
      else
        echo "[wheels] $whl: sha256 MISMATCH, not installed"; rm -f "$out"
      fi
    else
      echo "[wheels] reassembled $whl"
    fi
  done
}

# The wheels whose distribution is not installed yet and that fit this interpreter (one wheel for
# another Python would make pip refuse the whole list).
missing_wheels() {
  "$PY" - "$NEVER" "$@" <<'EOF'
import importlib.metadata as md
import re
import sys

try:
    from packaging.tags import sys_tags
    from packaging.utils import canonicalize_name, parse_wheel_filename
except ImportError:  # pip vendors packaging
    from pip._vendor.packaging.tags import sys_tags
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename

never, paths = re.compile(sys.argv[1]), sys.argv[2:]
here = set(sys_tags())
for path in paths:
    name, version, _, tags = parse_wheel_filename(path.rsplit("/", 1)[-1])
    name = canonicalize_name(name)
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        have = None
    if never.match(name):
        print(f"[wheels] {name}: never installed from --wheels (the host's torch stack is kept)", file=sys.stderr)
    elif have is not None:
        print(f"[wheels] {name}: already installed ({have}), kept", file=sys.stderr)
    elif not here & set(tags):
        print(f"[wheels] {name} {version}: not for this Python/platform, skipped", file=sys.stderr)
    else:
        print(path)
EOF
}

install_wheels() {
  local dir whl
  local -a all=() todo=()
  for dir in "${WHEEL_DIRS[@]}"; do
    [ -d "$dir" ] || { echo "[wheels] $dir: not a directory, skipped"; continue; }
    reassemble "$dir"
    for whl in "$dir"/*.whl; do [ -e "$whl" ] && all+=("$whl"); done
  done
  for whl in "$WORK"/wheels/*.whl; do [ -e "$whl" ] && all+=("$whl"); done
  [ ${#all[@]} -gt 0 ] || { echo "[wheels] no wheels found in ${WHEEL_DIRS[*]}"; return 0; }
  mapfile -t todo < <(missing_wheels "${all[@]}")
  [ ${#todo[@]} -gt 0 ] || { echo "[wheels] nothing to install"; return 0; }
  echo "[wheels] installing ${#todo[@]} wheel(s) into $SITE: $(printf '%s ' "${todo[@]##*/}")"
  if "$PY" -m pip --version >/dev/null 2>&1; then
    # One pip call for all; if it fails, one wheel at a time so one bad wheel costs only itself.
    pip_into_site "${todo[@]}" || for whl in "${todo[@]}"; do
      pip_into_site "$whl" || unpack_into_site "$whl" || echo "[wheels] FAILED to install ${whl##*/}"
    done
  else
    echo "[wheels] no pip for $PY: unpacking the wheels into $SITE"
    unpack_into_site "${todo[@]}"
  fi
}

# Without pip: a wheel is a zip laid out for site-packages; for these packages unpacking it is
# enough (entry-point scripts and .data/ files, which the checks do not use, are not put in place).
unpack_into_site() {
  "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' "$SITE" "$@" \
    && echo "[wheels] unpacked $(printf '%s ' "${@##*/}")"
}

# pip --target into a fresh directory, then merged into $SITE: pip's --target --upgrade replaces a
# top-level directory that exists, which would drop the other wheels' files from the shared
# `nvidia/` namespace directory (DALI, nvImageCodec and nvJPEG all install there).
pip_into_site() {
  local tmp="$WORK/pip_target"
  rm -rf "$tmp"
  "$PY" -m pip install --no-index --no-deps --no-compile --disable-pip-version-check -q --target "$tmp" "$@" \
    && cp -a "$tmp/." "$SITE/" && rm -rf "$tmp"
}

main() {
  echo "[gpu_check] $(date -u +%FT%TZ) on $(hostname), python $PY ($("$PY" --version 2>&1)), repo $REPO"
  # The repository instead of an install; the packages --wheels installed (now or in an earlier run).
  local path="$REPO"
  if [ -d "$SITE" ] || [ ${#WHEEL_DIRS[@]} -gt 0 ]; then mkdir -p "$SITE"; path="$path:$SITE"; fi
  export PYTHONPATH="$path${PYTHONPATH:+:$PYTHONPATH}"
  [ ${#WHEEL_DIRS[@]} -gt 0 ] && install_wheels
  # nvImageCodec (DALI's decoders) dlopens libnvjpeg.so.13 from beside itself or the loader's path:
  # when nvJPEG was installed elsewhere than nvImageCodec (the host's site-packages vs $SITE),
  # every nvidia/cu13/lib on sys.path goes on LD_LIBRARY_PATH so it is found.
  local libs
  libs="$("$PY" -c 'import os, sys
print(":".join(p for p in (os.path.join(d, "nvidia", "cu13", "lib") for d in sys.path if d) if os.path.isdir(p)))' \
    2>/dev/null)"
  if [ -n "$libs" ]; then export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; fi
  # The driver's view, for when torch sees no GPU (a driver older than torch's CUDA, for one).
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/[nvidia-smi] /'
  fi
  "$PY" -m benchmarks.gpu_check --started "$START" --work "$WORK" --log "$LOG" ${PASS[@]+"${PASS[@]}"}
}

mkdir -p "$WORK"
: > "$LOG"
main 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT" && cp "$LOG" "$OUT/gpu_check.log"; fi  # the complete log
echo "[gpu_check] exit $rc after $(( $(date +%s) - START )) s"
exit "$rc"
