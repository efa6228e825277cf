"""What a generated token costs outside the graph replay (bench/NOTES.md v27).

``FastDecoder.generate`` times each step as the replay plus the work around it: the token copied into the graph's
input and the argmax over the logits, launched from the host between replays. Against replays alone over the same
positions (the position advances inside the graph), with the argmax only, and with the argmax and the copy, per
decoder: OPT-13B-shaped random weights, ours-dense and ours-sparse (0.1, 0.5) with int8 predictor rows, batch 1,
prompt 128, 127 steps, medians of three rounds; each decoder twice (the first built in a process runs slower,
v21).

    PYTHONPATH=src python bench/generate_overhead.py --out DIR [--model opt-13b]
"""

import argparse
import copy
import json
import os
import statistics

import torch

from dejavu.bench.decode import bench_spec, build_random_model, random_predictors
from dejavu.bench.hf_baseline import prompt_ids
from dejavu.runtime.fast_decode import FastDecoder


def replay_ms(dec: FastDecoder, ids, n: int, argmax: bool = False, copy_tok: bool = False) -> float:
    """Median ms per step of n replays after a prefill of ids; optionally each followed by the argmax (and the
    token copy before it) that generate() launches around a replay."""
    dec.prefill(ids)
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
    tok = torch.zeros(dec.batch, dtype=torch.long, device="cuda")
    for i in range(n):
        ev[i].record()
        if copy_tok:
            dec._tok.copy_(tok)
        dec._graph.replay()
        if argmax:
            tok = dec._graph_out.argmax(-1)
    ev[n].record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in zip(ev, ev[1:]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="opt-13b")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    os.makedirs(args.out, exist_ok=True)
    spec = bench_spec(args.model)
    model = build_random_model(spec)
    preds8 = copy.deepcopy(random_predictors(spec)).quantize_int8()
    ids = prompt_ids(spec.vocab_size, 1, 128, "cuda")
    res = {"gpu": torch.cuda.get_device_name(), "model": args.model, "unit": "ms per step, median of 3 rounds"}
    for label, p, md, hd in (("dense", None, 1.0, 1.0), ("sparse_int8", preds8, 0.1, 0.5), ("dense#2", None, 1.0, 1.0),
                             ("sparse_int8#2", preds8, 0.1, 0.5)):  # fmt: skip
        dec = FastDecoder(model, p, md, hd, batch=1, max_len=256, kv_policy="all" if p is None else "selected")
        dec.capture()
        dec.generate(ids, 4)
        r = {}
        for _ in range(3):
            r.setdefault("generate", []).append(statistics.median(dec.generate(ids, 128).step_ms))
            r.setdefault("replay", []).append(replay_ms(dec, ids, 127))
            r.setdefault("replay_argmax", []).append(replay_ms(dec, ids, 127, argmax=True))
            r.setdefault("replay_argmax_copy", []).append(replay_ms(dec, ids, 127, argmax=True, copy_tok=True))
        res[label] = {k: {"median": statistics.median(v), "rounds": v} for k, v in r.items()}
        print(label, {k: round(v["median"], 4) for k, v in res[label].items()}, flush=True)
        del dec
        torch.cuda.empty_cache()
    path = os.path.join(args.out, f"generate_overhead_{args.model}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(path + ".tmp", path)
    print("wrote", path)


if __name__ == "__main__":
    main()
