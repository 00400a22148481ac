"""``python -m ddfast.check``: does ddfast work on this machine, and how fast is it here?

    python -m ddfast.check                          # a GPU when torch sees one, else the CPU
    python -m ddfast.check --device cuda --json check.json
    python -m ddfast.check --device cpu --quick     # about a minute on 2 cores

Four sections, each a list of checks that pass, fail or are skipped (with the reason):

* **environment**: versions; the device; whether the compiled extension loads and which CUDA
  architectures it was built for against the device's; the backend each fused op picks, and why
  the faster ones cannot run.
* **parity**: every fused op on every backend that runs on the device, forward and backward,
  against the pure-torch reference (``ddfast.parity``), at DiT-XL/2's memory shapes on a GPU
  (D 4096, N 64 and 4096; small shapes on a CPU), with exact ties and empty memories.
* **speed**: one fine-tuning step (DiffFit, memory terms on) eager and compiled, one sampling
  batch (50 guided steps and the decode) and the attention kernel that ran, each beside the
  reference path measured in the same run (``ddfast.speed``); random weights at DiT-XL/2 /
  SD-VAE shapes on a GPU, with the share of the FLOP floor from the measured bf16 matmul rate.
* **end-to-end**: ``ddfast.train`` under torchrun with DDP on one process, on a generated
  ImageNet-layout folder: a random-weight DiT (XL/2 on a GPU) and VAE saved as a diffusers
  folder, a few fine-tuning steps, a few images sampled, a one-epoch evaluation at 224 px
  (bf16, the compiled step and CUDA graphs in sampling on a GPU).

The console gets a table and, for each failure, what to try; ``--json`` writes every result. The
exit status is 1 when any check failed, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import torch

from ddfast import __version__, _ext, backend

SECTIONS = ("environment", "parity", "speed", "end-to-end")


class Skipped(Exception):
    """A check that cannot run here, and why."""


@dataclass
class Result:
    section: str
    name: str
    status: str  # pass | fail | skip
    detail: str = ""
    hint: str = ""
    seconds: float = 0.0
    values: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Sizes:
    """The shapes each section uses on a device."""

    dim: int  # memory item length D
    slots: tuple[int, ...]  # memory capacities N
    prune_rows: int  # rows of the adaptive prune
    workload: str  # ddfast.speed.SIZES
    finetune_batch: int
    sample_images: int  # images of the timed sampling batch
    reference_images: int  # images the reference sampler is timed on
    e2e_dit: str  # DiT preset of the end-to-end run
    e2e_vae: str  # VAE preset
    e2e_resolution: int  # data resolution of the end-to-end run


GPU_SIZES = Sizes(dim=4096, slots=(64, 4096), prune_rows=1300, workload="xl", finetune_batch=8,
                  sample_images=32, reference_images=2, e2e_dit="XL/2", e2e_vae="sd",
                  e2e_resolution=256)
CPU_SIZES = Sizes(dim=256, slots=(8, 64), prune_rows=200, workload="tiny", finetune_batch=8,
                  sample_images=8, reference_images=2, e2e_dit="micro", e2e_vae="small",
                  e2e_resolution=32)
OPS = tuple(backend.OPS)
FAST_BACKENDS = {"cpu": ("cpp", "triton"), "cuda": ("cuda", "triton")}  # by device type
WOOF = ("n02096294", "n02093754")  # two ImageWoof classes (ImageNet 193 and 182)


@contextlib.contextmanager
def forced_backend(name: str):
    """DDFAST_BACKEND=name for the duration (the ops read it at every call)."""
    before = os.environ.get(backend.ENV_VAR)
    os.environ[backend.ENV_VAR] = name
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(backend.ENV_VAR, None)
        else:
            os.environ[backend.ENV_VAR] = before


def arch_support(archs: list[str], capability: tuple[int, int]) -> tuple[bool, str]:
    """Whether kernels built for CMake's ``archs`` run on a device of ``capability``: a cubin for
    sm_XY runs on the same major version with minor >= Y (the ``a`` variants on exactly XY),
    PTX for compute_XY is compiled by the driver for any device >= XY."""
    major, minor = capability
    dev = major * 10 + minor
    ptx = []
    for arch in archs:
        name, _, kind = arch.partition("-")
        exact = name.endswith(("a", "f"))
        num = int(name.rstrip("af"))
        if kind in ("", "real") and ((num == dev) if exact else
                                     (num // 10 == major and num <= dev)):
            return True, f"cubin for sm_{name} runs natively on sm_{dev}"
        if kind in ("", "virtual") and not exact and num <= dev:
            ptx.append(num)
    if ptx:
        return True, f"no sm_{dev} cubin: the driver JIT-compiles compute_{max(ptx)} PTX"
    return False, f"built for {','.join(archs) or 'nothing'}, none runs on sm_{dev}"


class Checker:
    def __init__(self, device: torch.device, quick: bool,
                 json_path: Path | None = None, compile: bool = True) -> None:
        self.device = device
        self.json_path = json_path  # rewritten after every check: a killed run keeps its results
        self.began = time.perf_counter()
        self.cuda = device.type == "cuda"
        self.quick = quick
        # Why the compiled step and sampler are skipped, or None when they run.
        self.no_compile = "--quick" if quick else (None if compile else "--no-compile")
        self.sizes = GPU_SIZES if self.cuda else CPU_SIZES
        self.results: list[Result] = []
        self.fast = FAST_BACKENDS[device.type]

    # ------------------------------------------------------------ bookkeeping

    def item(self, section: str, name: str, fn, hint: str = "") -> Result:
        """Run one check: ``fn()`` returns (detail, values) or a detail string; Skipped skips it,
        any other exception fails it."""
        began = time.perf_counter()
        status, detail, values = "pass", "", {}
        try:
            out = fn()
            detail, values = out if isinstance(out, tuple) else (out or "", {})
        except Skipped as exc:
            status, detail = "skip", str(exc)
        except Exception as exc:  # a failed check is a result, not a crash
            status = "fail"
            detail = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:400]
            values = {"traceback": traceback.format_exc(limit=6)}
        if self.cuda:
            with contextlib.suppress(Exception):
                torch.cuda.synchronize()
        result = Result(section, name, status, detail, hint if status == "fail" else "",
                        round(time.perf_counter() - began, 3), values)
        self.results.append(result)
        print(f"[check] {status:4}  {section:11} {name:38} {detail}", flush=True)
        if self.json_path is not None:
            self.write_json(self.json_path)
        return result

    def counts(self) -> dict[str, int]:
        return {s: sum(r.status == s for r in self.results) for s in ("pass", "fail", "skip")}

    def write_json(self, path: Path) -> None:
        from ddfast.io import write_json

        took = round(time.perf_counter() - self.began, 1)
        write_json(path, {"ddfast": __version__, "device": str(self.device), "quick": self.quick,
                          "compile": not self.no_compile, "seconds": took, "counts": self.counts(),
                          "results": [asdict(r) for r in self.results]})

    @property
    def failed(self) -> list[Result]:
        return [r for r in self.results if r.status == "fail"]

    # ------------------------------------------------------------ environment

    def environment(self) -> None:
        self.item("environment", "versions", self._versions)
        self.item("environment", "device", self._device,
                  hint="pass --device cpu, or install a CUDA build of torch")
        self.item("environment", "compiled extension", self._extension,
                  hint="reinstall from the checkout: `pip install .` (nvcc on PATH for the CUDA "
                       "kernels; `CMAKE_ARGS=-DCMAKE_CUDA_ARCHITECTURES=<XY> pip install .` "
                       "for this device's sm_XY)")
        for op in OPS:
            self.item("environment", f"backend {op}", lambda op=op: self._backend(op),
                      hint="build the extension (`pip install .`) and, on a GPU, install Triton; "
                           "DDFAST_BACKEND=ref runs the slow reference meanwhile")

    def _versions(self):
        values = {"ddfast": __version__, "python": platform.python_version(),
                  "torch": torch.__version__, "platform": platform.platform(),
                  "cpu": platform.processor() or platform.machine(),
                  "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                  "threads": torch.get_num_threads()}
        for dist in ("triton", "diffusers", "numpy"):
            try:
                values[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                values[dist] = None
        detail = ", ".join(f"{k} {values[k]}" for k in ("torch", "triton", "diffusers"))
        return detail, values

    def _device(self):
        if not self.cuda:
            return f"CPU ({torch.backends.cpu.get_cpu_capability()})", {"type": "cpu"}
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device is visible to torch")
        props = torch.cuda.get_device_properties(self.device)
        values = {"type": "cuda", "name": props.name, "capability": f"{props.major}.{props.minor}",
                  "memory_gib": round(props.total_memory / 2**30, 1),
                  "torch_cuda": torch.version.cuda}
        return f"{props.name}, sm_{props.major}{props.minor}, CUDA {torch.version.cuda}", values

    def _extension(self):
        if not _ext.available():
            raise RuntimeError(f"ddfast._C does not import ({_ext._module()})")
        values = {"has_cuda": _ext.has_cuda(), "cuda_archs": _ext.cuda_archs()}
        if not self.cuda:
            kernels = "with CUDA kernels" if _ext.has_cuda() else "CPU only"
            return f"loads ({kernels}; {','.join(_ext.cuda_archs()) or 'no CUDA archs'})", values
        if not _ext.has_cuda():
            raise RuntimeError("built without CUDA kernels (no nvcc at install time)")
        cap = torch.cuda.get_device_capability(self.device)
        ok, why = arch_support(_ext.cuda_archs(), cap)
        values["runs_here"] = why
        if not ok:
            raise RuntimeError(why)
        return why, values

    def _backend(self, op: str):
        reasons = {name: backend._why_not(op, name, self.device) or "can run"
                   for name in self.fast}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            chosen = backend.choose(op, self.device)
        forced = os.environ.get(backend.ENV_VAR, "")
        values = {"chosen": chosen, "forced": forced or None, **reasons}
        others = "; ".join(f"{k}: {v}" for k, v in reasons.items() if k != chosen)
        detail = f"{chosen}" + (f" (forced by {backend.ENV_VAR})" if forced else "")
        if others:
            detail += f" [{others}]"
        if chosen == "ref" and not forced:
            raise RuntimeError(f"falls back to the slow reference: {others}")
        return detail, values

    # ------------------------------------------------------------ parity

    def parity(self) -> None:
        from ddfast import parity

        # Fast backends that can run on the device (Triton on a CPU only under its interpreter).
        names = []
        for name in self.fast:
            why = backend._why_not("class_extremes", name, self.device)
            if why is None:
                names.append(name)
            else:
                self.item("parity", f"fused ops {name}", lambda why=why: _skip(why))
        if not names:
            self.item("parity", "fused ops",
                      lambda: _skip("no fast backend can run here (see environment)"))
            return
        s = self.sizes
        dev = self.device
        for name in names:
            # The Triton interpreter costs per loop iteration: its CPU check stays small.
            interp = name == "triton" and not self.cuda
            dim = 64 if interp else s.dim
            slots = (8,) if interp else (s.slots[:1] if self.quick else s.slots)
            for n in slots:
                batch = 64 if n >= 1024 else 8
                for dtype in (torch.float32, torch.bfloat16):
                    case = _to(parity.extremes_case(batch, 10, n, dim, dtype, seed=n + dim), dev)
                    self._parity(f"class_extremes {name} N{n} D{dim} {str(dtype)[6:]}", name,
                                 parity.check_extremes, *case)
            self._parity(f"class_extremes {name} ties", name, _both_ties, dev)
            self._parity(f"class_extremes {name} empty", name, parity.check_empty, dim, dev)
            for n in slots:
                batch = 64 if n >= 1024 else 8
                for adaptive in (True, False):
                    case = _to(parity.awkward_insert_case(10, n, dim, batch, seed=n + dim), dev)
                    self._parity(f"insert_memory {name} N{n} {'adaptive' if adaptive else 'fifo'}",
                                 name, parity.check_insert, *case, adaptive)
            num = 40 if interp else s.prune_rows
            self._parity(f"prune_adaptive {name} K{num}", name, parity.check_prune_case, num,
                         dim, dev)
            self._parity(f"similarity_degree {name} K{num}", name,
                         parity.check_similarity_degree, name, num, dim, dev)

    def _parity(self, label: str, name: str, fn, *args) -> None:
        def call():
            with forced_backend(name):
                return _fmt(fn(*args))

        self.item("parity", label, call, hint=f"DDFAST_BACKEND=ref (or another backend) avoids "
                                              f"the {name} kernels until this is fixed")

    # ------------------------------------------------------------ speed

    def speed(self) -> None:
        from ddfast import speed

        s = self.sizes
        state: dict = {}

        def workload():
            if "w" not in state:
                if self.cuda:  # the reference runs TF32, as the published code does
                    torch.backends.cuda.matmul.allow_tf32 = True
                    torch.backends.cudnn.allow_tf32 = True
                state["w"] = speed.build_workload(s.workload, self.device)
            return state["w"]

        peak = None
        if self.cuda:
            from ddfast.perf import matmul_tflops

            res = self.item("speed", "bf16 matmul rate", lambda: _rate(matmul_tflops(self.device)))
            peak = res.values.get("tflops")
        batch = s.finetune_batch
        rate = {}

        def step(kind):
            w = workload()
            if kind == "reference":
                fn, reps = speed.reference_finetune_step(w, batch), 5
            else:
                fn, reps = speed.ddfast_finetune_step(w, batch, compile=kind == "compiled"), 10
            secs = _time(fn, self.device, warmup=3, reps=reps)
            out = _speed_values(secs, batch, w.finetune_gflop(), peak, rate.get("reference"))
            rate[kind] = batch / secs
            return out

        self.item("speed", f"finetune step reference B{batch}", lambda: step("reference"))
        self.item("speed", f"finetune step eager B{batch}", lambda: step("eager"))
        if self.no_compile:
            self.item("speed", f"finetune step compiled B{batch}",
                      lambda: _skip(self.no_compile))
        else:
            self.item("speed", f"finetune step compiled B{batch}", lambda: step("compiled"),
                      hint="set run.compile=false (the default) to train eagerly; report the "
                           "error with `python -m ddfast.check --json` attached")
        steps, images = 50, s.sample_images

        def sampling(kind):
            w = workload()
            if kind == "reference":
                one = speed.reference_sample(w, steps=steps)
                n = s.reference_images
                secs = _time(lambda: [one(0, i) for i in range(n)], self.device, 1, 1) / n
                rate["sample_reference"] = 1 / secs
                return _speed_values(secs, 1, w.sample_gflop(steps), peak, None)
            run = speed.ddfast_sample(w, steps=steps, compile=kind == "compiled")
            secs = _time(lambda: run(images), self.device, warmup=1, reps=2)
            return _speed_values(secs, images, w.sample_gflop(steps), peak,
                                 rate.get("sample_reference"))

        self.item("speed", "sample reference 1 image", lambda: sampling("reference"))
        self.item("speed", f"sample eager {images} images", lambda: sampling("eager"))
        if self.no_compile:
            self.item("speed", f"sample compiled {images} images",
                      lambda: _skip(self.no_compile))
        else:
            self.item("speed", f"sample compiled {images} images", lambda: sampling("compiled"),
                      hint="set run.compile=false to sample eagerly")
        self.item("speed", "attention kernel", lambda: self._attention(workload()),
                  hint="update torch, or check that bf16 autocast reaches the DiT")

    def _attention(self, w):
        from ddfast.perf import attention_backends
        from ddfast.trainer import model_autocast

        x = torch.randn(2, *w.latent_shape, device=self.device)
        t = torch.tensor([10, 500], device=self.device)
        precision = "bf16" if self.cuda else "fp32"
        with model_autocast(self.device, precision):
            found = attention_backends(lambda: w.dit(x, timestep=t, class_labels=t % 10,
                                                     return_dict=False))
        if not found:
            raise RuntimeError("the DiT forward ran no scaled_dot_product_attention")
        if self.cuda and "math" in found:
            raise RuntimeError(f"the unfused math attention ran in {precision}: {found}")
        return f"{', '.join(found)} ({precision})", {"kernels": found}

    # ------------------------------------------------------------ end to end

    def end_to_end(self) -> None:
        self.item("end-to-end", "ddfast.train under torchrun (DDP)", self._e2e,
                  hint="rerun the printed command to see the whole log; DDFAST_BACKEND=ref "
                       "rules out the fused ops, --run.compile false the compiler")

    def _e2e(self):
        import numpy as np
        from PIL import Image

        from ddfast.models import build_dit, build_vae, save_pipeline

        s = self.sizes
        with tempfile.TemporaryDirectory(prefix="ddfast-check-") as tmp:
            root = Path(tmp)
            rng = np.random.default_rng(0)
            side = s.e2e_resolution
            for split, count in (("train", 6), ("val", 3)):
                for wnid in WOOF:
                    folder = root / split / wnid
                    folder.mkdir(parents=True)
                    for k in range(count):  # smooth random images, JPEG like ImageNet
                        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                        img = Image.fromarray(small).resize((side + 16, side), Image.BILINEAR)
                        img.save(folder / f"{wnid}_{k}.JPEG", quality=90)
            torch.manual_seed(0)
            latent = side // (8 if s.e2e_vae == "sd" else 2)
            dit = build_dit(s.e2e_dit, in_channels=4, sample_size=latent, num_classes=1000)
            vae = build_vae(s.e2e_vae, sample_size=side)
            save_pipeline(root / "weights", dit, vae)
            del dit, vae
            out = root / "run"
            args = ["--preset", "imagewoof", "--out", str(out), "--root", str(root / "train"),
                    "--test-root", str(root / "val"), "--data.subset", ",".join(WOOF),
                    "--data.resolution", str(side), "--data.cache_dir", str(root / "cache"),
                    "--model.dit", str(root / "weights"), "--optim.steps", "4",
                    "--optim.batch_size", "4", "--memory.real_capacity", "4",
                    "--memory.gen_capacity", "4", "--sample.ipc", "2", "--sample.steps", "5",
                    "--sample.batch_size", "4", "--run.log_every", "2",
                    "--eval.networks", "resnetap10", "--eval.repeats", "1", "--eval.epochs", "1",
                    "--run.progress", "off", "--run.device", str(self.device),
                    # compiled step and CUDA-graph sampling on a GPU; on a CPU the speed
                    # section has already compiled both, and recompiling costs a minute
                    "--run.compile", "true" if self.cuda and not self.no_compile else "false"]
            port = _free_port()
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
                   "--nproc_per_node=1", "--rdzv-backend=c10d",
                   f"--rdzv-endpoint=localhost:{port}", "-m", "ddfast.train", *args]
            env = {**os.environ, "DDFAST_DDP": "1"}
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
            values = {"command": " ".join(["DDFAST_DDP=1", *cmd[1:]]),
                      "log_tail": (proc.stdout + proc.stderr)[-3000:]}
            if proc.returncode != 0:
                tail = [x for x in (proc.stderr or proc.stdout).splitlines() if x.strip()]
                raise RuntimeError(f"exit {proc.returncode}: {tail[-1] if tail else 'no output'}")
            if not (out / "summary.json").is_file():
                raise RuntimeError("the run exited 0 without writing summary.json")
            pngs = sorted((out / "distilled").rglob("*.png"))
            if len(pngs) != 2 * len(WOOF):
                raise RuntimeError(f"{len(pngs)} distilled images, want {2 * len(WOOF)}")
            if "1 processes" not in proc.stdout:
                raise RuntimeError("the job ran without its process group (DDFAST_DDP=1 was "
                                   "ignored)")
            acc = _accuracies(out)
            values.update(accuracy=acc, images=len(pngs))
            return f"{len(pngs)} images, eval at 224 px: {acc}", values

    # ------------------------------------------------------------ all

    def run(self, sections: tuple[str, ...] = SECTIONS) -> list[Result]:
        for section in sections:
            getattr(self, section.replace("-", "_"))()
        return self.results


# ---------------------------------------------------------------- helpers


def _to(case, device):
    return tuple(t.to(device) for t in case)


def _both_ties(device):
    from ddfast.parity import check_ties

    return {"value": max(check_ties(largest, device)["value"] for largest in (True, False))}


def _fmt(worst: dict) -> tuple[str, dict]:
    text = ", ".join(f"max {k} err {v:.2g}" for k, v in worst.items()) or "exact"
    return text, worst


def _skip(why: str):
    raise Skipped(why)


def _rate(tflops: float):
    return f"{tflops:.0f} TFLOP/s", {"tflops": round(tflops, 1)}


def _time(fn, device: torch.device, warmup: int, reps: int) -> float:
    """Median seconds of ``fn()`` over ``reps`` calls after ``warmup`` calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        began = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def _speed_values(secs: float, images: int, gflop_per_image: float | None,
                  peak_tflops: float | None, reference_rate: float | None):
    rate = images / secs
    values = {"ms": round(secs * 1e3, 2), "images_per_s": round(rate, 2)}
    parts = [f"{secs * 1e3:.1f} ms", f"{rate:.1f} img/s"]
    if gflop_per_image and peak_tflops:
        share = gflop_per_image * rate / 1e3 / peak_tflops
        values["floor_share"] = round(share, 3)
        parts.append(f"{share:.0%} of FLOP floor")
    if reference_rate:
        values["vs_reference"] = round(rate / reference_rate, 2)
        parts.append(f"{rate / reference_rate:.1f}x reference")
    return ", ".join(parts), values


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _accuracies(run_dir: Path) -> dict:
    """{"ipc2/resnetap10": last-epoch test accuracy} from a run's evaluation records."""
    out = {}
    for path in sorted((run_dir / "eval").glob("ipc*/results.json")):
        record = json.loads(path.read_text())
        for net, rec in record["networks"].items():
            out[f"ipc{record['ipc']}/{net}"] = round(float(rec["last_mean"]), 2)
    if not out:
        raise RuntimeError(f"the run wrote no evaluation under {run_dir / 'eval'}")
    return out


def table(results: list[Result]) -> str:
    lines = ["| section | check | status | detail | s |", "|---|---|---|---|---:|"]
    for r in results:
        detail = r.detail.replace("|", "/")
        lines.append(f"| {r.section} | {r.name} | {r.status} | {detail} | {r.seconds:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ddfast.check",
                                description=__doc__.split("\n\n")[0].strip("`"))
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--quick", action="store_true",
                   help="the smallest memory size only, and no torch.compile")
    p.add_argument("--no-compile", action="store_true",
                   help="every memory size, but no torch.compile: the compiled step and sampler "
                        "skip (the GPU benchmarks time them) and the end-to-end job runs eagerly")
    p.add_argument("--json", help="write every result to this file")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)}")
    args = p.parse_args(argv)
    sections = tuple(x.strip() for x in args.sections.split(",") if x.strip())
    unknown = [x for x in sections if x not in SECTIONS]
    if unknown:
        print(f"error: unknown section(s) {unknown}; pick from {', '.join(SECTIONS)}",
              file=sys.stderr)
        return 2
    if args.json and Path(args.json).is_dir():
        print(f"error: --json {args.json} is a folder; pass a file name", file=sys.stderr)
        return 2
    setting = args.device
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device: pass --device cpu, or "
              f"install a CUDA build of torch (this one is {torch.__version__})", file=sys.stderr)
        return 2
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    checker = Checker(device, args.quick, json_path=Path(args.json) if args.json else None,
                      compile=not args.no_compile)
    results = checker.run(sections)
    print()
    print(table(results))
    failed = checker.failed
    counts = checker.counts()
    print(f"\nddfast.check on {device}: {counts['pass']} passed, {counts['fail']} failed, "
          f"{counts['skip']} skipped in {time.perf_counter() - checker.began:.0f} s")
    for r in failed:
        print(f"FAILED {r.section} / {r.name}: {r.detail}" + (f"\n  try: {r.hint}" if r.hint
                                                               else ""))
    if args.json:
        checker.write_json(Path(args.json))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
