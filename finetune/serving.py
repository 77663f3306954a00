"""`finetune serve RUN_DIR`: a run's best model behind an HTTP endpoint on Ray Serve, with replicas
and dynamic batching (requests that arrive together run as one batch).

  POST /predict  {"inputs": ["a text", ...]}                          (text models)
                 {"inputs": [{"base64": "<image file's bytes>"}, "photo.jpg", ...]}   (image models;
                 a path is read under --image-root only)
             ->  {"predictions": [what `finetune predict` prints, as JSON: label, probability,
                  probabilities, labels, value, text], ...}
  GET  /health   {"status": "ok", "task", "labels", "inputs"}

A request Serve cannot answer gets a 4xx with {"error": "..."} naming what to fix.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from finetune.data import DataError

APP = "finetune"
MAX_INPUTS = 256  # per request: a larger one is refused (split it), so one client cannot hold a replica


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"  # loopback: reachable from this machine only; 0.0.0.0 exposes it
    port: int = 8000
    replicas: int = 1
    max_batch_size: int = 16  # 1: no batching
    batch_wait_s: float = 0.01  # how long a replica waits to fill a batch
    cpus_per_replica: float = 1.0
    image_root: str | None = None  # the folder whose image paths requests may name


class BadRequest(ValueError):
    pass


class PortInUse(OSError):
    """The address `finetune serve` was asked to listen on is taken (exit status 2)."""


def check_port(host: str, port: int) -> None:
    """Refuse a taken port before Serve starts: Serve's proxy would fail to bind in the background
    while the application itself comes up, and requests would reach whatever holds the port."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as error:
            raise PortInUse(f"{host}:{port} is not free ({error.strerror}): pick another with --port") from None


@serve.deployment
class Predictor:
    """One replica: the run's model, loaded once; requests' inputs batched across requests."""

    def __init__(self, run_dir: str, options: ServeOptions) -> None:
        import torch

        from finetune.inference import load_run

        torch.set_num_threads(max(1, int(options.cpus_per_replica)))
        self.run_dir = run_dir
        self.saved = load_run(run_dir)[1]
        self.image_root = Path(options.image_root).resolve() if options.image_root else None
        self.predict_batch.set_max_batch_size(options.max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(options.batch_wait_s)

    @serve.batch
    async def predict_batch(self, inputs: list) -> list[dict]:
        """One forward pass for the inputs of every request waiting; an input the model cannot
        read fails its own request only."""
        from finetune.inference import predict_with

        try:
            return await asyncio.to_thread(predict_with, self.saved, inputs)
        except DataError as error:
            if len(inputs) == 1:
                return [error]
        return [await self._one(item) for item in inputs]

    async def _one(self, item) -> dict | DataError:
        from finetune.inference import predict_with

        try:
            return (await asyncio.to_thread(predict_with, self.saved, [item]))[0]
        except DataError as error:
            return error

    async def __call__(self, request: Request) -> JSONResponse:
        route = request.url.path.rstrip("/") or "/"
        if route == "/health":
            return JSONResponse({"status": "ok", "run_dir": self.run_dir, "task": self.saved.task.type,
                                 "labels": self.saved.label_names, "inputs": self.saved.preprocessor.kind})  # fmt: skip
        if route != "/predict":
            return JSONResponse({"error": f"no route {route}: POST /predict or GET /health"}, status_code=404)
        if request.method != "POST":
            return JSONResponse({"error": "/predict takes a POST with a JSON body {\"inputs\": [...]}"}, status_code=405)
        try:
            inputs = self._inputs(await self._json(request))
            answers = await asyncio.gather(*(self.predict_batch(item) for item in inputs))
        except (BadRequest, DataError) as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        failed = [f"input {i}: {answer}" for i, answer in enumerate(answers) if isinstance(answer, DataError)]
        if failed:
            return JSONResponse({"error": "; ".join(failed)}, status_code=422)
        return JSONResponse({"predictions": answers})

    @staticmethod
    async def _json(request: Request):
        try:
            return await request.json()
        except ValueError:
            raise BadRequest('the body is not JSON: send {"inputs": [...]} with Content-Type: application/json') from None

    def _inputs(self, body) -> list:
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), list) or not body["inputs"]:
            raise BadRequest('the body needs "inputs": a non-empty list')
        inputs = body["inputs"]
        if len(inputs) > MAX_INPUTS:
            raise BadRequest(f"{len(inputs)} inputs in one request: at most {MAX_INPUTS}, split it")
        if self.saved.preprocessor.kind == "text":
            wrong = [i for i, item in enumerate(inputs) if not isinstance(item, str) or not item.strip()]
            if wrong:
                raise BadRequest(f"inputs {wrong[:10]}: a text model takes non-empty strings")
            return inputs
        return [self._image(i, item) for i, item in enumerate(inputs)]

    def _image(self, index: int, item) -> bytes | str:
        if isinstance(item, dict) and isinstance(item.get("base64"), str):
            try:
                return base64.b64decode(item["base64"], validate=True)
            except binascii.Error:
                raise BadRequest(f"input {index}: base64 does not decode") from None
        if isinstance(item, str):
            if self.image_root is None:
                raise BadRequest(f"input {index}: this server reads no paths (start it with --image-root DIR); "
                                 'send {"base64": ...} instead')  # fmt: skip
            path = (self.image_root / item).resolve()
            if not path.is_relative_to(self.image_root) or not path.is_file():
                raise BadRequest(f"input {index}: {item} is not an image file under the server's --image-root")
            return str(path)
        raise BadRequest(f'input {index}: an image model takes {{"base64": "..."}} or a path under --image-root')


def start(run_dir: str | Path, options: ServeOptions = ServeOptions()) -> str:
    """Deploy RUN_DIR's best model on the current Ray (started here if none); returns the URL.
    The run directory must be readable where the replicas run (shared storage on a cluster)."""
    from finetune.inference import load_run
    from finetune.ray_env import ensure_ray

    run_dir = Path(run_dir).resolve()
    load_run(run_dir)  # a missing or unfinished run fails here, in one line, before Serve starts
    if options.image_root and not Path(options.image_root).is_dir():
        raise FileNotFoundError(f"--image-root {options.image_root} is not a folder")
    check_port(options.host, options.port)
    ensure_ray()
    # Serve's INFO lines (started, connecting, ready) would repeat what `finetune serve` says
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve.start(http_options={"host": options.host, "port": options.port}, logging_config={"log_level": "WARNING"})
    deployment = Predictor.options(num_replicas=options.replicas,
                                   ray_actor_options={"num_cpus": options.cpus_per_replica},
                                   max_ongoing_requests=max(options.max_batch_size * 2, 8))  # fmt: skip
    serve.run(deployment.bind(str(run_dir), options), name=APP, route_prefix="/")
    host = "127.0.0.1" if options.host in ("0.0.0.0", "::") else options.host
    return f"http://{host}:{options.port}"


def stop() -> None:
    serve.shutdown()


def serve_until_interrupted(run_dir: str | Path, options: ServeOptions, console) -> None:
    """`finetune serve`: start, say where, serve until Ctrl-C or SIGTERM (a service manager's stop), stop."""
    import signal
    import time

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    url = start(run_dir, options)
    console.print(f"serving {run_dir} at {url}/predict ({options.replicas} replica(s), batches of up to "
                  f"{options.max_batch_size}); health: {url}/health; Ctrl-C stops", highlight=False, soft_wrap=True)  # fmt: skip
    console.file.flush()  # a log file or a pipe sees it now, not when the server stops
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        console.print(f"stopped serving {run_dir}", highlight=False, soft_wrap=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if os.environ.get("RAY_ADDRESS"):  # a cluster's Serve outlives this process unless shut down
            stop()
        else:  # the local Ray started here ends with its replicas and proxy
            import ray

            ray.shutdown()


