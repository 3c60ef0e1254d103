#!/usr/bin/env bash
# Make sure Fashion-MNIST's four IDX files are present; install Debian's package if not.
#   scripts/install-dataset.sh [DIR]    (default: /usr/share/datasets/fashion-mnist)
set -euo pipefail

default=/usr/share/datasets/fashion-mnist
dir="${1:-$default}"
files=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)

have_all() {
    for f in "${files[@]}"; do [[ -f "$dir/$f" ]] || return 1; done
}

have_all && exit 0
if [[ "$dir" != "$default" ]]; then
    echo "error: Fashion-MNIST files missing in $dir (QUORUM_DATA_DIR / DATA_DIR); expected ${files[*]}" >&2
    exit 1
fi
sudo=""
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || { echo "error: run as root: apt-get install -y dataset-fashion-mnist" >&2; exit 1; }
    sudo=sudo
fi
echo "Installing Debian's dataset-fashion-mnist into $default ..."
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null
have_all || { echo "error: dataset-fashion-mnist installed, but $dir still lacks the IDX files" >&2; exit 1; }
