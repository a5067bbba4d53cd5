"""`lrpt`: the command line. Each verb is a thin call into the module that does the work;
everything else lives in the config (`lrpt train --help-config` lists every key)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from launcher import launch, slurm

EPILOG = """examples:
  lrpt train                                    # embedded default: micro model, generated corpus, CPU
  lrpt train configs/experiments/micro-relora.yaml train.max_steps=200
  lrpt train strategy.name=switchlora strategy.rank=16 run.dir=runs/sw
  lrpt data prepare corpus/*.txt --out data/mycorpus --vocab-size 8192
  lrpt data describe data/mycorpus
  lrpt launch configs/experiments/micro-relora.yaml --nodes 1 --gpus-per-node 2
  lrpt slurm submit configs/experiments/relora-130m.yaml --nodes 4 --gpus-per-node 8 --deepspeed zero2
  lrpt slurm status runs/relora-130m
  lrpt comm runs/full runs/relora --json
  lrpt frontier runs/* --bandwidth 0.1 --out runs/frontier
  lrpt eval runs/relora
  lrpt analyze runs/relora
  lrpt plot runs/full runs/relora --out plots/
  lrpt compare configs/experiments/micro-full.yaml configs/experiments/micro-relora.yaml --out runs/compare
  lrpt compare runs/full runs/relora --out runs/table      # existing run directories: no training
  lrpt export runs/relora hf/relora-micro
  lrpt bench --model micro --steps 20
  lrpt bench --model micro --steps 20 --link 100mbit --nodes 2 --nproc-per-node 2 --strategies full relora
  lrpt plan configs/experiments/relora-130m.yaml --nodes 1 --gpus-per-node 8 --gpu-memory 40GiB
"""


def cmd_train(a) -> int:
    if a.help_config:
        from trainer.config import describe
        print("\n".join(describe()))
        return 0
    from trainer.__main__ import main as train_main
    from trainer.errors import exit_process
    code = train_main(a.config)
    if "LOCAL_RANK" in os.environ:  # one process of a launched job: leave as `python -m trainer` does
        exit_process(code)
    return code


def cmd_data(a) -> int:
    from trainer import data
    if a.data_cmd == "prepare":
        out = data.prepare(a.sources, a.out, tokenizer_path=a.tokenizer, vocab_size=a.vocab_size,
                           val_fraction=a.val_fraction, text_field=a.text_field, hf_split=a.split,
                           hf_config=a.hf_config, max_documents=a.max_documents, overwrite=a.overwrite,
                           unit=a.unit, min_val_tokens=a.min_val_tokens, encoding=a.encoding,
                           skip_undecodable=a.skip_undecodable,
                           # Progress bars only on a terminal: the BPE trainer's bar writes
                           # blank lines to a redirected stdout.
                           progress=sys.stdout.isatty() and sys.stderr.isatty())
        print(data.describe(out))
        index = json.loads((out / "index.json").read_text())
        if index.get("val_topped_up"):
            print(f"validation: the hash picked too few documents; the last {index['val_topped_up']} were moved "
                  f"there to reach {a.min_val_tokens:,} tokens (--min-val-tokens)", file=sys.stderr)
        skipped = index.get("skipped", [])
        if skipped:
            print(f"skipped {len(skipped)} undecodable file(s): {'; '.join(skipped)}", file=sys.stderr)
        print(f"prepared: {out}\ntrain on it with: lrpt train data.source={out}")
    else:
        print(data.describe(a.path))
    return 0


def cmd_eval(a) -> int:
    from trainer.evaluate import evaluate_checkpoint
    result = evaluate_checkpoint(a.path, data_dir=a.data, pairs=a.pairs, device=a.device)
    if a.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"checkpoint {result['checkpoint']} (step {result['step']})")
    print(f"  validation loss   {result['val_loss']:.4f}   perplexity {result['val_ppl']:.2f}")
    if "blimp_acc" in result:
        print(f"  minimal pairs     {100 * result['blimp_acc']:.1f}% overall")
        phenomena = {k.split("/", 1)[1]: v for k, v in result.items() if k.startswith("blimp/")}
        width = max(map(len, phenomena), default=0)
        for name, acc in phenomena.items():
            print(f"    {name:{width}s}  {100 * acc:5.1f}%")
    return 0


def _check_run_dirs(paths: list[str]) -> None:
    """Fail in one line on a path that is no run directory (the tools would quietly do nothing)."""
    from trainer.rundir import RunDir
    for path in paths:
        if not RunDir(path).is_run():
            raise FileNotFoundError(f"{path!r} is not a run directory (no metrics.jsonl)")


def cmd_analyze(a) -> int:
    _check_run_dirs(a.runs)
    from trainer.dynamics import analyze_run
    for run in a.runs:
        rows = analyze_run(run)
        print(f"{run}: {len(rows)} checkpoints analysed -> {run}/dynamics.jsonl")
    return 0


def cmd_plot(a) -> int:
    _check_run_dirs(a.runs)
    from reports.plots import plot_runs
    for path in plot_runs(a.runs, a.out):
        print(path)
    return 0


def cmd_export(a) -> int:
    from trainer.export import export_hf
    out = export_hf(a.checkpoint, a.out)
    print(f"exported to {out}: load with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


def cmd_comm(a) -> int:
    from reports import comm
    rows = comm.comm_report(a.runs, bandwidths_gbit=a.bandwidth, world_size=a.world_size, full_rank_run=a.full,
                            procs_per_node=a.gpus_per_node)
    print(json.dumps(rows, indent=1) if a.json else comm.format_table(rows))
    if a.plot:
        comm.plot_comm(rows, a.plot)
    return 0


def cmd_frontier(a) -> int:
    _check_run_dirs(a.runs)
    from reports import frontier
    gbit = a.bandwidth
    if a.link:
        from launcher.netns import TC_RATE
        m = TC_RATE.match(a.link.lower())
        if not m:
            print(f"error: --link {a.link!r}: expected a rate such as 100mbit, 1gbit or 500kbit", file=sys.stderr)
            return 2
        gbit = float(m.group(1)) * {"": 1e-9, "k": 1e-6, "m": 1e-3, "g": 1}[m.group(2)]
    points = frontier.frontier(a.runs, world_size=a.world_size, bandwidth_gbit=gbit)
    print(json.dumps(points, indent=1) if a.json else frontier.format_table(points))
    if a.out:
        for path in frontier.write(points, a.out):
            print(path, file=sys.stderr if a.json else sys.stdout)
    return 0


def cmd_launch(a) -> int:
    return launch.main(a)


def cmd_slurm(a) -> int:
    return slurm.main(a)


def cmd_compare(a) -> int:
    from launcher.compare import compare
    compare(a.configs, out=a.out, overrides=a.set or [])
    return 0


def cmd_plan(a) -> int:
    from launcher import plan
    return plan.main(a)


def cmd_bench(a) -> int:
    from launcher.bench import bench
    try:
        return bench(a)
    except (ValueError, PermissionError, RuntimeError) as e:  # a bad --link, or no namespace allowed here
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the jobs are killed and the namespaces removed on the way out
        print("lrpt bench: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    from trainer.data.prepare import MIN_VAL_TOKENS
    from trainer.data.sources import UNITS
    p = argparse.ArgumentParser(prog="lrpt", description="Pretrain LLaMA-style models full-rank or low-rank "
                                "(LoRA, ReLoRA, SwitchLoRA) and measure the communication saved.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", metavar="VERB")

    t = sub.add_parser("train", help="train in this process (resumes from the run directory's latest checkpoint)",
                       description="Train one run in this process. CONFIG is a YAML file holding only what differs "
                       "from the defaults; key=value pairs override it. Under `accelerate launch` or torchrun each "
                       "process runs this. Exit code 85 means preempted with a checkpoint written.")
    t.add_argument("config", nargs="*", metavar="[CONFIG] [key=value]")
    t.add_argument("--help-config", action="store_true", help="list every config key with its default")
    t.set_defaults(fn=cmd_train)

    d = sub.add_parser("data", help="prepare or describe token shards")
    dsub = d.add_subparsers(dest="data_cmd", required=True)
    dp = dsub.add_parser(
        "prepare", help="text files or a Hugging Face dataset -> BPE -> packed shards",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Tokenize text into a prepared directory for data.source=DIR. Documents: in a .txt file "
        "one per paragraph (lines up to a blank line) by default, or one per line, or the whole file "
        "(--unit); in .jsonl/.parquet/HF datasets one per row (--text-field). Whole documents go to the "
        "validation split (--val-fraction, chosen by hash); if that gives fewer than --min-val-tokens, "
        "the last training documents are moved there, and a corpus too small even for that is refused.")
    dp.add_argument("sources", nargs="+", help=".txt/.jsonl/.parquet files, directories, or a HF dataset name")
    dp.add_argument("--out", required=True, help="output directory")
    dp.add_argument("--unit", choices=UNITS, default="paragraph", help="what one document of a .txt file is")
    dp.add_argument("--tokenizer", help="an existing tokenizer.json; without one a byte-level BPE is trained")
    dp.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary when training a tokenizer")
    dp.add_argument("--val-fraction", type=float, default=0.005, help="share of documents held out for validation")
    dp.add_argument("--min-val-tokens", type=int, default=MIN_VAL_TOKENS,
                    help="validation tokens at least (one evaluation batch at the default batch_size x seq_len)")
    dp.add_argument("--text-field", default="text", help="JSON field / column holding the text")
    dp.add_argument("--split", default="train", help="HF dataset split")
    dp.add_argument("--hf-config", default=None, help="HF dataset configuration name")
    dp.add_argument("--max-documents", type=int, default=None, help="stop after this many documents")
    dp.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    dp.add_argument("--encoding", default="utf-8", help="text encoding of .txt/.jsonl files")
    dp.add_argument("--skip-undecodable", action="store_true",
                    help="leave out files that do not decode (or hold NUL bytes) instead of refusing; counted")
    dd = dsub.add_parser("describe", help="summarise a prepared directory")
    dd.add_argument("path")
    d.set_defaults(fn=cmd_data)

    e = sub.add_parser("eval", help="perplexity and minimal-pair accuracy of a run or checkpoint")
    e.add_argument("path", help="run directory or checkpoint folder")
    e.add_argument("--data", help="prepared data directory (default: the run's)")
    e.add_argument("--pairs", help="BLiMP-format JSONL file or directory (default: the embedded corpus's)")
    e.add_argument("--device", default="cpu")
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=cmd_eval)

    an = sub.add_parser("analyze", help="learning dynamics (PER, condition numbers) over a run's checkpoints")
    an.add_argument("runs", nargs="+")
    an.set_defaults(fn=cmd_analyze)

    pl = sub.add_parser("plot", help="PNG plots of one or more runs, overlaid")
    pl.add_argument("runs", nargs="+")
    pl.add_argument("--out", required=True)
    pl.set_defaults(fn=cmd_plot)

    ex = sub.add_parser("export", help="merge adapters and write a Hugging Face Llama checkpoint")
    ex.add_argument("checkpoint", help="run directory or checkpoint folder")
    ex.add_argument("out")
    ex.set_defaults(fn=cmd_export)

    c = sub.add_parser("comm", help="measured vs analytic communication per step, saving vs full-rank")
    c.add_argument("runs", nargs="+", help="run directories, or YAML configs for an analytic-only estimate")
    c.add_argument("--json", action="store_true")
    c.add_argument("--plot", help="write a bar chart PNG here")
    c.add_argument("--full", help="a full-rank run of the same model to measure the saving against")
    c.add_argument("--bandwidth", type=float, nargs="+", default=[25, 100, 400],
                   help="Gbit/s of a node's link to the others, to project at")
    c.add_argument("--world-size", type=int, help="also project for this many ranks")
    c.add_argument("--gpus-per-node", type=int,
                   help="ranks per node for a config (default: distributed.procs_per_node, else 1); a run records its own")
    c.set_defaults(fn=cmd_comm)

    fr = sub.add_parser("frontier", help="validation loss against bytes (or seconds) per step, Pareto-optimal "
                        "runs marked; a table, and frontier.png with --out",
                        description="Each run at the largest token count where every run has a validation "
                        "loss. x: sync bytes per step per rank averaged over the run so far (one-process runs: "
                        "the analytic model at --world-size); with --bandwidth or --link, projected seconds per "
                        "step (measured compute + wire bytes over the link). A run is Pareto-optimal unless "
                        "another has lower-or-equal x and loss, one strictly lower.")
    fr.add_argument("runs", nargs="+", help="run directories")
    link = fr.add_mutually_exclusive_group()
    link.add_argument("--bandwidth", type=float, metavar="GBIT", help="x: projected seconds per step at this Gbit/s")
    link.add_argument("--link", metavar="RATE", help="the same as a tc rate: 100mbit, 1gbit")
    fr.add_argument("--world-size", type=int, default=2, help="processes to place one-process runs at (analytic)")
    fr.add_argument("--out", help="write frontier.md and frontier.png here")
    fr.add_argument("--json", action="store_true", help="one object per run: run, label, bytes_per_step, "
                    "val_loss, tokens, pareto, and the table's other figures")
    fr.set_defaults(fn=cmd_frontier)

    la = sub.add_parser("launch", help="compose and run `accelerate launch` for one node of a run")
    la.set_defaults(fn=cmd_launch)
    launch.add_arguments(la)

    sl = sub.add_parser("slurm", help="submit a run to SLURM or show its status")
    sl.set_defaults(fn=cmd_slurm)
    slurm.add_arguments(sl)

    co = sub.add_parser("compare", help="train several configs at one token budget and tabulate them, "
                        "or tabulate existing run directories")
    co.add_argument("configs", nargs="+", metavar="CONFIG|RUN_DIR",
                    help="YAML configs, one sweep file from configs/experiments/, or run directories "
                    "(tabulated as they are: nothing is trained)")
    co.add_argument("--out", required=True, help="directory for the runs, table and plots")
    co.add_argument("--set", nargs="*", action="extend", metavar="key=value", help="overrides applied to every run")
    co.set_defaults(fn=cmd_compare)

    b = sub.add_parser("bench", help="speed and memory per strategy: tokens/s, step time, peak memory, MFU; "
                       "--link: seconds on a shaped slow link",
                       description="Each strategy trains in a fresh process (a STRATEGY may carry overrides: "
                       "full:distributed.comm_hook=bf16). Without --link: median tokens/s and step time after warm-up, "
                       "peak memory, MFU (null on CPU), trainable share. With --link RATE: a gloo job per strategy "
                       "over a rate-limited network: step time, exposed comm time (step time minus a 1-process "
                       "run's), payload and wire bytes per step, final validation loss, time to --target-loss; "
                       "with --nodes 2, two nodes joined by the shaped link and the bytes that crossed it, "
                       "counted and as the kernel saw them.")
    b.add_argument("--model", default="micro")
    b.add_argument("--strategies", nargs="+", default=["full", "lora", "relora", "switchlora"])
    b.add_argument("--steps", type=int, default=20)
    b.add_argument("--set", nargs="*", action="extend", metavar="key=value", default=[])
    b.add_argument("--json", action="store_true", help="print a JSON list, one object per strategy")
    b.add_argument("--link", metavar="RATE", help="run each strategy as a multi-process gloo job over a link "
                   "rate-limited to RATE (tc syntax: 100mbit, 1gbit) in private network namespaces (needs root)")
    b.add_argument("--nodes", type=int, default=1, help="with --link: 1 (a shaped loopback) or 2 (two network "
                   "namespaces joined by a veth pair shaped in both directions; unshaped inside each)")
    b.add_argument("--nproc-per-node", "--nproc", type=int, default=2, dest="nproc_per_node",
                   help="processes per node with --link")
    b.add_argument("--target-loss", type=float, help="with --link: report the seconds to reach this validation loss")
    b.add_argument("--out", help="keep the run directories here (e.g. for `lrpt plot`), not in a temporary folder")
    b.set_defaults(fn=cmd_bench)

    pn = sub.add_parser("plan", help="GPU memory per category, whether a run fits, the smallest change that does",
                        description="Bytes per GPU by category (weights, masters, gradients, optimizer states, "
                        "buffers, activations, ...) for a config on --nodes x --gpus-per-node under its engine, "
                        "the peak of a step, whether it fits --gpu-memory and if not the smallest change that "
                        "fits (frozen_dtype, ZeRO stage, activation checkpointing, micro-batch). Computed from "
                        "the model built on the meta device: nothing is allocated.")
    from launcher import plan
    plan.add_arguments(pn)
    pn.set_defaults(fn=cmd_plan)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from trainer.errors import exit_code, message, one_line_warnings
    one_line_warnings()
    try:
        parser = build_parser()
        args = parser.parse_args(argv)  # --help prints: a closed pipe can strike here too
        if not getattr(args, "fn", None):
            parser.print_help()
            return 0
        return args.fn(args) or 0
    except BrokenPipeError:
        # The reader left (`lrpt ... | head -1`): what is left to print has nowhere to go, and
        # the interpreter's final flush must not fail on the closed pipe either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a writer killed by a closed pipe
    except Exception as e:  # noqa: BLE001 - expected errors get one line, bugs their traceback
        code = exit_code(e)
        if code is None:
            raise
        print(message(e), file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
