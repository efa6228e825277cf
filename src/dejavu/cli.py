"""The `dejavu` command: calibrate | eval | generate | demo | bench."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

DEFAULT_DEMO_DIR = "runs/demo"


def _percent(s: str) -> float:
    try:
        v = float(s.rstrip("%")) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number or a percentage like 1%") from None
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"{s!r}: the budget must be between 0 and 100% (e.g. 1%)")
    return v


def _density(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"density {s} is outside (0, 1]: 1 = dense, 0.25 = keep a quarter")
    return v


def _levels(s: str) -> tuple[float, ...]:
    return tuple(_density(x) for x in s.split(",") if x.strip())


def _layers(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: expected comma-separated layer indices like 0,-1") from None


def _device(name: str):
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but no CUDA GPU is visible")
    return name


def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _common(p, model=True):
    if model:
        p.add_argument("--model", default=None, help="HF folder, hub id or .gguf file (default: embedded SmolLM2-135M)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout (logs go to stderr)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _calib_args(p):
    p.add_argument("--data", default=None, help="JSON-lines file with a 'text' field (default: model-generated text)")
    p.add_argument("--docs", type=int, default=500, help="calibration documents (paper: 500 C4 documents)")
    p.add_argument("--eval-docs", type=int, default=100, help="documents at the end of --data kept apart for eval")
    p.add_argument("--holdout-docs", type=int, default=32, help="documents kept apart for the operating-point search")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--tokens-per-doc", type=int, default=32, help="recorded token positions per document")
    p.add_argument("--mlp-rank", type=int, default=None)
    p.add_argument("--head-rank", type=int, default=None)
    p.add_argument("--predictor-input", choices=["lookahead", "half", "same"], default="lookahead",
                   help="lookahead: layer l's input scores layer l+1 (default); half: the paper's scheme (neurons from "
                        "the same layer's input, heads from the previous MLP's input); same: inline")
    p.add_argument("--mlp-label-frac", type=_density, default=0.5, help="SwiGLU neuron label: top fraction by |act|")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--max-ppl-increase", type=_percent, default=0.01, help="quality budget, e.g. 1%% (default)")
    p.add_argument("--mode", choices=["topk", "threshold"], default="topk",
                   help="fixed top-k per layer (CUDA-graph friendly) or per-token thresholds")
    p.add_argument("--kv-policy", choices=["all", "selected"], default="all")
    p.add_argument("--dense-layers", type=_layers, default=(), help="layers kept dense, e.g. 0,-1")
    p.add_argument("--mlp-levels", type=_levels, default=None, help="candidate MLP densities, e.g. 0.8,0.65,0.5")
    p.add_argument("--head-levels", type=_levels, default=None, help="candidate head densities")
    p.add_argument("--holdout-windows", type=int, default=16)
    p.add_argument("--holdout-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dejavu", description="Contextual sparsity (Deja Vu) for faster LLM decoding")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("calibrate", help="record activations, train predictors, choose the operating point")
    _common(p)
    _calib_args(p)
    p.add_argument("--out", required=True, help="output directory (resumes an interrupted run)")

    p = sub.add_parser("eval", help="dense vs sparse quality on the same tokens (perplexity, tasks, baselines)")
    _common(p)
    p.add_argument("--predictors", required=True, help="directory written by `dejavu calibrate`")
    p.add_argument("--data-dir", default=None, help="evaluation data (default: $DEJAVU_DATA or ../shared/data)")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--wikitext-windows", type=int, default=None, help="first N windows (default: the whole file)")
    p.add_argument("--c4-docs", type=int, default=100)
    p.add_argument("--tasks", default="copa,cb,rte,piqa,openbookqa")
    p.add_argument("--limit", type=int, default=None, help="first N documents per task")
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--no-baselines", action="store_true", help="skip the oracle / TEAL rows and the sweep")
    p.add_argument("--sweep-windows", type=int, default=8)
    p.add_argument("--int8-predictors", action="store_true",
                   help="also score with the predictors rounded to int8 rows (a sparse_int8 column: what the GPU "
                        "decode reads with --int8-predictors)")
    p.add_argument("--out", default=None, help="write OUT.json, OUT.md and OUT.png")

    p = sub.add_parser("generate", help="stream a sparse continuation; ends with tokens/s and achieved density")
    _common(p)
    p.add_argument("--predictors", default=None, help="predictor directory (default: dense)")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--mlp-density", type=_density, default=None, help="override: uniform MLP density (top-k)")
    p.add_argument("--head-density", type=_density, default=None, help="override: uniform head density (top-k)")
    p.add_argument("--int8-predictors", action="store_true",
                   help="round the predictors' factors to int8 rows (half their bytes; the GPU decode reads int8)")

    p = sub.add_parser("demo", help="the main job on the embedded model: calibrate, choose, evaluate, generate")
    _common(p, model=False)
    p.add_argument("--out", default=DEFAULT_DEMO_DIR)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--docs", type=int, default=32)
    p.add_argument("--max-ppl-increase", type=_percent, default=0.02)

    from .bench.decode import add_arguments as bench_arguments

    bench_arguments(sub.add_parser("bench", help="GPU decode benchmark: HF, ours-dense, ours-sparse, with the roofline"))
    return ap


class _Log:
    def __init__(self, to_stderr: bool):
        self.stream = sys.stderr if to_stderr else sys.stdout

    def __call__(self, *a):
        print(*a, file=self.stream, flush=True)


def _load(args, log):
    import torch

    from .models.load import load_model

    torch.set_grad_enabled(False)
    t = time.perf_counter()
    lm = load_model(getattr(args, "model", None), dtype=_dtype(args.dtype), device=_device(args.device))
    log(f"loaded {lm.spec.name} ({lm.spec.arch}, {lm.spec.n_layers} layers, d={lm.spec.d_model}) on "
        f"{lm.model.device} in {time.perf_counter() - t:.0f} s")
    return lm


def cmd_calibrate(args, log):
    from .pipeline import CalibrateConfig, run_calibrate

    if args.data is not None and not Path(args.data).is_file():
        raise SystemExit(f"error: --data {args.data}: file not found")
    lm = _load(args, log)
    cfg = CalibrateConfig(data=args.data, docs=args.docs, eval_docs=args.eval_docs, holdout_docs=args.holdout_docs,
                          max_len=args.max_len, tokens_per_doc=args.tokens_per_doc, mlp_rank=args.mlp_rank,
                          head_rank=args.head_rank, input_scheme=args.predictor_input, mlp_label_frac=args.mlp_label_frac, epochs=args.epochs,
                          max_ppl_increase=args.max_ppl_increase, mode=args.mode, kv_policy=args.kv_policy,
                          dense_layers=args.dense_layers, holdout_windows=args.holdout_windows,
                          holdout_len=args.holdout_len, mlp_levels=args.mlp_levels, head_levels=args.head_levels,
                          seed=args.seed, progress=not args.no_progress)
    meta = run_calibrate(lm, args.out, cfg, log=log)
    return {"out": args.out, "operating_point": {k: meta["operating_point"][k] for k in
            ("mode", "mlp_density", "head_density", "holdout_ppl_increase", "bytes")}, "metrics": meta["metrics"]}


def _predictors(path, lm):
    from .predictors.model import PredictorSet

    return PredictorSet.load(path, lm.spec).to(lm.model.device)


def cmd_eval(args, log, command=None):
    from .eval.tasks import DEFAULT_TASKS
    from .quality import EvalConfig, plot, run_eval, to_markdown

    tasks = tuple(t for t in args.tasks.split(",") if t)
    bad = [t for t in tasks if t not in DEFAULT_TASKS]
    if bad:
        raise SystemExit(f"error: unknown task(s) {bad}; choose from {', '.join(DEFAULT_TASKS)}")
    lm = _load(args, log)
    ps = _predictors(args.predictors, lm)
    cfg = EvalConfig(window=args.window, wikitext_windows=args.wikitext_windows, c4_docs=args.c4_docs, tasks=tasks,
                     task_limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                     baselines=not args.no_baselines, sweep_windows=args.sweep_windows, data_dir=args.data_dir,
                     progress=not args.no_progress, int8_predictors=args.int8_predictors)
    r = run_eval(lm, ps, cfg, log=log)
    r["command"] = command or "dejavu " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    md = to_markdown(r, r["command"])
    if args.out:
        from .atomic import write_json_atomic, write_text_atomic

        out = Path(args.out)
        write_json_atomic(out.with_suffix(".json"), r)
        write_text_atomic(out.with_suffix(".md"), md)
        if "sweep" in r and plot(r, out.with_suffix(".png")):
            log(f"wrote {out.with_suffix('.png')}")
        log(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    if not args.json:
        log(md)
    return r


def cmd_generate(args, log):
    from . import sparsify

    lm = _load(args, log)
    if args.predictors:
        ps = _predictors(args.predictors, lm)
        sparsify(lm.model, ps.quantize_int8() if args.int8_predictors else ps, mlp_density=args.mlp_density,
                 head_density=args.head_density)
    elif args.mlp_density or args.head_density or args.int8_predictors:
        raise SystemExit("error: --mlp-density/--head-density/--int8-predictors need --predictors DIR")
    return _run_generate(lm, args)


def _run_generate(lm, args):
    """Stream a continuation of args.prompt with the model's (possibly sparse) decode."""
    import torch

    from .runtime.generate import generate

    model, tok = lm.model, lm.tokenizer
    ids = torch.tensor([tok(args.prompt)["input_ids"]], device=model.device)
    if model.sparsity is not None:
        model.sparsity.reset_stats()
    pieces: list[int] = []
    printed = [0]
    stream = not args.json

    def on_token(t):
        pieces.append(int(t[0]))
        if stream:
            text = tok.decode(pieces, skip_special_tokens=True)
            sys.stdout.write(text[printed[0]:])
            sys.stdout.flush()
            printed[0] = len(text)

    if stream:
        sys.stdout.write(args.prompt)
    res = generate(model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   eos_id=tok.eos_token_id, on_token=on_token)
    out = {"prompt": args.prompt, "text": tok.decode(pieces, skip_special_tokens=True), "new_tokens": res.n_new,
           "tokens_per_s": res.tokens_per_second, "device": str(model.device)}
    if model.sparsity is not None:
        ach = model.sparsity.achieved()
        out["mlp_density"] = sum(ach["mlp"]) / len(ach["mlp"])
        out["head_density"] = sum(ach["heads"]) / len(ach["heads"])
    if stream:
        dens = (f", achieved MLP density {out['mlp_density']:.3f}, head density {out['head_density']:.3f}"
                if "mlp_density" in out else ", dense")
        print(f"\n[{res.n_new} tokens, {out['tokens_per_s']:.1f} tokens/s on {model.device}{dens}]")
    return out


def cmd_demo(args, log):
    from .eval.data import DataError, resolve_data_dir
    from .pipeline import CalibrateConfig, run_calibrate
    from .quality import EvalConfig, run_eval, to_markdown

    t0 = time.perf_counter()
    lm = _load(args, log)
    try:
        data_dir = resolve_data_dir(args.data_dir)
        c4 = data_dir / "c4" / "c4_train_sample.jsonl"
        data = str(c4) if c4.is_file() else None
    except (DataError, FileNotFoundError):
        data_dir, data = None, None
    log(f"[1/4] calibrate on {data or 'text the model generates itself (no corpus found)'}")
    # small settings so that the whole demo fits in a few minutes on 2 CPU cores; see README for the full run
    cfg = CalibrateConfig(data=data, docs=args.docs, holdout_docs=4, max_len=192, tokens_per_doc=48, epochs=10,
                          max_ppl_increase=args.max_ppl_increase, holdout_windows=2, holdout_len=256,
                          mlp_levels=(0.7, 0.5), head_levels=(0.67,), progress=not args.no_progress)
    meta = run_calibrate(lm, args.out, cfg, log=log)
    result = {"calibrate": {"operating_point": meta["operating_point"]["bytes"]}}
    if data_dir is not None:
        log("[2/4] evaluate a quick slice (dense and sparse on the same tokens)")
        from .predictors.model import PredictorSet

        ps = PredictorSet.load(args.out, lm.spec).to(lm.model.device)
        ecfg = EvalConfig(window=512, wikitext_windows=4, c4_docs=8, task_limit=20, tasks=("copa", "piqa"),
                          baselines=False, sweep_windows=0, fidelity_windows=1, data_dir=str(data_dir),
                          progress=not args.no_progress)
        r = run_eval(lm, ps, ecfg, log=log)
        log(to_markdown(r, "dejavu demo (quick slice: 4 WikiText-2 windows, 20 docs of COPA and PIQA)"))
        result["eval"] = r
    else:
        log("[2/4] no evaluation data found (set DEJAVU_DATA or --data-dir): skipping the quality slice")
    log("[3/4] generate (sparse decode)")
    gargs = argparse.Namespace(model=None, device=args.device, dtype=args.dtype, json=args.json,
                               no_progress=args.no_progress, predictors=args.out, prompt="The history of the city begins",
                               max_new_tokens=40, temperature=0.0, top_k=None, mlp_density=None, head_density=None)
    from . import sparsify

    sparsify(lm.model, _predictors(args.out, lm))
    result["generate"] = _run_generate(lm, gargs)
    log(f"[4/4] done in {time.perf_counter() - t0:.0f} s; predictors and operating point in {args.out}")
    return result


def cmd_bench(args, log):
    """Same options as ``python -m dejavu.bench.decode`` (see that module)."""
    from .bench.decode import main as bench_main

    return bench_main(args, log)


COMMANDS = {"calibrate": cmd_calibrate, "eval": cmd_eval, "generate": cmd_generate, "demo": cmd_demo, "bench": cmd_bench}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    log = _Log(to_stderr=getattr(args, "json", False))
    try:
        result = COMMANDS[args.cmd](args, log)
    except KeyboardInterrupt:
        log("interrupted: finished shards are kept; re-run the same command to resume")
        return 130
    except (ValueError, FileNotFoundError) as e:
        log(f"error: {e}")
        return 2
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
