"""Reproduce a Quorum prediction with nothing but numpy, onnxruntime and the bundle's manifest.json.

This is the bundle contract seen from a client: verify the module files, preprocess as the
manifest says, average the chosen modules' logits, softmax.

    python examples/offline_client.py bundles/demo --modules 3,17,42 --inputs runs/demo/example-request.json

`--inputs` takes a JSON file shaped like a /predict body, {"inputs": [[...], ...]}. Prints
{"probabilities": [[...], ...], "labels": [...]} as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort


def predict(bundle: Path, x_raw: np.ndarray, module_ids: list[int]) -> np.ndarray:
    """Probabilities (N, K) of the sub-ensemble `module_ids`, from raw inputs (N, *input.shape)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    spec = manifest["input"]
    channels = len(spec["mean"])
    axis_shape = (1, channels) + (1,) * (len(spec["shape"]) - 1) if channels > 1 else (1,)
    mean = np.asarray(spec["mean"], np.float32).reshape(axis_shape)
    std = np.asarray(spec["std"], np.float32).reshape(axis_shape)
    x = ((np.asarray(x_raw, np.float32) * np.float32(spec["scale"]) - mean) / std).astype(np.float32)

    logits = []
    for j in module_ids:
        entry = manifest["modules"][j]
        data = (bundle / entry["file"]).read_bytes()
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise SystemExit(f"module {j}: checksum mismatch; the file is corrupt")
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        logits.append(session.run([manifest["output"]["name"]], {spec["name"]: x})[0])
    z = np.mean(np.stack(logits), axis=0)  # combiner: mean of logits, then softmax
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path)
    p.add_argument("--modules", required=True, help="comma-separated module ids, e.g. the server's modules.used")
    p.add_argument("--inputs", required=True, type=Path, help='JSON file {"inputs": [[...], ...]}')
    args = p.parse_args()
    ids = [int(s) for s in args.modules.split(",") if s.strip()]
    x_raw = np.asarray(json.loads(args.inputs.read_text())["inputs"], np.float32)
    probs = predict(args.bundle, x_raw, ids)
    print(json.dumps({"probabilities": probs.tolist(), "labels": probs.argmax(1).tolist()}))


if __name__ == "__main__":
    main()
