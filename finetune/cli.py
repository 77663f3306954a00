"""The `finetune` command: parse arguments, load the pipeline, call the layer that does the work."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from finetune.training import Interrupted, TrainingDiverged

EXIT_CONFIG = 2
EXIT_DATA = 1
EXIT_INTERRUPTED = 130  # as a shell reports a program Ctrl-C stopped
INSECURE_HELP = "send the cluster token over plain http to a non-loopback address (anyone on the path can read it)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune", description="Fine-tune pretrained models on your data with Ray.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fine-tune as a pipeline file says")
    train.add_argument("pipeline", nargs="?", help="pipeline YAML file")
    train.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. optim.lr=3e-5")
    train.add_argument("--run-dir", help="where results go (default: a new folder under runs/)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a run whose driver died, from its last checkpoint")

    advise = commands.add_parser("advise", help="race the fine-tuning strategies on your data and say which to use")
    advise.add_argument("pipeline", help="pipeline YAML file (its strategy section is used when it is auto)")
    advise.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. strategy.budget=2")
    advise.add_argument("--dir", dest="folder", help="where the race goes (default: a new folder under runs/)")

    sweep = commands.add_parser("tune", help="hyperparameter sweep (Ray Tune, ASHA) over the pipeline's tune section")
    sweep.add_argument("pipeline", nargs="?", help="pipeline YAML file with a tune section")
    sweep.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. tune.num_samples=16")
    sweep.add_argument("--sweep-dir", help="where results go (default: a new folder under runs/)")
    sweep.add_argument("--resume", metavar="SWEEP_DIR", help="continue an interrupted sweep")
    sweep.add_argument("--retry-errored", action="store_true", help="with --resume: run errored trials again")

    submit = commands.add_parser("submit", help="run a pipeline on a Ray cluster as a Ray job")
    submit.add_argument("pipeline")
    submit.add_argument("overrides", nargs="*")
    submit.add_argument("--address", help="the cluster's dashboard URL (default: $RAY_ADDRESS, else a local head)")
    submit.add_argument("--tune", action="store_true", help="run `finetune tune` (a sweep) instead of train")
    submit.add_argument("--run-dir", help="train: the run folder on the cluster (shared storage)")
    submit.add_argument("--sweep-dir", help="tune: the sweep folder on the cluster (shared storage)")
    submit.add_argument("--wait", action="store_true", help="follow the logs; exit with the job's status")
    submit.add_argument("--allow-insecure", action="store_true", help=INSECURE_HELP)

    jobs = commands.add_parser("jobs", help="status, logs or stop of a submitted job")
    jobs.add_argument("action", choices=("status", "logs", "stop"))
    jobs.add_argument("job_id")
    jobs.add_argument("--address", help="the cluster's dashboard URL (default: $RAY_ADDRESS, else a local head)")
    jobs.add_argument("--follow", action="store_true", help="logs: follow until the job ends")
    jobs.add_argument("--allow-insecure", action="store_true", help=INSECURE_HELP)

    validate = commands.add_parser("validate", help="check a pipeline file without running it")
    validate.add_argument("pipeline")
    validate.add_argument("overrides", nargs="*")
    validate.add_argument("--lengths", action="store_true",
                          help="also read a sample of the training texts: their token lengths against data.max_length")

    evaluate = commands.add_parser("evaluate", help="metrics of a run's best model on a split")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--split", choices=("train", "val", "test"), default="test")

    report = commands.add_parser("report", help="(re)draw report.html of a run or a sweep directory")
    report.add_argument("folder", metavar="RUN_DIR|SWEEP_DIR")
    export = commands.add_parser("export", help="a run's best model as ONNX, torch.export (pt2) or a Hugging Face folder")
    export.add_argument("run_dir")
    export.add_argument("--format", default="onnx", help="onnx | pt2 | hf (default: onnx)")
    export.add_argument("--out", help="the folder to write (default: RUN_DIR/export/FORMAT)")
    export.add_argument("--quantize", help="int8: an int8 copy too (onnx), with its accuracy and latency change")
    serve = commands.add_parser("serve", help="an HTTP endpoint for a run's best model (Ray Serve)")
    serve.add_argument("run_dir")
    serve.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only); 0.0.0.0 exposes it")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--replicas", type=int, default=1, help="copies of the model answering requests")
    serve.add_argument("--max-batch-size", type=int, default=16, help="inputs run together (1: no batching)")
    serve.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a replica waits to fill a batch")
    serve.add_argument("--cpus-per-replica", type=float, default=1.0)
    serve.add_argument("--image-root", help="image models: the folder whose files requests may name by path")
    predict = commands.add_parser("predict", help="labels for texts or image files")
    predict.add_argument("run_dir")
    predict.add_argument("inputs", nargs="+", help="texts (text models) or image paths (image models)")
    predict.add_argument("--model", choices=["fine_tuned", "yardstick"], default="fine_tuned",
                         help="yardstick: the run's TF-IDF + linear model, fit on the same training rows")
    return parser


def _tune(args, console: Console) -> int:
    from finetune import api
    from finetune.config import ConfigError

    if args.resume and (args.pipeline or args.sweep_dir):
        raise ConfigError(["finetune tune --resume SWEEP_DIR takes no pipeline or --sweep-dir: it reruns the sweep's own"])
    if not args.resume and not args.pipeline:
        raise ConfigError(["finetune tune: give a pipeline file (or --resume SWEEP_DIR)"])
    if args.resume:
        result = api.tune(resume=args.resume, retry_errored=args.retry_errored, console=console)
    else:
        result = api.tune(args.pipeline, args.overrides, args.sweep_dir, console=console)
    return 0 if result.summary["best"] else EXIT_DATA  # no trial finished an epoch: their errors are above


def _jobs(args, console: Console) -> int:
    from finetune import jobs

    if args.command == "submit":
        from finetune.config import ConfigError
        from finetune.checks import load_pipeline

        cfg = load_pipeline(args.pipeline, args.overrides)  # mistakes stop here, not on the cluster
        if args.tune and cfg.tune is None:
            raise ConfigError([f"{args.pipeline} has no tune section: --tune needs tune.search_space"])
        extra = ["--sweep-dir", args.sweep_dir] if args.tune and args.sweep_dir else []
        extra += ["--run-dir", args.run_dir] if not args.tune and args.run_dir else []
        client, job_id = jobs.submit(Path(args.pipeline), args.overrides, address=args.address, tune=args.tune,
                                     extra=extra, allow_insecure=args.allow_insecure)  # fmt: skip
        console.print(f"submitted job {job_id}", highlight=False)
        if not args.wait:
            console.print(f"follow it with: finetune jobs logs {job_id} --follow", highlight=False)
            return 0
        try:
            status = jobs.follow(client, job_id)
        except KeyboardInterrupt:
            console.print(f"stopped following job {job_id}; it keeps running on the cluster. Follow it again with: "
                          f"finetune jobs logs {job_id} --follow; stop it with: finetune jobs stop {job_id}",
                          highlight=False, soft_wrap=True)  # fmt: skip
            return EXIT_INTERRUPTED
        console.print(f"job {job_id}: {status.value}", highlight=False)
        return jobs.exit_status(status)
    client = jobs.client(args.address, args.allow_insecure)
    if args.action == "status":
        info = client.get_job_info(args.job_id)
        console.print(f"{args.job_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""), highlight=False)
    elif args.action == "logs":
        if args.follow:
            return jobs.exit_status(jobs.follow(client, args.job_id))
        sys.stdout.write(client.get_job_logs(args.job_id))
    else:
        stopped = client.stop_job(args.job_id)
        console.print(f"{args.job_id}: {'stop requested' if stopped else 'not running'}", highlight=False)
    return 0


def _export(args, console: Console) -> int:
    from finetune import api
    from finetune.export import QUANTIZED, TOLERANCE, ExportCheckFailed, ExportOptionsError, check_options, model_bytes
    from finetune.report.progress import working

    try:
        check_options(args.format, args.quantize)  # before the model loads
        with working(Console(stderr=True), f"exporting to {args.format} and checking it on the run's test rows"):
            exported = api.export(args.run_dir, args.format, args.out, args.quantize)
    except ExportOptionsError as error:
        console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        return EXIT_CONFIG
    except ExportCheckFailed as error:
        console.print(f"[bold red]export check failed:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        return EXIT_DATA
    console.print(f"exported: {exported.file} ({model_bytes(exported.file) / 2**20:.1f} MiB)", highlight=False,
                  soft_wrap=True)  # fmt: skip
    console.print(f"checked on {exported.rows:,} {exported.split} rows: largest |logit difference| from the trained "
                  f"model {exported.max_abs_diff:.2g} (tolerance {TOLERANCE:g})", highlight=False)  # fmt: skip
    if exported.int8:
        fp32, int8 = exported.int8["fp32"], exported.int8["int8"]
        metrics = ", ".join(f"{name} {fp32['metrics'][name]:.4f} -> {value:.4f}" for name, value in int8["metrics"].items()
                            if not name.endswith(("/samples", "/loss")))  # fmt: skip
        latency = ", ".join(f"{key.replace('_', ' ')} {fp32['latency_ms'][key]:.1f} -> {value:.1f} ms"
                            for key, value in int8["latency_ms"].items())  # fmt: skip
        console.print(f"int8: {exported.folder / QUANTIZED} ({int8['bytes'] / 2**20:.1f} MiB, fp32 "
                      f"{fp32['bytes'] / 2**20:.1f}); {metrics}; latency {latency}", highlight=False, soft_wrap=True)  # fmt: skip
    console.print(f"how to use it: {exported.folder / 'export.json'}, {exported.folder / 'README.md'}", highlight=False,
                  soft_wrap=True)  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow the options (`train p.yaml --run-dir r optim.lr=1e-4`)
    if extra and hasattr(args, "overrides") and not any(arg.startswith("-") for arg in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    console = Console()
    from finetune import config as config_module

    try:
        if args.command == "tune":
            return _tune(args, console)
        if args.command in ("submit", "jobs"):
            return _jobs(args, console)
        from finetune import api

        if args.command == "train" and (args.resume or not args.pipeline):
            if not args.resume or args.pipeline or args.run_dir:
                raise config_module.ConfigError(["finetune train: give a pipeline file, or --resume RUN_DIR alone"])
            api.train(resume=args.resume, console=console)
        elif args.command == "train":
            api.train(args.pipeline, args.overrides, args.run_dir, console=console)
        elif args.command == "advise":
            api.advise(args.pipeline, args.overrides, args.folder, console=console)
        elif args.command == "validate":
            cfg = api.validate(args.pipeline, args.overrides)
            console.print(f"{args.pipeline}: valid")
            from finetune.checks import describe_batchnorm

            if note := describe_batchnorm(cfg):
                console.print(note, highlight=False, soft_wrap=True)
            if cfg.strategy.name == "auto":
                from finetune.checks import race_plan
                from finetune.strategies.auto import pipeline_lr

                plan = race_plan(cfg, pipeline_lr(config_module.read_raw(args.pipeline, args.overrides)))
                console.print(f"strategy race: {', '.join(c.label for c in plan.candidates)}; rungs at epoch "
                              f"{', '.join(map(str, plan.rungs))}; {plan.planned_epochs} candidate-epochs of "
                              f"{plan.budget_epochs:g}" + (f"; left out by the budget: {', '.join(plan.left_out)}"
                                                           if plan.left_out else ""), highlight=False, soft_wrap=True)  # fmt: skip
            if args.lengths:
                _print_token_lengths(cfg, console)
        elif args.command == "evaluate":
            from finetune.report.progress import working

            with working(Console(stderr=True), f"evaluating the best model on {args.split}"):  # stdout: the JSON alone
                metrics = api.evaluate(args.run_dir, args.split)
            console.print_json(json.dumps(metrics))
        elif args.command == "report":
            console.print(f"report: {api.report(args.folder)}", soft_wrap=True)
        elif args.command == "serve":
            from importlib.util import find_spec

            if find_spec("starlette") is None or find_spec("uvicorn") is None:
                console.print("[bold red]error:[/] finetune serve needs Ray Serve: pip install -e \".[serve]\"", highlight=False)
                return EXIT_CONFIG
            from finetune.serving import PortInUse

            try:
                api.serve(args.run_dir, host=args.host, port=args.port, replicas=args.replicas,
                          max_batch_size=args.max_batch_size, batch_wait_s=args.batch_wait_ms / 1000,
                          cpus_per_replica=args.cpus_per_replica, image_root=args.image_root, console=console)  # fmt: skip
            except PortInUse as error:
                console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
                return EXIT_CONFIG
        elif args.command == "export":
            return _export(args, console)
        elif args.command == "predict":
            for row in api.load(args.run_dir, args.model).predict(args.inputs):
                # one line per input, however long (a long text would wrap at the terminal's width)
                console.print(f"{row['text']}\t{row['input']}", highlight=False, markup=False, soft_wrap=True)
    except config_module.ConfigError as error:
        console.print("[bold red]invalid pipeline:[/]", highlight=False)
        for problem in error.problems:
            console.print(f"  - {problem}", highlight=False, markup=False, soft_wrap=True)
        return EXIT_CONFIG
    except (KeyboardInterrupt, Interrupted) as error:
        # fit() may still run in its thread: shutting Ray down here ends its workers with it
        import ray

        ray.shutdown()
        where = str(error) if isinstance(error, Interrupted) else "stopped"
        console.print(f"[bold yellow]interrupted:[/] {escape(where)}", highlight=False, soft_wrap=True)
        return EXIT_INTERRUPTED
    except TrainingDiverged as error:
        console.print(f"[bold red]training stopped:[/] {escape(str(error))}; lower optim.lr, or set "
                      "train.max_grad_norm / train.precision=fp32", highlight=False, soft_wrap=True)  # fmt: skip
        return EXIT_DATA
    except FileNotFoundError as error:
        console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        return EXIT_CONFIG
    except Exception as error:
        from finetune.data.rows import find_data_error

        data_error = find_data_error(error)
        if data_error is None:
            raise
        console.print(f"[bold red]data error:[/] {escape(str(data_error))}", highlight=False, soft_wrap=True)
        return EXIT_DATA
    return 0


def _print_token_lengths(cfg, console: Console) -> None:
    from finetune.data import token_lengths
    from finetune.ray_env import ensure_ray, quiet_ray_data
    from finetune.report.progress import working

    with working(console, "reading the training texts"):
        ensure_ray()
        quiet_ray_data()
        stats = token_lengths.measure(cfg)
    if stats is None:
        console.print("token lengths: an image pipeline has none", highlight=False)
        return
    console.print(token_lengths.describe(stats), highlight=False, soft_wrap=True)
    if warning := token_lengths.warning(stats, cfg.data.long_text):
        console.print(f"[bold yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)


if __name__ == "__main__":
    sys.exit(main())
