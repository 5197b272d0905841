#!/usr/bin/env bash
# The prepared GPU check of the trainer's fast path: one JSON, at most 9 minutes on a bare H100/H200.
#
#   benchmarks/gpu_check.sh --prepare          where a package index is reachable: fetch the wheels into .whl/
#   benchmarks/gpu_check.sh --out FILE.json    on the GPU machine: install what it lacks from .whl/, run the check
#   benchmarks/gpu_check.sh --smoke --out FILE.json   the same on the CPU with tiny models (CI-sized)
#
# Run from anywhere; it works in the repository root. benchmarks/README.md ("The prepared GPU check") says
# what the JSON holds and how to run it with the device tool; benchmarks/gpu_check.py does the work.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=.whl
LIMIT_S=540  # 9 minutes, installing included
# The packages the GPU image lacks (it has torch, transformers, peft, accelerate, safetensors, numpy, pillow).
PACKAGES=(diffusers==0.42.1 toml==0.10.2 bitsandbytes==0.50.2)

prepare() {
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$WHEELS" "${PACKAGES[@]}"
    # bitsandbytes ships a library for every CUDA and ROCm version (43 MB); the image's torch is built for
    # CUDA 13, so keep those and the CPU one, to fit the device tool's 64 MiB with the repository.
    python3 - "$WHEELS"/bitsandbytes-*.whl <<'PY'
import re, sys, zipfile
from pathlib import Path
wheel = Path(sys.argv[1])
keep = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")
slim = wheel.with_suffix(".slim")
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
    dropped = {i.filename for i in src.infolist() if i.filename.endswith(".so") and not keep.search(i.filename)}
    for info in src.infolist():
        if info.filename in dropped:
            continue
        data = src.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"".join(line for line in data.splitlines(keepends=True) if line.split(b",")[0].decode() not in dropped)
        dst.writestr(info, data)
slim.replace(wheel)
print(f"{wheel.name}: kept {sorted(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith('.so'))}")
PY
    local exclude
    if exclude=$(git rev-parse --git-path info/exclude 2>/dev/null); then  # also right in a git worktree
        mkdir -p "$(dirname "$exclude")"
        grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
    fi
    du -ch "$WHEELS"/*.whl | tail -1
}

install_missing() {
    local site=/tmp/lora-search-site missing=()
    for wheel in "$WHEELS"/*.whl; do
        [ -e "$wheel" ] || continue
        name=$(basename "$wheel"); name=${name%%-*}
        python3 -c "import $name" 2>/dev/null || missing+=("$wheel")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing ${missing[*]}"
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${missing[@]}"
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    fi
}

if [ "${1:-}" = "--prepare" ]; then
    prepare
    exit 0
fi
install_missing
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# One compiled-kernel cache for all sections, so the training run reuses what the step benchmark compiled.
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/lora-search-torch-compile}"
# What installing left of the 9 minutes; the script plans its parts in that less 30 s (a later --budget wins).
left=$((LIMIT_S - SECONDS))
exec timeout --signal=INT --kill-after=10 "$left" python3 benchmarks/gpu_check.py --budget $((left - 30)) "$@"
