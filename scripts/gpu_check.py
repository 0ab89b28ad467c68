"""The project's one GPU check: build sd15-random, export it with two LoRAs, time plain diffusers,
serve it, load it through gRPC, print a table. Fits one `device` call (about 8 minutes).

    bash scripts/gpu_check.sh            # on the GPU machine (see the script for the setup)
    python scripts/gpu_check.py --tiny   # a dry run of the same path on the CPU with `tiny` at 64x64

Each result is appended as a JSON line to $OUT/results.jsonl as soon as it exists, so a run cut
short still leaves data; the table comes last. Stages and their budget on an H100:
  build sd15-random + 2 LoRAs (r64 "LCM" at 1.0, r32 "crack" at 0.8)  ~60 s
  export --backend eager (fuse + parity check), fp16                   ~60 s
  diffusers, fused model, batch 1 and 32 (the baseline)                ~30 s
  serve eager + CUDA graphs, bench c=1,8,32,64                         ~90 s
  export --backend aoti and serve it, bench c=1,32,64 (if time is left) ~180 s
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

OUT = pathlib.Path(os.environ.get("OUT", "/tmp/lcmserve-gpu-check"))
T0 = time.time()
RESULTS: list[dict] = []


def emit(**record: object) -> None:
    record["t_s"] = round(time.time() - T0, 1)
    RESULTS.append(record)
    line = json.dumps(record, default=str)
    print(line, flush=True)
    with (OUT / "results.jsonl").open("a") as f:
        f.write(line + "\n")


def cli(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "lcmserve.cli", *args]
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, text=True, capture_output=True, timeout=timeout)


class Server:
    def __init__(self, *args: str, timeout: float) -> None:
        start = time.time()
        self.log = (OUT / f"server-{int(start)}.log").open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "lcmserve.cli", "serve", "--port", "0",
                                      "--metrics-port", "-1", *args], stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)
        self.target = ""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("listening on "):
                self.target = line.split()[-1]
                break
            if time.time() - start > timeout:
                break
        self.ready_s = time.time() - start
        if not self.target:
            self.stop()
            raise RuntimeError(f"server did not start; see {self.log.name}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def bench(target: str, levels: str, shape: list[str], requests: int, name: str) -> None:
    path = OUT / f"bench-{name}.json"
    r = cli("bench", "--target", target, "--concurrency", levels, "--requests", str(requests),
                 "--warmup", "8", "--no-progress", "--json", str(path), *shape, timeout=300)
    print(r.stdout[-3000:], r.stderr[-2000:], flush=True)
    if path.exists():
        for level in json.loads(path.read_text())["levels"]:
            emit(stage=f"serve_{name}", concurrency=level.get("concurrency"), ok=level["ok"], failed=level["failed"],
                 images_per_s=level["images_per_s"], p50_ms=level["latency_ms"]["p50"],
                 p99_ms=level["latency_ms"]["p99"], first_step_p50_ms=level["first_step_ms"]["p50"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU dry run with the tiny preset at 64x64")
    parser.add_argument("--skip-aoti", action="store_true")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)

    import torch

    import lcmserve
    from lcmserve.export.loading import load_pipeline
    from lcmserve.export.synthetic import make_lora

    cuda = torch.cuda.is_available() and not args.tiny
    base = "tiny" if args.tiny else "sd15-random"
    side = "64" if args.tiny else "512"
    dtype = "float16" if cuda else "float32"
    device = "cuda" if cuda else "cpu"
    versions = {}
    for module in ("diffusers", "transformers", "peft", "grpc", "google.protobuf", "onnxruntime", "triton"):
        try:
            versions[module] = __import__(module, fromlist=["x"]).__version__
        except Exception as exc:  # noqa: BLE001
            versions[module] = f"missing ({type(exc).__name__})"
    emit(stage="env", card=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
         cuda=torch.version.cuda, lcmserve=lcmserve.__version__, cpus=os.cpu_count(), **versions)

    # 1. base + two LoRAs, as the user stacks them
    t = time.time()
    pipe = load_pipeline(base, dtype=torch.float32, device="cpu")
    loras = OUT / "loras"
    loras.mkdir(exist_ok=True)
    make_lora(pipe, loras / "lcm.safetensors", fmt="diffusers", rank=64, seed=1)
    make_lora(pipe, loras / "crack.safetensors", fmt="kohya", rank=32, seed=2, include_text_encoder=True)
    del pipe
    emit(stage="build", base=base, seconds=round(time.time() - t, 1))

    # 2. export (fuse + parity check), eager
    artifact = OUT / "artifact-eager"
    t = time.time()
    r = cli("export", "--base", base, "--lora", f"{loras / 'lcm.safetensors'}:1.0",
                 "--lora", f"{loras / 'crack.safetensors'}:0.8", "--out", str(artifact), "--dtype", dtype,
                 "--device", device, "--force", timeout=400)
    emit(stage="export_eager", rc=r.returncode, seconds=round(time.time() - t, 1), tail=r.stderr[-400:])
    if r.returncode:
        return 1

    shape = ["--width", side, "--height", side, "--steps", "4", "--format", "jpeg"]
    # 3. the baseline: plain diffusers on the fused model, same run, same card
    path = OUT / "baseline.json"
    r = cli("bench", "--baseline", str(artifact), "--baseline-batch", "1,32" if cuda else "1,8",
                 "--baseline-iters", "5", "--no-progress", "--json", str(path), *shape, timeout=300)
    print(r.stdout[-2000:], r.stderr[-1500:], flush=True)
    if path.exists():
        emit(stage="diffusers_baseline", **{"result": json.loads(path.read_text()).get("baseline")})

    # 4. serve eager (+ CUDA graphs on a GPU) and load it
    levels = "1,8,32,64" if cuda else "1,4,16"
    server = Server("--model", str(artifact), "--backend", "eager", "--max-batch-size", "64", timeout=300)
    emit(stage="serve_eager_ready", seconds=round(server.ready_s, 1))
    try:
        bench(server.target, levels, shape, 64 if cuda else 24, "eager")
    finally:
        server.stop()

    # 5. compiled artifact (AOTInductor), if there is time left in the budget
    if not args.skip_aoti and time.time() - T0 < 280:
        compiled = OUT / "artifact-aoti"
        t = time.time()
        r = cli("export", "--base", base, "--lora", f"{loras / 'lcm.safetensors'}:1.0",
                     "--lora", f"{loras / 'crack.safetensors'}:0.8", "--out", str(compiled), "--dtype", dtype,
                     "--device", device, "--backend", "aoti", "--force", timeout=420 - (time.time() - T0))
        emit(stage="export_aoti", rc=r.returncode, seconds=round(time.time() - t, 1), tail=r.stderr[-400:])
        if r.returncode == 0:
            server = Server("--model", str(compiled), "--backend", "aoti", "--max-batch-size", "64", timeout=120)
            emit(stage="serve_aoti_ready", seconds=round(server.ready_s, 1))
            try:
                bench(server.target, "1,32,64" if cuda else "1,16", shape, 64 if cuda else 24, "aoti")
            finally:
                server.stop()

    # 6. the table
    print("\n| stage | concurrency | images/s | p50 ms | p99 ms | first step p50 ms | other |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for rec in RESULTS:
        if rec["stage"].startswith("serve_") and "concurrency" in rec:
            print(f"| {rec['stage']} | {rec['concurrency']} | {rec['images_per_s']:.1f} | {rec['p50_ms']:.1f} | "
                  f"{rec['p99_ms']:.1f} | {rec['first_step_p50_ms']:.1f} | ok {rec['ok']} failed {rec['failed']} |")
        elif rec["stage"] not in ("env",):
            other = {k: v for k, v in rec.items() if k not in ("stage", "t_s", "tail")}
            print(f"| {rec['stage']} | | | | | | {json.dumps(other, default=str)[:300]} |")
    print(f"\nenv: {json.dumps(RESULTS[0], default=str)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
