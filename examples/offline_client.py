"""Reproduce a Quorum prediction with nothing but numpy, onnxruntime and the bundle's manifest.json.

This is the bundle contract seen from a client: verify the files, preprocess as the manifest
says, run the shared trunk if there is one (TreeNets), average the chosen modules' outputs,
then apply the combiner: softmax (classification; of the mean logits divided by the temperature
the manifest gives for that many modules), the targets' scale and shift (regression) or exp
(counts).

    python examples/offline_client.py bundles/demo --modules 3,17,42 --inputs runs/demo/example-request.json

`--inputs` takes a JSON file shaped like a /predict body, {"inputs": [[...], ...]}. Prints
{"probabilities": [[...], ...], "labels": [...], "p_correct": [...]} (classification; p_correct,
each answer's chance of being right, where the manifest has the map) or {"values": [[...], ...]}
as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort


def _session(bundle: Path, entry: dict, what: str) -> ort.InferenceSession:
    data = (bundle / entry["file"]).read_bytes()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise SystemExit(f"{what}: checksum mismatch; the file is corrupt")
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def predict(bundle: Path, x_raw: np.ndarray, module_ids: list[int]) -> np.ndarray:
    """What the sub-ensemble `module_ids` predicts for raw inputs (N, *input.shape): class
    probabilities (N, K), or values (N, D) for a regression or count bundle."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    spec = manifest["input"]
    channels = len(spec["mean"])
    axis_shape = (1, channels) + (1,) * (len(spec["shape"]) - 1) if channels > 1 else (1,)
    mean = np.asarray(spec["mean"], np.float32).reshape(axis_shape)
    std = np.asarray(spec["std"], np.float32).reshape(axis_shape)
    x = ((np.asarray(x_raw, np.float32) * np.float32(spec["scale"]) - mean) / std).astype(np.float32)
    if manifest.get("trunk"):  # shared layers: run once, the modules take their features
        x = _session(bundle, manifest["trunk"], "trunk").run(None, {spec["name"]: x})[0]

    outputs = [
        _session(bundle, manifest["modules"][j], f"module {j}").run([manifest["output"]["name"]], {spec["name"]: x})[0]
        for j in module_ids
    ]
    z = np.mean(np.stack(outputs), axis=0)  # every combiner starts from the mean of the modules' outputs
    out = manifest["output"]
    if out["combiner"] == "mean":  # regression: the targets were standardized for training
        return z * np.asarray(out["target_scale"], np.float32) + np.asarray(out["target_shift"], np.float32)
    if out["combiner"] == "mean_exp":  # counts: the mean log-rate
        return np.exp(z)
    conf = manifest.get("confidence")
    if conf:  # temperatures fitted at the stage lengths; log T is linear in log b between them
        b = np.log(len(module_ids))
        z = z / np.float32(np.exp(np.interp(b, np.log(conf["stages"]), np.log(conf["temperatures"]))))
    e = np.exp(z - z.max(axis=1, keepdims=True))  # classification: softmax of the (tempered) mean logits
    return e / e.sum(axis=1, keepdims=True)


def p_correct(manifest: dict, probabilities: np.ndarray, modules: int) -> list[float] | None:
    """The chance each answer of `modules` modules is right: the manifest's map of the calibrated
    top probability at the stages around that many modules, blended linearly in log b."""
    conf = manifest.get("confidence") or {}
    if not conf.get("correctness"):
        return None
    stages, maps, top = conf["stages"], conf["correctness"], probabilities.max(axis=1).astype(np.float64)
    pos = float(np.interp(np.log(modules), np.log(stages), np.arange(len(stages))))
    lo = int(pos)
    hi, w = min(lo + 1, len(stages) - 1), pos - lo
    at = [np.interp(top, maps[s]["top"], maps[s]["right"]) for s in (lo, hi)]
    return ((1 - w) * at[0] + w * at[1]).tolist()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path)
    p.add_argument("--modules", required=True, help="comma-separated module ids, e.g. the server's modules.used")
    p.add_argument("--inputs", required=True, type=Path, help='JSON file {"inputs": [[...], ...]}')
    args = p.parse_args()
    ids = [int(s) for s in args.modules.split(",") if s.strip()]
    x_raw = np.asarray(json.loads(args.inputs.read_text())["inputs"], np.float32)
    result = predict(args.bundle, x_raw, ids)
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    if manifest["task"]["kind"] != "classification":
        print(json.dumps({"values": result.tolist()}))
    else:
        right = p_correct(manifest, result, len(ids))
        print(json.dumps({"probabilities": result.tolist(), "labels": result.argmax(1).tolist(), "p_correct": right}))


if __name__ == "__main__":
    main()
